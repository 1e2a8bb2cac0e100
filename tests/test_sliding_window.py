"""Sliding windows end to end: a Mistral checkpoint (every layer windowed) decodes exactly like
Hugging Face's ``MistralForCausalLM`` for prompts and outputs longer than the window, while the
memory manager frees the blocks that slide out: a sequence never holds more than
``window_blocks(W, bs)`` blocks. Gemma 2 (windowed and full layers mixed) frees nothing.
"""

import json

import pytest
import torch

import runtime
from helpers_checkpoint import hf_greedy, make_family, random_prompts
from runtime import SamplingParams
from runtime.kv_layout import window_blocks

W = 8


@pytest.fixture(scope="module")
def windowed(tmp_path_factory):
    """(folder of a Mistral checkpoint with sliding_window=W and no EOS, the HF model)."""
    path = tmp_path_factory.mktemp("window")
    mistral = make_family(path, "mistral", layers=2, sliding_window=W, head_dim=16, seed=21)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "eos_token_id": None}))
    mistral.generation_config.eos_token_id = None
    return path, mistral


def test_the_reference_differs_from_full_attention(windowed):
    path, mistral = windowed
    prompt = random_prompts([20], 128, seed=1)[0]
    full = runtime.generate(path, [prompt], SamplingParams(max_tokens=16, ignore_eos=True))
    assert full.stats["sliding_window"] == W
    with torch.no_grad():  # the same weights without the window pick other tokens
        mistral.config.sliding_window = None
        try:
            no_window = hf_greedy(mistral, prompt, 16)[0]
        finally:
            mistral.config.sliding_window = W
    windowed_ids = hf_greedy(mistral, prompt, 16)[0]
    assert no_window != windowed_ids
    assert full[0].outputs[0].token_ids == windowed_ids  # and the runtime follows the windowed one


@pytest.mark.parametrize("block_size,backend", [(1, "auto"), (4, "auto"), (16, "auto"), (4, "torch")])
def test_greedy_matches_mistral_and_frees_out_of_window_blocks(windowed, block_size, backend):
    path, mistral = windowed
    prompts = random_prompts([3, 8, 9, 21, 30], 128, seed=2)
    outs = runtime.generate(path, prompts, SamplingParams(max_tokens=24, ignore_eos=True), block_size=block_size,
                            backend=backend)
    for p, out in zip(prompts, outs):
        ref_ids, ref_logprob = hf_greedy(mistral, p, 24)
        assert out.outputs[0].token_ids == ref_ids
        assert out.outputs[0].cumulative_logprob == pytest.approx(ref_logprob, abs=1e-3)
    stats = outs.stats
    assert stats["window_freed_blocks"] > 0
    assert stats["peak_blocks_per_seq"] <= window_blocks(W, block_size) < -(-(30 + 23) // block_size)


def test_prefix_cache_hits_inside_the_window(windowed):
    path, mistral = windowed
    shared = random_prompts([24], 128, seed=3)[0]
    tail = random_prompts([9], 128, seed=4)[0]
    # the first request stores (and caches) the blocks of positions 16..23, which a prefill of the
    # second from position 24 reads; blocks 0..3 were never stored and are not needed
    batch = [shared, shared + tail]
    outs = runtime.generate(path, batch, SamplingParams(max_tokens=10, ignore_eos=True), block_size=4,
                            max_num_seqs=1)
    assert outs.stats["prefill_tokens_skipped"] == 24 and outs.stats["prefix_cache_hit_blocks"] == 2
    for p, out in zip(batch, outs):
        assert out.outputs[0].token_ids == hf_greedy(mistral, p, 10)[0]


def test_preemption_recomputes_only_the_window(windowed):
    path, mistral = windowed
    prompts = random_prompts([6, 13, 20, 27], 128, seed=5)
    # 4 sequences x 3 blocks of 4 would fit; 7 blocks make them take turns
    outs = runtime.generate(path, prompts, SamplingParams(max_tokens=30, ignore_eos=True), block_size=4,
                            num_blocks=7)
    assert outs.stats["preemptions"] > 0
    for p, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(mistral, p, 30)[0]


def test_beams_and_samples_under_a_window(windowed):
    path, mistral = windowed
    prompt = random_prompts([12], 128, seed=6)[0]
    outs = runtime.generate(path, [prompt], SamplingParams(max_tokens=14, beam_width=3, ignore_eos=True),
                            block_size=4, enable_prefix_caching=False)
    with torch.no_grad():
        ref = mistral.generate(torch.tensor([prompt]), num_beams=3, num_return_sequences=3, do_sample=False,
                               max_new_tokens=14, min_new_tokens=14, length_penalty=0.0, pad_token_id=0)
    assert [c.token_ids for c in outs[0].outputs] == [s[len(prompt):].tolist() for s in ref]
    assert outs.stats["peak_blocks_per_seq"] <= window_blocks(W, 4) and outs.stats["cow_copies"] > 0
    # n = 3 seeded samples: same tokens whether or not a tiny pool forces recomputation
    params = SamplingParams(max_tokens=20, n=3, temperature=1.0, seed=9, ignore_eos=True)
    roomy = runtime.generate(path, [prompt, prompt[:5]], params, block_size=4)
    tight = runtime.generate(path, [prompt, prompt[:5]], params, block_size=4, num_blocks=3 * 3 + 3)
    assert [[c.token_ids for c in o.outputs] for o in tight] == [[c.token_ids for c in o.outputs] for o in roomy]
    assert tight.stats["peak_blocks_per_seq"] <= window_blocks(W, 4)


def test_mixed_windows_free_nothing(tmp_path):
    """Gemma 2 mixes windowed and full layers: the full ones read every block, so none is freed."""
    make_family(tmp_path, "gemma2", layers=2, sliding_window=4, head_dim=16)
    prompt = random_prompts([10], 128, seed=8)[0]
    outs = runtime.generate(tmp_path, [prompt], SamplingParams(max_tokens=12, ignore_eos=True), block_size=4)
    assert outs.stats["sliding_window"] is None and outs.stats["window_freed_blocks"] == 0
    assert outs.stats["peak_blocks_per_seq"] == -(-(10 + 11) // 4)
