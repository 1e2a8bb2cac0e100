"""Mistral, Qwen2, Qwen3 and Gemma 2 through ``runtime.generate()`` against transformers.

Each family gets a small random checkpoint written by transformers and read by the real loader.
Windows are short (8-12 tokens) and prompts plus outputs run past them (up to 41 tokens), so a
window that is ignored or off by one changes the tokens; Gemma 2's soft-caps are small enough to
bind and its query scalar differs from the head dim. ``test_each_feature_changes_the_reference``
shows that the reference really depends on each feature, so the parity tests can fail. Each
run checks which decode backend really ran (``backend="auto"`` picks the native kernel only for
head dims it serves).
"""

import pytest
import torch

import runtime
from helpers_checkpoint import FAMILY_CLASSES, hf_greedy, make_family, random_prompts
from runtime import SamplingParams

CASES = {
    "mistral": dict(sliding_window=8, head_dim=16),
    # layer 0 full, layers 1-2 windowed (max_window_layers); q/k/v biases always on
    "qwen2": dict(use_sliding_window=True, sliding_window=12, max_window_layers=1),
    # explicit head_dim != hidden / heads, q/k norms, biases on q/k/v/o
    "qwen3": dict(use_sliding_window=True, sliding_window=10, max_window_layers=1, head_dim=24,
                  attention_bias=True),
    # layers 0 and 2 windowed, layer 1 full; caps small enough to bind
    "gemma2": dict(sliding_window=8, head_dim=16, query_pre_attn_scalar=24, attn_logit_softcapping=0.5,
                   final_logit_softcapping=1.0),
}
PROMPT_LENGTHS = [3, 9, 21]
NEW = 20
# What backend="auto" decodes these fp32 CPU models with: the native C kernel where it serves the
# head dim (a multiple of 16), else torch; Qwen3's head_dim 24 is not a multiple of 16.
AUTO_BACKEND = {"mistral": "native", "qwen2": "native", "qwen3": "torch", "gemma2": "native"}


@pytest.fixture(scope="module", params=list(CASES))
def family(request, tmp_path_factory):
    """(name, folder, HF model, prompts, HF greedy (ids, logprob) per prompt)."""
    name = request.param
    path = tmp_path_factory.mktemp(name)
    hf = make_family(path, name, **CASES[name])
    prompts = random_prompts(PROMPT_LENGTHS, 128, seed=1)
    return name, path, hf, prompts, [hf_greedy(hf, p, NEW) for p in prompts]


def _assert_same(outs, refs):
    for out, (ids, logprob) in zip(outs, refs):
        assert out.outputs[0].token_ids == ids
        assert out.outputs[0].cumulative_logprob == pytest.approx(logprob, abs=1e-3)


@pytest.mark.parametrize("block_size,backend", [(4, "torch"), (16, "torch"), (4, "auto")])
def test_greedy_matches_transformers(family, block_size, backend):
    name, path, _, prompts, refs = family
    outs = runtime.generate(path, prompts, SamplingParams(max_tokens=NEW), block_size=block_size,
                            backend=backend)
    assert runtime.load_model(path, device="cpu").config.architecture == FAMILY_CLASSES[name][1]
    assert outs.stats["backend"] == (AUTO_BACKEND[name] if backend == "auto" else backend)  # what really ran
    _assert_same(outs, refs)


def test_cached_prefix_longer_than_the_window(family):
    """Prefix-cache hits: the second prompt's prefill skips 20 cached tokens (window 8-12); with
    one window on every layer (Mistral) it reads back only the blocks its window sees."""
    _, path, hf, _, _ = family
    shared = random_prompts([20], 128, seed=7)[0]
    prompts = [shared + [5, 6, 7], shared + [9, 10]]
    outs = runtime.generate(path, prompts, SamplingParams(max_tokens=12), block_size=4, max_num_seqs=1,
                            backend="torch")
    assert outs.stats["prefill_tokens_skipped"] >= 20
    # all 5 shared blocks hit; with one window on every layer (Mistral) only the 2 it still sees
    assert outs.stats["prefix_cache_hit_blocks"] == (2 if outs.stats["sliding_window"] else 5)
    _assert_same(outs, [hf_greedy(hf, p, 12) for p in prompts])


def test_bfloat16_logits_follow_transformers(family):
    """bf16 weights and activations (the unfused norm paths: Gemma's fp32 (1 + w) scale, Qwen3's q/k
    norms) agree with transformers' bf16 forward to within bf16 rounding (HF's bf16 vs fp32)."""
    import copy

    from runtime.attention import AttentionMetadata, PrefillSpan

    _, path, hf, prompts, _ = family
    model = runtime.load_model(path, device="cpu", dtype="bfloat16").model
    ids = prompts[-1]
    n = len(ids)
    cache = model.make_kv_cache(-(-n // 4), 4)
    meta = AttentionMetadata(slot_mapping=torch.arange(n), prefills=[PrefillSpan(0, n, 0, n)], num_prefill_tokens=n)
    got = model.forward(torch.tensor(ids), torch.arange(n), cache, meta, None, torch.arange(n))
    with torch.no_grad():
        ref = copy.deepcopy(hf).to(torch.bfloat16)(torch.tensor([ids])).logits[0].float()
        full = hf(torch.tensor([ids])).logits[0]
    err, bf16_err = (got - ref).abs().max(), (full - ref).abs().max()
    assert err <= 2 * bf16_err  # within bf16 rounding of HF's bf16 run (a wrong norm or scale is O(1))


FEATURE_OFF = {  # family -> config changes that switch one feature off in the reference
    "mistral": [dict(sliding_window=None)],
    "qwen2": [dict(layer_types=["full_attention"] * 3)],
    "qwen3": [dict(layer_types=["full_attention"] * 3)],
    "gemma2": [dict(layer_types=["full_attention"] * 3), dict(attn_logit_softcapping=None),
               dict(final_logit_softcapping=None), dict(query_pre_attn_scalar=16)],
}


def test_each_feature_changes_the_reference(family):
    name, path, _, prompts, refs = family
    model_cls = getattr(__import__("transformers"), FAMILY_CLASSES[name][1])
    for change in FEATURE_OFF[name]:
        other = model_cls.from_pretrained(path, **change).eval()
        got = [hf_greedy(other, p, NEW) for p in prompts[1:]]
        assert any(g[0] != r[0] or abs(g[1] - r[1]) > 1e-2 for g, r in zip(got, refs[1:])), change


class _NoFeatureDispatcher:
    """A dispatcher whose kernels lack every attention feature (an older or narrower kgen)."""

    def __init__(self):
        from kgen.dispatch import get_dispatcher

        self._real = get_dispatcher()

    def plan(self, shape):
        import dataclasses

        plan = self._real.plan(shape)
        if shape.features:
            return dataclasses.replace(
                plan, problem=f"kgen's decode kernels lack the {shape.features[0]!r} feature")
        return plan


def test_triton_backend_refuses_a_feature_its_kernels_lack_by_name():
    from runtime.attention import TritonAttention
    from runtime.config import LayerAttention

    layers = [LayerAttention(0.1), LayerAttention(0.1, sliding_window=8),
              LayerAttention(0.1, logits_soft_cap=50.0)]
    with pytest.raises(ValueError, match=r"backend='triton' cannot run layer 1 \(sliding_window=8, "
                                         r"logits_soft_cap=None\): .*'sliding_window'.*use backend='torch'"):
        TritonAttention(16, 2, 4, 64, torch.float32, torch.device("cpu"), layers=layers,
                     dispatcher=_NoFeatureDispatcher())
    with pytest.raises(ValueError, match=r"cannot run layer 1 .*logits_soft_cap=50.0.*'soft_cap'"):
        TritonAttention(16, 2, 4, 64, torch.float32, torch.device("cpu"), layers=layers[::2],
                     dispatcher=_NoFeatureDispatcher())
    ok = TritonAttention(16, 2, 4, 64, torch.float32, torch.device("cpu"), layers=layers)
    assert list(ok.plans) == [(), ("sliding_window",), ("soft_cap",)]


@pytest.mark.parametrize("name,features,config", [
    ("mistral", ("sliding_window",), dict(sliding_window=8)),
    ("gemma2", ("sliding_window", "soft_cap"), dict(sliding_window=8, head_dim=64, query_pre_attn_scalar=48,
                                                     attn_logit_softcapping=0.5, final_logit_softcapping=1.0)),
])
def test_triton_backend_matches_transformers_with_features(tmp_path, name, features, config):
    """kgen's feature kernels decode windowed / soft-capped families; the interpreter on a CPU."""
    hf = make_family(tmp_path, name, hidden=128, heads=2, kv_heads=1, layers=2, **config)
    prompts = random_prompts([5, 11], 128, seed=2)
    outs = runtime.generate(tmp_path, prompts, SamplingParams(max_tokens=10), block_size=16, backend="triton")
    assert outs.stats["backend"] == "triton"
    _assert_same(outs, [hf_greedy(hf, p, 10) for p in prompts])
