"""``sliding_window: 1``: every query sees only its own key, on every backend and block size.

The reference is the model's own definition, a full forward per step (no KV cache) of
Hugging Face's ``MistralForCausalLM``: at W = 1 its cached ``generate()`` is itself wrong (its
cache keeps one key, so a query misses its own), and the test shows that it differs. Before the
fix a prompt longer than a block crashed the batch builder (an empty float ``cached_slots``) and
a readmitted sequence left its table without a block for its last position (the step meter then
asked for ``ref_count(-1)``).
"""

import json

import pytest
import torch

import runtime
from helpers_checkpoint import hf_greedy, make_family, random_prompts
from runtime import SamplingParams
from runtime.kv_layout import window_blocks

NEW = 10
LENGTHS = [1, 2, 3, 5, 8, 9, 16, 17, 20]


def _checkpoint(path, head_dim: int, lengths):
    """(folder of a Mistral checkpoint with sliding_window=1 and no EOS, prompts, reference tokens)."""
    mistral = make_family(path, "mistral", layers=2, sliding_window=1, head_dim=head_dim, seed=21)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "eos_token_id": None}))
    prompts = random_prompts(lengths, 128, seed=1)
    refs = []
    with torch.no_grad():
        for prompt in prompts:
            ids = list(prompt)
            for _ in range(NEW):  # the definition: a full forward over every token so far
                ids.append(int(mistral(torch.tensor([ids]), use_cache=False).logits[0, -1].argmax()))
            refs.append(ids[len(prompt):])
    mistral.generation_config.eos_token_id = None
    cached_hf = [hf_greedy(mistral, p, NEW)[0] for p in prompts]
    assert cached_hf != refs  # HF's cached generate is not the reference at W = 1
    return path, prompts, refs


@pytest.fixture(scope="module")
def window_one(tmp_path_factory):
    return _checkpoint(tmp_path_factory.mktemp("window1"), 16, LENGTHS)


def _tokens(outs):
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("block_size", range(1, 17))
def test_window_one_matches_a_full_forward_per_step(window_one, backend, block_size):
    path, prompts, refs = window_one
    outs = runtime.generate(path, prompts, SamplingParams(max_tokens=NEW, ignore_eos=True),
                            block_size=block_size, backend=backend)
    assert _tokens(outs) == refs
    assert outs.stats["sliding_window"] == 1
    assert outs.stats["peak_blocks_per_seq"] <= window_blocks(1, block_size) + 1


def test_window_one_on_triton(tmp_path):
    path, prompts, refs = _checkpoint(tmp_path, 64, [3, 9, 17])  # kgen's kernels start at head_dim 64
    outs = runtime.generate(path, prompts, SamplingParams(max_tokens=NEW, ignore_eos=True),
                            block_size=8, backend="triton")
    assert _tokens(outs) == refs


@pytest.mark.parametrize("block_size", [1, 2, 3])
def test_window_one_readmitted_and_forked_sequences(window_one, block_size):
    """A pool too small for everyone preempts and readmits sequences (the plan then keeps only the
    last position's block); ``n = 2`` forks share blocks; tokens still match the reference."""
    path, prompts, refs = window_one
    tight = runtime.generate(path, prompts, SamplingParams(max_tokens=NEW, ignore_eos=True),
                             block_size=block_size, backend="torch", num_blocks=8)
    assert tight.stats["preemptions"] > 0
    assert _tokens(tight) == refs
    pairs = runtime.generate(path, prompts[:4], SamplingParams(max_tokens=NEW, n=2, ignore_eos=True),
                             block_size=block_size, backend="torch", num_blocks=6)
    assert [[c.token_ids for c in o.outputs] for o in pairs] == [[r, r] for r in refs[:4]]
