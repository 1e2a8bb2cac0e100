"""The variant space: axes, prune rules, the default heuristic, enumeration with filters."""

import dataclasses
import itertools

import pytest

from kgen import space
from kgen.variant import (BLOCK_SIZES, DTYPES, GROUP_SIZES, HEAD_DIMS, SPLIT_AUTO, VariantConfig)


def test_axes_cover_the_issue_space():
    assert space.AXES["block_size"] == (1, 8, 16, 32, 64, 128, 256)
    assert space.AXES["head_dim"] == (64, 80, 96, 112, 128, 192, 256)
    assert space.AXES["group_size"] == tuple(range(1, 17))
    assert 1 in space.AXES["split_k"] and SPLIT_AUTO in space.AXES["split_k"]
    assert list(space.AXES) == [f.name for f in dataclasses.fields(VariantConfig)]
    assert space.AXES["kv_dtype"] == ("auto", "fp8_e4m3", "fp8_e5m2")
    assert len(space.AXES["features"]) == 16 and space.AXES["features"][0] == ()


def test_paddings():
    assert [space.padded_head_dim(d) for d in HEAD_DIMS] == [64, 128, 128, 128, 128, 256, 256]
    assert [space.padded_group(g) for g in (1, 3, 16)] == [16, 16, 16]
    assert space.next_pow2(17) == 32


@pytest.mark.parametrize("dtype", DTYPES)
def test_default_config_is_valid_and_kept_for_every_shape(dtype):
    for head_dim, block, group in itertools.product(HEAD_DIMS, BLOCK_SIZES, GROUP_SIZES):
        for split in (1, "auto", 4):
            config = space.default_config(head_dim=head_dim, block_size=block, group_size=group,
                                          dtype=dtype, split_k=split)
            assert (config.head_dim, config.block_size, config.group_size) == (head_dim, block, group)
            assert space.prune_reason(config) is None, config.key


def test_default_config_rejects_bad_shape():
    with pytest.raises(ValueError, match="block_size=12"):
        space.default_config(head_dim=128, block_size=12, group_size=1, dtype="fp16")


def test_prune_rules_are_pure_and_explain():
    big = VariantConfig(head_dim=256, tile_tokens=256, num_stages=2, num_warps=8, dtype="fp32")
    assert "shared memory" in space.prune_smem(big)
    assert space.prune_smem(big) == space.prune_smem(VariantConfig.from_key(big.key))
    spill = VariantConfig(head_dim=256, tile_tokens=128, num_warps=1, num_stages=1)
    assert "spill" in space.prune_registers(spill)
    starve = VariantConfig(head_dim=64, tile_tokens=16, num_warps=16, num_stages=1)
    assert "too few" in space.prune_registers(starve)
    assert space.prune_reason(VariantConfig()) is None


def test_enumerate_with_filters():
    found = space.enumerate_variants(head_dim=128, block_size=16, group_size=[1, 4],
                                     split_k=["auto", 1], dtype="bfloat16")
    assert found and len(found) == len(set(found))
    assert {c.group_size for c in found} == {1, 4} and {c.split_k for c in found} == {0, 1}
    assert all(c.dtype == "bf16" and not space.is_pruned(c) for c in found)
    everything = space.enumerate_variants(prune=False, head_dim=128, block_size=16,
                                          group_size=[1, 4], split_k=["auto", 1], dtype="bf16")
    assert len(everything) == space.space_size(head_dim=128, block_size=16, group_size=[1, 4],
                                               split_k=["auto", 1], dtype="bf16") > len(found)
    assert set(found) < set(everything)


def test_enumerate_rejects_bad_filters():
    with pytest.raises(ValueError, match="unknown filter"):
        space.enumerate_variants(heads=4)
    with pytest.raises(ValueError, match="head_dim=100 is not in the space"):
        space.enumerate_variants(head_dim=100)
    with pytest.raises(ValueError, match="split_k=3 is not in the space"):
        space.enumerate_variants(split_k=3)


def test_unfiltered_space_is_the_plain_space_and_filters_reach_features():
    plain = space.enumerate_variants(head_dim=64, block_size=16, group_size=1, split_k=1)
    assert plain and all(c.plain for c in plain)
    both = space.enumerate_variants(head_dim=64, block_size=16, group_size=1, split_k=1,
                                    kv_dtype=["auto", "fp8_e5m2"], features="sliding_window,sinks")
    assert {c.kv_dtype for c in both} == {"auto", "fp8_e5m2"}
    assert {c.features for c in both} == {("sliding_window", "sinks")}
    sets = space.enumerate_variants(head_dim=64, block_size=16, group_size=1, split_k=1,
                                    features=[(), ("alibi",)])
    assert {c.features for c in sets} == {(), ("alibi",)}


def test_fp8_prune_rules_name_their_reason():
    # fp8 tiles need 16 elements per thread for one 16-byte load; 16-bit tiles need 8
    thin = VariantConfig(head_dim=64, tile_tokens=16, num_warps=4, dtype="fp16")
    assert space.prune_registers(thin) is None
    assert "too few for 16-byte loads" in space.prune_registers(thin.replace(kv_dtype="fp8_e4m3"))
    # shared memory counts the tile in the cache's element type: fp8 halves it
    wide = VariantConfig(head_dim=256, tile_tokens=128, num_warps=8, num_stages=2, dtype="bf16")
    assert "shared memory" in space.prune_smem(wide)
    assert space.prune_smem(wide.replace(kv_dtype="fp8_e5m2")) is None
    # fp32 queries over a pipelined fp8 tile at head dims >= 128 spill (the audit): one stage only
    fp32 = VariantConfig(head_dim=128, tile_tokens=32, num_warps=8, num_stages=2, dtype="fp32",
                         kv_dtype="fp8_e5m2")
    assert "num_stages=2" in space.prune_fp32_fp8_stages(fp32)
    assert space.prune_fp32_fp8_stages(fp32.replace(num_stages=1)) is None
    assert space.prune_fp32_fp8_stages(fp32.replace(head_dim=64)) is None
    assert space.prune_fp32_fp8_stages(fp32.replace(kv_dtype="auto")) is None
    e4m3 = VariantConfig(kv_dtype="fp8_e4m3")
    assert "sm_89" in space.target_prune_reason(e4m3, "sm_80")
    assert space.target_prune_reason(e4m3, "sm_90") is None
    assert space.target_prune_reason(e4m3.replace(kv_dtype="fp8_e5m2"), "80") is None
    with pytest.raises(ValueError, match="target='gfx90a'"):
        space.target_prune_reason(e4m3, "gfx90a")


@pytest.mark.parametrize("kv_dtype", ["fp8_e4m3", "fp8_e5m2"])
def test_fp8_default_config_is_kept_for_every_shape(kv_dtype):
    for dtype, head_dim, block in itertools.product(DTYPES, HEAD_DIMS, BLOCK_SIZES):
        config = space.default_config(head_dim=head_dim, block_size=block, group_size=4,
                                      dtype=dtype, kv_dtype=kv_dtype,
                                      features=("sliding_window", "soft_cap", "alibi", "sinks"))
        assert config.kv_dtype == kv_dtype and len(config.features) == 4
        assert space.prune_reason(config) is None, config.key
