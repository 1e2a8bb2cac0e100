"""Generated kernels against the float64 reference (Triton interpreter on CPU, compiled on GPU).

A covering design rather than the full product: 56 cases in which every block size and every head
dim appears 8 times, group sizes 1, 3, 4, 8 about 13 times each (5, 6, 7, 12, 16 once), split-K 1, 2, 4 and
auto, every dtype about 19 times, tile sizes both below and above the block size. Each case has
lengths 0, 1, bs - 1, bs, bs + 1 and one spanning several partitions, permuted physical blocks,
blocks shared between sequences, garbage table entries past each sequence's end, NaN in every
cache slot no sequence uses, and NaN in ``out`` before the call. Every 4th case uses strided
(non-contiguous) query, caches and out.

Tolerances (|out - ref| <= atol + rtol * |ref|, from kgen.reference.TOLERANCES):
fp16 4e-3 + 4e-3|ref|, bf16 3e-2 + 2e-2|ref|, fp32 2e-5 + 2e-5|ref|.
"""

import pytest
import torch

from helpers_kernels import strided, strided_index_view
from kgen.build import load_kernel
from kgen.reference import (TOLERANCES, make_paged_inputs, max_abs_error,
                            paged_attention_reference, within_tolerance)
from kgen.space import is_pruned
from kgen.variant import BLOCK_SIZES, HEAD_DIMS, SPLIT_AUTO, VariantConfig

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SPLITS = (1, 2, SPLIT_AUTO, 1, 4)
GROUPS = (1, 3, 4, 8)
RARE_GROUPS = {5: 5, 18: 6, 31: 7, 44: 12, 50: 16}  # case index -> group size
TILES = (16, 32, 64, 128, 256)


def _case(i: int) -> VariantConfig:
    block = BLOCK_SIZES[i % 7]
    head_dim = HEAD_DIMS[(i + i // 7) % 7]
    group = RARE_GROUPS.get(i, GROUPS[i % 4])
    dtype = ("fp16", "bf16", "fp32")[i % 3]
    tile = TILES[(i * 2 + i // 5) % 5]
    config = VariantConfig(head_dim=head_dim, block_size=block, group_size=group,
                           split_k=SPLITS[i % 5], tile_tokens=tile, num_warps=4, num_stages=2,
                           dtype=dtype)
    while is_pruned(config) and config.tile_tokens > 16:  # stay inside the pruned space
        config = config.replace(tile_tokens=config.tile_tokens // 2)
    return config


CASES = [_case(i) for i in range(56)]


def _lengths(config: VariantConfig) -> list[int]:
    bs = config.block_size
    splits = config.split_k if config.split_k > 1 else 3
    long = config.tile_tokens * (2 * splits + 1) + 5  # several tiles per partition
    return sorted({0, 1, max(bs - 1, 2), bs, bs + 1, long})


def _run(config: VariantConfig, lens, *, seed, noncontig=False, num_kv_heads=None, **kwargs):
    num_kv_heads = num_kv_heads or (1 if config.group_size > 4 else 2)
    inputs = make_paged_inputs(len(lens), num_kv_heads * config.group_size, num_kv_heads,
                               config.head_dim, config.block_size, lens, config.dtype, seed=seed,
                               device=DEVICE, poison_unused=True)
    out = torch.full_like(inputs["query"], float("nan"))
    if noncontig:
        for name in ("query", "key_cache", "value_cache"):
            inputs[name] = strided(inputs[name])
        out = strided(out)
        assert not inputs["key_cache"].is_contiguous() and not out.is_contiguous()
    result = load_kernel(config).paged_attention_decode(**inputs, out=out, validate=True, **kwargs)
    assert result is out
    return out, paged_attention_reference(**inputs)


@pytest.mark.parametrize("config", CASES, ids=lambda c: c.key)
def test_kernel_matches_reference(config):
    i = CASES.index(config)
    lens = _lengths(config)
    out, ref = _run(config, lens, seed=i, noncontig=i % 4 == 3)
    err = max_abs_error(out, ref)
    assert within_tolerance(out, ref, config.dtype), f"max abs err {err} > {TOLERANCES[config.dtype]}"
    assert torch.all(out[lens.index(0)] == 0), "an empty context must give exact zeros"


def test_covering_design_hits_every_axis_value_several_times():
    def count(field, value):
        return sum(getattr(c, field) == value for c in CASES)

    assert all(count("block_size", b) >= 8 for b in BLOCK_SIZES)
    assert all(count("head_dim", d) >= 8 for d in HEAD_DIMS)
    assert all(count("group_size", g) >= 10 for g in GROUPS)
    assert all(count("group_size", g) >= 1 for g in (5, 6, 7, 12, 16))
    assert all(count("dtype", d) >= 15 for d in ("fp16", "bf16", "fp32"))
    assert all(count("split_k", s) >= 8 for s in (1, 2, 4, SPLIT_AUTO))
    assert count("tile_tokens", 16) >= 3 and count("tile_tokens", 128) >= 3
    assert any(c.block_size > c.tile_tokens for c in CASES)
    assert any(c.block_size < c.tile_tokens for c in CASES)
    assert not any(is_pruned(c) for c in CASES)


@pytest.mark.parametrize("num_splits", [1, 3, 16, 21, 37])  # the merge reads 16 per step
def test_num_splits_override_gives_same_result(num_splits):
    config = VariantConfig(head_dim=64, block_size=8, group_size=2, split_k=SPLIT_AUTO,
                           tile_tokens=16, dtype="fp32")
    lens = [0, 5, 77, 160]
    out, ref = _run(config, lens, seed=7, num_splits=num_splits, max_seq_len=160)
    assert within_tolerance(out, ref, "fp32"), max_abs_error(out, ref)


def test_more_partitions_than_tiles_is_harmless():
    """Partitions past a short sequence's tiles write m=-inf, l=0; the merge must ignore them."""
    config = VariantConfig(head_dim=64, block_size=16, group_size=1, split_k=32, tile_tokens=16,
                           dtype="fp16")
    out, ref = _run(config, [0, 1, 17, 40], seed=3)
    assert within_tolerance(out, ref, "fp16"), max_abs_error(out, ref)


def test_scale_and_in_place_out():
    config = VariantConfig(head_dim=96, block_size=32, group_size=4, split_k=1, tile_tokens=32,
                           dtype="fp32")
    inputs = make_paged_inputs(3, 8, 2, 96, 32, [3, 40, 64], "fp32", seed=11, device=DEVICE)
    inputs["scale"] = 0.3
    out = torch.full_like(inputs["query"], float("nan"))
    module = load_kernel(config)
    module.paged_attention_decode(**inputs, out=out)
    ref = paged_attention_reference(**inputs)
    assert within_tolerance(out, ref, "fp32")
    default_scale = paged_attention_reference(**{**inputs, "scale": None})
    assert max_abs_error(ref, default_scale) > 1e-3  # the scale really changed the result
    fresh = module.paged_attention_decode(**inputs)  # allocates out when not given
    assert torch.equal(fresh, out)


def test_empty_batch_returns_empty_out():
    config = VariantConfig(head_dim=64, block_size=16, group_size=1, split_k=2, dtype="fp16")
    inputs = make_paged_inputs(0, 2, 2, 64, 16, [], "fp16", seed=0, device=DEVICE)
    out = load_kernel(config).paged_attention_decode(**inputs)
    assert out.shape == (0, 2, 64)


@pytest.mark.parametrize("split_k", [1, 4])
def test_strided_seq_lens_and_block_tables_are_honoured(split_k):
    """Views with non-unit strides (issue 8: seq_lens' stride was ignored, max error 1.19): the
    elements between the view's hold a short valid length / a valid but wrong block id, so a
    kernel that ignores a stride gives a wrong result rather than a crash."""
    config = VariantConfig(head_dim=64, block_size=8, group_size=2, split_k=split_k,
                           tile_tokens=16, dtype="fp32")
    lens = [9, 0, 33, 70]
    inputs = make_paged_inputs(4, 4, 2, 64, 8, lens, "fp32", seed=21, device=DEVICE,
                               poison_unused=True)
    ref = paged_attention_reference(**inputs)
    inputs["seq_lens"] = strided_index_view(inputs["seq_lens"], garbage=5)
    inputs["block_tables"] = strided_index_view(inputs["block_tables"], garbage=0)
    out = torch.full_like(inputs["query"], float("nan"))
    load_kernel(config).paged_attention_decode(**inputs, out=out, validate=True)
    assert within_tolerance(out, ref, "fp32"), max_abs_error(out, ref)
