"""VariantConfig: validation naming the bad field, the readable key, conversions."""

import pytest

from kgen.variant import SPLIT_AUTO, VariantConfig


def test_key_round_trip_and_format():
    config = VariantConfig(head_dim=128, block_size=16, group_size=4, split_k=4, tile_tokens=64,
                           num_warps=4, num_stages=2, dtype="bf16")
    assert config.key == "paged_decode-d128-b16-g4-s4-t64-w4-st2-bf16"
    assert VariantConfig.from_key(config.key) == config
    auto = config.replace(split_k="auto")
    assert auto.split_k == SPLIT_AUTO and auto.split_auto and "-sauto-" in auto.key
    assert VariantConfig.from_key(auto.key) == auto
    assert VariantConfig.from_dict(config.to_dict()) == config
    assert hash(config) == hash(VariantConfig.from_key(config.key))


@pytest.mark.parametrize("dtype", ["bfloat16", "torch.bfloat16", "BF16"])
def test_dtype_aliases(dtype):
    assert VariantConfig(dtype=dtype).dtype == "bf16"


@pytest.mark.parametrize("field, value", [
    ("head_dim", 100), ("block_size", 12), ("group_size", 17), ("group_size", 0),
    ("tile_tokens", 8), ("num_warps", 3), ("num_stages", 0), ("head_dim", True),
    ("split_k", 257), ("split_k", -1), ("dtype", "fp8"),
])
def test_bad_field_is_named(field, value):
    with pytest.raises(ValueError, match=f"{field}={value!r}"):
        VariantConfig(**{field: value})


def test_malformed_key_and_unknown_fields():
    with pytest.raises(ValueError, match="'paged_decode-d128' is malformed"):
        VariantConfig.from_key("paged_decode-d128")
    with pytest.raises(ValueError, match="head_dim=100"):
        VariantConfig.from_key("paged_decode-d100-b16-g4-s4-t64-w4-st2-bf16")
    with pytest.raises(ValueError, match="unknown variant field"):
        VariantConfig.from_dict({"head_dim": 64, "heads": 2})
    with pytest.raises(ValueError, match="split_k='two'"):
        VariantConfig(split_k="two")


def test_frozen():
    with pytest.raises(AttributeError):
        VariantConfig().head_dim = 64
