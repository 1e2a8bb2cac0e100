"""Attention features (fp8 KV, sliding window, soft cap, ALiBi, sinks) against the float64 reference.

The matrix is pairwise, not the full product: the 18 rows of the orthogonal array L18 (2^1 x 3^7)
give every pair of values of sliding window x query dtype x KV dtype x split-K (1, n, auto) x scale
form (float, one-element tensor, per-KV-head tensor) x soft cap x ALiBi x sinks at least once
(checked below), plus 3 rows with all four features on. Head dims and block sizes cycle through
every value (3 times each), group sizes through 1..16. Each case has random data, ragged lengths
at page edges and at the window's edges (W - 1, W, W + 1), sequences shorter than the window and
one with many pages before it, permuted and shared blocks, garbage (out-of-range) table entries
past each sequence and before each window, NaN in every cache slot no query may read, and NaN in
``out`` before the call; every 3rd case uses strided query / caches / out, every 4th strided
seq_lens / block_tables. ``validate=True`` throughout.
"""

import itertools

import pytest
import torch

from helpers_kernels import L18, make_strided
from kgen.build import load_kernel
from kgen.features import FEATURES
from kgen.reference import (TOLERANCES, make_paged_inputs, max_abs_error,
                            paged_attention_reference, within_tolerance)
from kgen.space import default_config, is_pruned
from kgen.variant import BLOCK_SIZES, HEAD_DIMS, SPLIT_AUTO, VariantConfig

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = ("fp16", "bf16", "fp32")
KV_DTYPES = ("auto", "fp8_e4m3", "fp8_e5m2")
SPLITS = (1, 3, SPLIT_AUTO)
SCALE_KINDS = ("float", "tensor", "head")
ALL_ON = (  # (dtype, kv dtype, split, scale form, group) with every feature on
    ("bf16", "fp8_e4m3", SPLIT_AUTO, "head", 16),
    ("fp32", "fp8_e5m2", 1, "tensor", 5),
    ("fp16", "auto", 4, None, 12),
)


def _rows():
    for row in L18:
        a = [int(c) for c in row]
        feats = [f for f, on in zip(FEATURES, (a[0] == 2, a[5] > 1, a[6] > 1, a[7] > 1)) if on]
        yield DTYPES[a[1] - 1], KV_DTYPES[a[2] - 1], SPLITS[a[3] - 1], SCALE_KINDS[a[4] - 1], feats, None
    for dtype, kv, split, scales, group in ALL_ON:
        yield dtype, kv, split, scales, list(FEATURES), group


def _case(i, row):
    dtype, kv, split, scales, feats, group = row
    group = group or (1, 2, 4, 8, 3, 6, 7, 1, 16, 2, 4, 13, 8, 1, 9, 4, 10, 11)[i]
    config = default_config(head_dim=HEAD_DIMS[i % 7], block_size=BLOCK_SIZES[(3 * i) % 7],
                            group_size=group, dtype=dtype, split_k=split, kv_dtype=kv,
                            features=feats)
    if i % 2:  # also tiles other than the default, the nearest one inside the pruned space
        wanted = (128, 16, 32)[i % 3]
        tiles = sorted((16, 32, 64, 128, 256), key=lambda t: (abs(t - wanted), t))
        config = next(c for c in (config.replace(tile_tokens=t) for t in tiles) if not is_pruned(c))
    return config, (scales if kv != "auto" else None)


CASES = [_case(i, row) for i, row in enumerate(_rows())]


def _window(config: VariantConfig, i: int):
    """Unaligned, page-aligned, one tile + 1, and 1 token, in turn (None without the feature)."""
    if not config.has("sliding_window"):
        return None
    bs, tile = config.block_size, config.tile_tokens
    return (bs + 3, 2 * bs, tile + 1, 1)[i % 4]


def _lengths(config: VariantConfig, window) -> list[int]:
    bs, tile = config.block_size, config.tile_tokens
    splits = config.split_k if config.split_k > 1 else 3
    long = tile * (2 * splits + 1) + 5  # several tiles per partition
    lens = {0, 1, max(bs - 1, 2), bs, bs + 1, long}
    if window:  # window edges, shorter than the window, many pages before it
        lens |= {max(window - 1, 1), window, window + 1, window + 2 * max(bs, tile) + 7}
    return sorted(lens)


def _num_kv_heads(config: VariantConfig) -> int:
    return 1 if config.group_size > 4 else 2


def run_case(config, lens, *, seed, scales=None, window=None, noncontig=False, index_views=False,
             **call):
    """The kernel's output (NaN-poisoned first) and the float64 reference on the same inputs."""
    kv_heads = _num_kv_heads(config)
    inputs = make_paged_inputs(len(lens), kv_heads * config.group_size, kv_heads, config.head_dim,
                               config.block_size, lens, config.dtype, seed=seed, device=DEVICE,
                               poison_unused=True, kv_dtype=config.kv_dtype, scale_kind=scales,
                               features=config.features, sliding_window=window)
    ref = paged_attention_reference(**inputs)
    out = make_strided(inputs, torch.full_like(inputs["query"], float("nan")), noncontig=noncontig,
                       index_views=index_views)
    result = load_kernel(config).paged_attention_decode(**inputs, out=out, validate=True, **call)
    assert result is out
    return out, ref, inputs


@pytest.mark.parametrize("index", range(len(CASES)), ids=lambda i: CASES[i][0].key)
def test_feature_matrix_matches_reference(index):
    config, scales = CASES[index]
    window = _window(config, index)
    lens = _lengths(config, window)
    out, ref, inputs = run_case(config, lens, seed=100 + index, scales=scales, window=window,
                                noncontig=index % 3 == 2, index_views=index % 4 == 3)
    err = max_abs_error(out, ref)
    assert within_tolerance(out, ref, config.dtype), f"max abs err {err} > {TOLERANCES[config.dtype]}"
    assert torch.all(out[lens.index(0)] == 0), "an empty context must give exact zeros"
    if window:  # the test really has garbage ids before some window, where validate looks away
        tables, num_blocks = inputs["block_tables"], inputs["key_cache"].shape[0]
        before = [tables[s, : max(0, n - window) // config.block_size] for s, n in enumerate(lens)]
        assert any(bool(((b < 0) | (b >= num_blocks)).any()) for b in before)


def test_matrix_covers_every_pair_of_feature_axes():
    def factors(config, scales):
        return (config.has("sliding_window"), config.dtype, config.kv_dtype, config.split_k,
                scales, config.has("soft_cap"), config.has("alibi"), config.has("sinks"))

    rows = [factors(c, s) for c, s in CASES[:18]]
    levels = [2, 3, 3, 3, 3, 2, 2, 2]
    for a, b in itertools.combinations(range(8), 2):
        pairs = {(r[a], r[b]) for r in rows if r[4] is not None or 4 not in (a, b)}
        expect = levels[a] * levels[b] if 4 not in (a, b) else None
        if expect:
            assert len(pairs) == expect, (a, b, pairs)
    fp8 = {(r[2], r[4]) for r in rows if r[2] != "auto"}
    assert fp8 == {(k, s) for k in KV_DTYPES[1:] for s in SCALE_KINDS}
    configs = [c for c, _ in CASES]
    assert all(sum(c.head_dim == d for c in configs) >= 3 for d in HEAD_DIMS)
    assert all(sum(c.block_size == b for c in configs) >= 3 for b in BLOCK_SIZES)
    assert {c.group_size for c in configs} >= {1, 2, 3, 4, 5, 8, 12, 16}
    assert sum(set(c.features) == set(FEATURES) for c in configs) >= 3
    assert not any(is_pruned(c) for c in configs)


# ---- single features, stated precisely ---------------------------------------------------------
def _plain(config: VariantConfig) -> VariantConfig:
    return config.replace(kv_dtype="auto", features=())


@pytest.mark.parametrize("split_k", [1, 4])
def test_window_longer_than_every_context_equals_no_window(split_k):
    config = VariantConfig(head_dim=64, block_size=16, group_size=2, split_k=split_k,
                           tile_tokens=16, dtype="fp32", features="sliding_window")
    lens = [0, 1, 15, 16, 17, 60]
    out, ref, inputs = run_case(config, lens, seed=3, window=61)
    plain = {k: v for k, v in inputs.items() if k != "sliding_window"}
    plain_out = load_kernel(_plain(config)).paged_attention_decode(**plain)
    assert within_tolerance(out, ref, "fp32")
    assert torch.allclose(out, plain_out, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("split_k", [1, SPLIT_AUTO])
def test_window_of_one_token_returns_the_last_value(split_k):
    config = VariantConfig(head_dim=64, block_size=8, group_size=4, split_k=split_k,
                           tile_tokens=16, dtype="fp32", kv_dtype="fp8_e5m2",
                           features="sliding_window,soft_cap,alibi")
    lens = [1, 8, 9, 50]
    out, ref, inputs = run_case(config, lens, seed=4, scales="head", window=1)
    assert within_tolerance(out, ref, "fp32")
    for s, n in enumerate(lens):  # softmax over one key is 1: out = v[last] * v_scale
        page = int(inputs["block_tables"][s, (n - 1) // 8])
        v = inputs["value_cache"][page, (n - 1) % 8].float() * inputs["v_scale"][:, None]
        assert torch.allclose(out[s], v.repeat_interleave(4, dim=0), atol=1e-6)


def test_huge_soft_cap_is_plain_attention_and_small_cap_changes_it():
    config = VariantConfig(head_dim=128, block_size=16, group_size=1, split_k=1, tile_tokens=32,
                           dtype="fp32", features="soft_cap")
    lens = [5, 40]
    inputs = make_paged_inputs(2, 2, 2, 128, 16, lens, "fp32", seed=5, features="soft_cap",
                               soft_cap=1e6)
    plain = {k: v for k, v in inputs.items() if k != "logits_soft_cap"}
    kernel = load_kernel(config).paged_attention_decode
    assert torch.allclose(kernel(**inputs), load_kernel(_plain(config)).paged_attention_decode(**plain),
                          atol=1e-5)
    inputs["logits_soft_cap"] = 0.5
    capped = kernel(**inputs)
    assert within_tolerance(capped, paged_attention_reference(**inputs), "fp32")
    assert max_abs_error(capped, paged_attention_reference(**plain)) > 1e-2


@pytest.mark.parametrize("split_k", [1, 5])
def test_sinks_only_shrink_the_output_and_an_empty_context_stays_zero(split_k):
    """out_sinks = out_plain * L / (L + exp(sink - m)): the same direction, smaller norm; the
    sink is counted once whatever the number of partitions."""
    config = VariantConfig(head_dim=64, block_size=16, group_size=2, split_k=split_k,
                           tile_tokens=16, dtype="fp32", features="sinks")
    lens = [0, 3, 33, 100]
    out, ref, inputs = run_case(config, lens, seed=6)
    assert within_tolerance(out, ref, "fp32")
    plain = load_kernel(_plain(config)).paged_attention_decode(
        **{k: v for k, v in inputs.items() if k != "sinks"})
    ratio = out[1:].norm(dim=-1) / plain[1:].norm(dim=-1)
    assert bool((ratio < 1).all()) and bool((ratio > 0).all())
    cos = torch.nn.functional.cosine_similarity(out[1:], plain[1:], dim=-1)
    assert torch.allclose(cos, torch.ones_like(cos), atol=1e-5)
    assert torch.all(out[0] == 0)


@pytest.mark.parametrize("kv_dtype", ["fp8_e4m3", "fp8_e5m2"])
def test_scale_forms_agree(kv_dtype):
    """A float, a 0-d / (1,) tensor and a per-head tensor of one value give the same output; a
    per-head scale that differs per head matches the reference; no scale means 1.0."""
    config = VariantConfig(head_dim=64, block_size=16, group_size=2, split_k=SPLIT_AUTO,
                           tile_tokens=32, dtype="fp16", kv_dtype=kv_dtype)
    inputs = make_paged_inputs(3, 4, 2, 64, 16, [7, 16, 70], "fp16", seed=8, kv_dtype=kv_dtype,
                               device=DEVICE)
    kernel = load_kernel(config).paged_attention_decode
    forms = [0.375, torch.tensor(0.375), torch.tensor([0.375]), torch.full((2,), 0.375)]
    outs = [kernel(**inputs, k_scale=f if not isinstance(f, torch.Tensor) else f.to(DEVICE),
                   v_scale=f if not isinstance(f, torch.Tensor) else f.to(DEVICE)) for f in forms]
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    assert within_tolerance(outs[0], paged_attention_reference(**inputs, k_scale=0.375,
                                                               v_scale=0.375), "fp16")
    heads = torch.tensor([0.3, 1.7], device=DEVICE)
    out = kernel(**inputs, k_scale=heads, v_scale=heads.flip(0))
    ref = paged_attention_reference(**inputs, k_scale=heads, v_scale=heads.flip(0))
    assert within_tolerance(out, ref, "fp16")
    assert max_abs_error(out, outs[0]) > 1e-2
    assert within_tolerance(kernel(**inputs), paged_attention_reference(**inputs), "fp16")


def test_window_split_auto_covers_only_the_window(monkeypatch):
    """split-K auto sizes its partitions to the window, not to the context."""
    config = VariantConfig(head_dim=64, block_size=16, group_size=1, split_k=SPLIT_AUTO,
                           tile_tokens=16, dtype="fp16", features="sliding_window")
    module = load_kernel(config)
    inputs = make_paged_inputs(1, 1, 1, 64, 16, [4000], "fp16", seed=9, features="sliding_window",
                               sliding_window=40)
    grids = []

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *a, **k: grids.append((self.name, grid))

    for name in module.KERNELS:
        monkeypatch.setattr(module, name, Recorder(name))
    module.paged_attention_decode(**inputs, max_seq_len=4000)
    # 40 tokens span at most 4 tiles of 16 (planned as window + one tile): never the 250 tiles
    # of the context; with partitions of at least 2 tiles that is 2 partitions
    assert grids[0] == ("_decode_partial_kernel", (1, 1, module.choose_num_splits(1, 1, 40 + 16)))
    assert grids[0][1][2] == 2 and module.choose_num_splits(1, 1, 4000) > 100
