"""VariantConfig: validation naming the bad field, the readable key, conversions."""

import re

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


def test_feature_suffixes_only_when_on_and_old_keys_unchanged():
    plain = VariantConfig(head_dim=128, block_size=16, group_size=4, split_k=4, dtype="bf16")
    assert plain.key == "paged_decode-d128-b16-g4-s4-t64-w4-st2-bf16"  # as before the new axes
    assert plain.to_dict() == {"head_dim": 128, "block_size": 16, "group_size": 4, "split_k": 4,
                               "tile_tokens": 64, "num_warps": 4, "num_stages": 2, "dtype": "bf16"}
    assert plain.plain and not plain.kv_fp8
    featured = plain.replace(kv_dtype="fp8_e4m3", features=["soft_cap", "sliding_window"])
    assert featured.key == "paged_decode-d128-b16-g4-s4-t64-w4-st2-bf16-kvfp8e4m3-swa-cap"
    assert featured.features == ("sliding_window", "soft_cap")  # canonical order
    assert VariantConfig.from_key(featured.key) == featured
    assert VariantConfig.from_dict(featured.to_dict()) == featured
    every = plain.replace(kv_dtype=torch_name("float8_e5m2"), features="alibi,sinks,swa,cap")
    assert every.key.endswith("-bf16-kvfp8e5m2-swa-cap-alibi-sinks")
    assert VariantConfig.from_key(every.key) == every and every.has("sinks")
    assert plain.replace(features="none") == plain == plain.replace(kv_dtype="auto", features=())


def torch_name(name):
    import torch

    return getattr(torch, name)


@pytest.mark.parametrize("field, value, message", [
    ("kv_dtype", "fp4", "kv_dtype='fp4' is not supported; use one of auto, fp8, fp8_e4m3, fp8_e5m2"),
    ("features", "sliding_window,rope", "'rope' is not a feature"),
    ("features", 7, "features=7 is not a feature name"),
    ("features", [None], "None is not a feature name"),
    ("features", "none,alibi", "'none' means no feature, yet alibi is given too"),  # was read as alibi
    ("features", ["plain", "sinks"], "'plain' means no feature, yet sinks is given too"),
])
def test_bad_feature_axis_is_named(field, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        VariantConfig(**{field: value})


def test_feature_keys_must_be_canonical():
    with pytest.raises(ValueError, match="not canonical.*did you mean '.*-fp16-swa-cap'"):
        VariantConfig.from_key("paged_decode-d64-b16-g1-s1-t64-w4-st2-fp16-cap-swa")
    with pytest.raises(ValueError, match="not canonical"):
        VariantConfig.from_key("paged_decode-d64-b16-g1-s1-t64-w4-st2-fp16-swa-swa")
    with pytest.raises(ValueError, match="malformed"):
        VariantConfig.from_key("paged_decode-d64-b16-g1-s1-t64-w4-st2-fp16-rope")
