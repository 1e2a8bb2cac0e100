"""``tie_word_embeddings`` against what the checkpoint really holds, compared with transformers 5.

transformers ties the head to the embedding when loading only where that loses nothing: a stored
``lm_head.weight`` that differs from the embedding is kept (with a warning), an equal one is
tied, and a checkpoint holding only the head ties the embedding to it. The runtime used to drop a
stored head silently and decode with the embedding (other tokens than transformers').
"""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import runtime
from helpers_checkpoint import hf_greedy, make_llama, random_prompts
from runtime import SamplingParams
from runtime.loader import load_model

EMBED = "model.embed_tokens.weight"


def _rewrite(path, *, tie: bool, change) -> None:
    """Set ``tie_word_embeddings`` in config.json and pass the tensors through ``change(dict)``."""
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": tie}))
    tensors = load_file(path / "model.safetensors")
    change(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def _assert_head(loaded, weight) -> None:
    """The runtime's head computes ``x @ weight.T``."""
    x = torch.randn(3, weight.shape[1])
    torch.testing.assert_close(loaded.model.lm_head(x), x @ weight.T, rtol=1e-5, atol=1e-5)


def _hf_and_ours(path, prompt):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path).eval()
    ours = runtime.generate(path, [prompt], SamplingParams(max_tokens=8, ignore_eos=True), backend="torch")
    return hf, hf_greedy(hf, prompt, 8, min_new_tokens=8)[0], ours[0].outputs[0].token_ids


def test_a_stored_head_that_differs_is_kept_as_transformers_keeps_it(tmp_path):
    make_llama(tmp_path, tie=False, vocab=160)
    _rewrite(tmp_path, tie=True, change=lambda t: None)
    prompt = random_prompts([6], 160, seed=3)[0]
    with pytest.warns(RuntimeWarning, match="tie_word_embeddings.*lm_head.weight that differs"):
        hf, hf_ids, ours = _hf_and_ours(tmp_path, prompt)
    assert hf.lm_head.weight.data_ptr() != hf.model.embed_tokens.weight.data_ptr()  # HF did not tie
    assert ours == hf_ids
    stored = load_file(tmp_path / "model.safetensors")
    with pytest.warns(RuntimeWarning):
        loaded = load_model(tmp_path, device="cpu")
    _assert_head(loaded, stored["lm_head.weight"])
    # the tied model (what the runtime used to decode) picks other tokens
    _rewrite(tmp_path, tie=True, change=lambda t: t.pop("lm_head.weight"))
    assert runtime.generate(tmp_path, [prompt], SamplingParams(max_tokens=8, ignore_eos=True),
                            backend="torch")[0].outputs[0].token_ids != hf_ids


def test_an_equal_stored_head_is_tied_without_a_warning(tmp_path, recwarn):
    make_llama(tmp_path, tie=False, vocab=160)
    _rewrite(tmp_path, tie=True, change=lambda t: t.update({"lm_head.weight": t[EMBED].clone()}))
    loaded = load_model(tmp_path, device="cpu")
    _assert_head(loaded, load_file(tmp_path / "model.safetensors")[EMBED])
    assert not [w for w in recwarn if "tie_word_embeddings" in str(w.message)]


def test_only_a_stored_head_ties_the_embedding_to_it(tmp_path):
    make_llama(tmp_path, tie=False, vocab=160)
    _rewrite(tmp_path, tie=True, change=lambda t: t.pop(EMBED))
    prompt = random_prompts([6], 160, seed=4)[0]
    hf, hf_ids, ours = _hf_and_ours(tmp_path, prompt)
    assert torch.equal(hf.model.embed_tokens.weight, hf.lm_head.weight)
    assert ours == hf_ids
    loaded = load_model(tmp_path, device="cpu")
    assert torch.equal(loaded.model.embed, load_file(tmp_path / "model.safetensors")["lm_head.weight"])


def test_an_untied_config_still_needs_its_head(tmp_path):
    make_llama(tmp_path, tie=False, vocab=160)
    _rewrite(tmp_path, tie=False, change=lambda t: t.pop("lm_head.weight"))
    with pytest.raises(ValueError, match="weight 'lm_head.weight' is missing"):
        load_model(tmp_path, device="cpu")
