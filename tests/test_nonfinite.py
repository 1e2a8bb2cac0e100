"""Non-finite weights (issue 21): the CPU backends agree with transformers, and a request whose
logits hold NaN or inf is finished with a named error instead of decoding token 0."""

import pytest
import torch

import runtime
from helpers_checkpoint import hf_greedy, make_llama
from test_model_parity import NATIVE


def poisoned_llama(path, name: str, index, value: float):
    """A random Llama saved with ``weights[name][index] = value``; returns HF's model with it."""
    from safetensors.torch import load_file, save_file

    hf = make_llama(path, layers=2)
    file = path / "model.safetensors"
    weights = load_file(file)
    weights[name][index] = value
    save_file(weights, file, metadata={"format": "pt"})
    hf.load_state_dict(weights, strict=False)
    return hf


PROMPTS = [[5, 9, 17, 33, 3], [40, 41], [12, 99, 100, 7, 8, 64]]


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_an_inf_row_in_k_proj_decodes_as_transformers_does(tmp_path, backend):
    """k_proj row 3 = inf makes KV head 0's keys NaN in one dimension, so every score of its query
    heads is NaN: torch's SDPA gives those heads zeros (a fully masked row) and transformers goes
    on with finite tokens; both CPU backends give the same tokens (the native kernel was built
    with -ffast-math before, which assumed no NaN and decoded token 0; the torch backend padded
    sequences of several lengths with an additive -inf mask, where SDPA answers NaN)."""
    if backend == "native" and NATIVE:
        pytest.skip(NATIVE)
    hf = poisoned_llama(tmp_path, "model.layers.0.self_attn.k_proj.weight", 3, float("inf"))
    prompts = PROMPTS
    outs = runtime.generate(tmp_path, prompts, runtime.SamplingParams(max_tokens=8), backend=backend)
    assert outs.stats["backend"] == backend
    for out, prompt in zip(outs, prompts):
        ids, logprob = hf_greedy(hf, prompt, 8)
        assert out.error is None and out.outputs[0].token_ids == ids
        assert out.outputs[0].cumulative_logprob == pytest.approx(logprob, abs=1e-3)


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_nan_in_v_proj_aborts_every_request_by_name(tmp_path, backend):
    """NaN in v_proj reaches every request's logits: each is finished with "abort" and an error
    naming NaN/inf logits (with a warning), never with token 0."""
    if backend == "native" and NATIVE:
        pytest.skip(NATIVE)
    poisoned_llama(tmp_path, "model.layers.0.self_attn.v_proj.weight", 3, float("nan"))
    with pytest.warns(RuntimeWarning, match="NaN/inf logits"):
        outs = runtime.generate(tmp_path, PROMPTS, runtime.SamplingParams(max_tokens=8), backend=backend)
    for i, out in enumerate(outs):
        assert out.outputs[0].finish_reason == "abort" and out.outputs[0].token_ids == []
        assert out.error.startswith(f"request_id={i}: the model's logits hold NaN or inf at output position 0")


def test_a_nan_embedding_aborts_only_the_requests_that_read_it(tmp_path):
    """Token 7's embedding row is NaN: the request whose prompt holds it (and the n=2 request
    that holds it, aborted in its prefill, before its samples fork) abort; the others, in the
    same steps, decode transformers' tokens."""
    hf = poisoned_llama(tmp_path, "model.embed_tokens.weight", 7, float("nan"))
    params = [runtime.SamplingParams(max_tokens=6), runtime.SamplingParams(max_tokens=6),
              runtime.SamplingParams(max_tokens=6, n=2), runtime.SamplingParams(max_tokens=6, beam_width=2)]
    prompts = [[5, 9, 17], [5, 7, 9], [4, 7], [3, 8, 8]]
    with pytest.warns(RuntimeWarning, match="request_id=1: the model's logits hold NaN or inf"):
        outs = runtime.generate(tmp_path, prompts, params)
    assert outs[1].error and outs[2].error and outs[0].error is None and outs[3].error is None
    assert outs[2].outputs and all(c.finish_reason == "abort" and not c.token_ids for c in outs[2].outputs)
    assert outs[0].outputs[0].token_ids == hf_greedy(hf, prompts[0], 6)[0]
    assert len(outs[3].outputs) == 2 and all(len(c.token_ids) == 6 for c in outs[3].outputs)
    assert outs.stats["num_running"] == 0 and outs.stats["blocks_in_use"] == 0


def test_padded_attention_answers_as_sdpa_does_for_each_unpadded_row():
    """The torch backend's padded groups: per row, what SDPA gives that row alone (padding
    replaced by -inf, never added to an inf score), and zeros for a head whose scores are all NaN,
    as the native kernel gives and as SDPA gives in transformers' decode step (torch's SDPA is not
    consistent there across shapes, so that head is checked on its own)."""
    import torch.nn.functional as F

    from runtime.sdpa import attend_padded

    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(3, 2, 4, 16, generator=gen) for _ in range(3))
    k[0, 1, :, 5] = float("nan")   # sequence 0, KV head 1: every score NaN
    k[2, 0, 3] = float("inf")      # sequence 2 (length 2): an inf key in its padding only
    lens = [4, 16, 2]   # sequence 0 sees only its four NaN keys
    k, v = torch.cat([k, torch.randn(3, 2, 12, 16, generator=gen)], 2), \
        torch.cat([v, torch.randn(3, 2, 12, 16, generator=gen)], 2)
    visible = (torch.arange(16)[None, :] < torch.tensor(lens)[:, None])[:, None, None, :]
    out = attend_padded(q, k, v, visible, 0.25, None)
    for i, n in enumerate(lens):
        want = F.scaled_dot_product_attention(q[i:i + 1], k[i:i + 1, :, :n], v[i:i + 1, :, :n], scale=0.25)
        heads = [0] if i == 0 else [0, 1]
        torch.testing.assert_close(out[i:i + 1, heads], want[:, heads], rtol=1e-5, atol=1e-5)
    assert torch.equal(out[0, 1], torch.zeros_like(out[0, 1]))
    assert torch.isfinite(out).all()
