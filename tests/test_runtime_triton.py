"""kgen as the runtime's whole attention: with the triton backend every row of every step (prefill
chunks, prefix-cache extends, decodes) runs through one kgen launch per layer, read from the
cache in place, and generate() matches transformers (the interpreter on a CPU)."""

import pytest
import torch

import runtime
import runtime.attention as attention
from helpers_checkpoint import hf_greedy, make_family, make_llama, random_prompts
from runtime import SamplingParams
from runtime.engine import Engine
from runtime.kv_cache import LayerKV

NEW = 6


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A 2-layer GQA Llama, prompts that share a 32-token prefix (two whole blocks of 16) and
    ones that do not, and HF's greedy tokens and logprobs for each."""
    path = tmp_path_factory.mktemp("llama")
    hf = make_llama(path, hidden=128, heads=4, kv_heads=2, head_dim=64, layers=2, vocab=128, seed=7)
    shared = random_prompts([32], 128, seed=8)[0]
    prompts = [shared + p for p in random_prompts([3, 9], 128, seed=9)] + random_prompts([1, 17, 40], 128, seed=10)
    return path, prompts, [hf_greedy(hf, p, NEW) for p in prompts]


class _Counts:
    """Counts what must not run with the triton backend: SDPA (torch's, and the soft-cap form)
    and reads of a cached prefix back out of the cache."""

    def __init__(self, monkeypatch):
        self.sdpa = self.gathers = 0
        real_sdpa, real_attend, real_read = (torch.nn.functional.scaled_dot_product_attention,
                                             attention.attend, LayerKV.read)

        def sdpa(*a, **k):
            self.sdpa += 1
            return real_sdpa(*a, **k)

        def attend(*a, **k):
            self.sdpa += 1
            return real_attend(*a, **k)

        def read(*a, **k):
            self.gathers += 1
            return real_read(*a, **k)

        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", sdpa)
        monkeypatch.setattr(attention, "attend", attend)
        monkeypatch.setattr(LayerKV, "read", read)


def _assert_matches(outs, refs):
    for out, (ref_ids, ref_logprob) in zip(outs, refs):
        assert out.outputs[0].token_ids == ref_ids
        assert out.outputs[0].cumulative_logprob == pytest.approx(ref_logprob, abs=1e-3)


def _generate(path, prompts, **options):
    engine_stats = {}
    real_step = Engine.step

    def step(self):
        engine_stats["engine"] = self
        return real_step(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Engine, "step", step)
        outs = runtime.generate(path, prompts, SamplingParams(max_tokens=NEW), backend="triton",
                                **{"block_size": 16, **options})
    return outs, engine_stats["engine"]


def test_every_row_runs_through_kgen_and_matches_transformers(llama, monkeypatch):
    """Prefills (two of them extending a prefix cached by an earlier request), and decodes: no
    SDPA call, no gather of a cached prefix, one kgen launch per layer per step."""
    path, prompts, refs = llama
    counts = _Counts(monkeypatch)
    first, _ = _generate(path, prompts[:1])  # caches the shared prefix's blocks
    outs, engine = _generate(path, prompts, max_num_seqs=8)
    _assert_matches(first, refs[:1])
    _assert_matches(outs, refs)
    assert counts.sdpa == 0 and counts.gathers == 0
    stats = outs.stats
    assert stats["backend"] == "triton" and stats["prefix_cache_hit_blocks"] == 0  # a fresh engine
    steps = stats["num_steps"]
    assert engine.backend.launches == steps * 2  # 2 layers, one launch each per step


def test_prefix_cache_hits_are_extends_over_the_cache(llama, monkeypatch):
    """Within one engine the second request with the shared prefix is admitted after the first
    has computed it: its prefill runs only its own tokens over the cached blocks."""
    path, prompts, refs = llama
    counts = _Counts(monkeypatch)
    outs, engine = _generate(path, prompts[:2], max_num_seqs=1)  # one at a time: the 2nd hits
    _assert_matches(outs, refs[:2])
    assert outs.stats["prefix_cache_hit_blocks"] >= 2 and outs.stats["prefill_tokens_skipped"] >= 32
    assert counts.sdpa == 0 and counts.gathers == 0


def test_a_tight_pool_preempts_and_chunked_prefill_keeps_the_tokens(llama, monkeypatch):
    path, prompts, refs = llama
    counts = _Counts(monkeypatch)
    tight, _ = _generate(path, prompts, block_size=8, num_blocks=8, enable_prefix_caching=False)
    assert tight.stats["preemptions"] > 0
    _assert_matches(tight, refs)
    chunked, _ = _generate(path, prompts, max_num_seqs=4, max_num_batched_tokens=12)
    assert chunked.stats["partial_prefill_chunks"] > 0
    _assert_matches(chunked, refs)
    assert counts.sdpa == 0 and counts.gathers == 0


@pytest.mark.parametrize("name,config", [
    ("mistral", dict(sliding_window=8)),
    ("gemma2", dict(sliding_window=8, head_dim=64, query_pre_attn_scalar=48, attn_logit_softcapping=0.5,
                    final_logit_softcapping=1.0)),
])
def test_windows_and_soft_caps_run_through_kgen_with_chunks(tmp_path, name, config, monkeypatch):
    """Windowed prompts longer than the window, prefilled in chunks across steps over the cache
    (every prompt position is stored; out-of-window blocks are freed once it decodes)."""
    hf = make_family(tmp_path, name, hidden=128, heads=2, kv_heads=1, layers=2, **config)
    prompts = random_prompts([5, 11, 30], 128, seed=2)
    refs = [hf_greedy(hf, p, 10) for p in prompts]
    counts = _Counts(monkeypatch)
    outs = runtime.generate(tmp_path, prompts, SamplingParams(max_tokens=10), block_size=8,
                            backend="triton", max_num_seqs=3, max_num_batched_tokens=9)
    assert outs.stats["backend"] == "triton" and outs.stats["partial_prefill_chunks"] > 0
    _assert_matches(outs, refs)
    assert counts.sdpa == 0 and counts.gathers == 0
    if name == "mistral":  # every layer windowed: blocks slide out and are freed
        assert outs.stats["window_freed_blocks"] > 0
