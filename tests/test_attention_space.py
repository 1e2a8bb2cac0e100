"""The attention family's variant, space and rendering: keys, validation naming the field, the
default for every shape, prune rules, per-family template hashes, modules of both families."""

import ast
import dataclasses
import itertools

import pytest

from kgen import paths, render
from kgen.build import load_kernel, module_name
from kgen.families import FAMILIES, family_of, get_family
from kgen.space_attention import (AXES, attention_space_size, default_attention_config,
                                  enumerate_attention_variants, is_pruned, prune_reason)
from kgen.variant import BLOCK_SIZES, DTYPES, GROUP_SIZES, HEAD_DIMS, SPLIT_AUTO, VariantConfig
from kgen.variant_attention import AttentionVariantConfig, config_from_key

KEY = "paged_attention-d128-b16-g4-m64-sauto-t64-w4-st2-bf16"


def test_key_round_trip_family_and_suffixes():
    config = AttentionVariantConfig(head_dim=128, block_size=16, group_size=4, q_tile=64,
                                    split_k="auto", dtype="bf16")
    assert config.key == KEY and config.family == "attention" and VariantConfig().family == "decode"
    assert AttentionVariantConfig.from_key(KEY) == config == config_from_key(KEY)
    assert AttentionVariantConfig.from_dict(config.to_dict()) == config
    assert config.tokens_per_q_tile == 16 and config.split_auto
    featured = config.replace(kv_dtype="fp8_e4m3", features="sinks,sliding_window", split_k=3)
    assert featured.key == "paged_attention-d128-b16-g4-m64-s3-t64-w4-st2-bf16-kvfp8e4m3-swa-sinks"
    assert config_from_key(featured.key) == featured
    decode = "paged_decode-d128-b16-g4-s4-t64-w4-st2-bf16"
    assert config_from_key(decode) == VariantConfig.from_key(decode)
    assert list(AXES) == [f.name for f in dataclasses.fields(AttentionVariantConfig)]


@pytest.mark.parametrize("field, value", [
    ("q_tile", 8), ("q_tile", 48), ("q_tile", True), ("group_size", 17), ("head_dim", 100),
    ("block_size", 12), ("tile_tokens", 512), ("num_warps", 3), ("split_k", 257), ("dtype", "fp8"),
])
def test_bad_field_is_named(field, value):
    with pytest.raises(ValueError, match=f"{field}={value!r}"):
        AttentionVariantConfig(**{field: value})


def test_every_q_tile_holds_a_token_and_keys_must_parse():
    assert min(AXES["q_tile"]) >= max(GROUP_SIZES)  # so q_tile // group_size >= 1 always
    assert AttentionVariantConfig(group_size=16, q_tile=16).tokens_per_q_tile == 1
    assert AttentionVariantConfig(group_size=3, q_tile=16).tokens_per_q_tile == 5
    with pytest.raises(ValueError, match="names no kernel family"):
        config_from_key("paged_prefill-d128")
    with pytest.raises(ValueError, match="'paged_attention-d128' is malformed"):
        config_from_key("paged_attention-d128")
    with pytest.raises(ValueError, match="not canonical"):
        config_from_key(KEY + "-sinks-swa")


@pytest.mark.parametrize("dtype", DTYPES)
def test_default_config_is_kept_for_every_shape(dtype):
    for head_dim, block, group in itertools.product(HEAD_DIMS, BLOCK_SIZES, GROUP_SIZES):
        for kv, feats in (("auto", ()), ("fp8_e5m2", ("sliding_window", "sinks"))):
            config = default_attention_config(head_dim=head_dim, block_size=block,
                                              group_size=group, dtype=dtype, kv_dtype=kv,
                                              features=feats)
            assert not is_pruned(config) and config.split_k == SPLIT_AUTO
            assert config.features == feats


def test_prune_rules_name_the_cost():
    base = AttentionVariantConfig(head_dim=128, block_size=16, group_size=4, q_tile=64,
                                  tile_tokens=64, num_warps=4, dtype="bf16")
    assert "about 192 registers per thread for 64 rows" in prune_reason(base)
    assert prune_reason(base.replace(num_warps=8)) is None  # the same rows over more warps fit
    assert "at most 64 with 16 warps" in prune_reason(base.replace(q_tile=128, num_warps=16))
    fp32 = AttentionVariantConfig(head_dim=64, q_tile=64, tile_tokens=128, num_warps=16, dtype="fp32")
    assert "64 x 128 score tile" in prune_reason(fp32)
    assert "shared memory" in prune_reason(base.replace(tile_tokens=256, num_warps=16, num_stages=3))
    fp8 = AttentionVariantConfig(head_dim=64, tile_tokens=16, num_warps=4, kv_dtype="fp8_e5m2")
    assert "16-byte loads" in prune_reason(fp8)  # the K/V tile rules are decode's


def test_enumeration_filters_and_counts():
    configs = enumerate_attention_variants(head_dim=64, block_size=16, group_size=[3, 16],
                                           q_tile=[16, 32], dtype="fp16", split_k="auto")
    assert configs and {c.group_size for c in configs} == {3, 16}
    assert {c.q_tile for c in configs} == {16, 32} and not any(is_pruned(c) for c in configs)
    total = attention_space_size(head_dim=64, block_size=16, group_size=3, dtype="fp16")
    kept = attention_space_size(head_dim=64, block_size=16, group_size=3, dtype="fp16", prune=True)
    assert 0 < kept < total == 4 * 7 * 5 * 5 * 5
    with pytest.raises(ValueError, match="unknown filter"):
        enumerate_attention_variants(rows=4)


def test_families_table():
    assert set(FAMILIES) == {"decode", "attention"}
    assert family_of(KEY).entry_point == "paged_attention"
    assert family_of(VariantConfig()).entry_point == "paged_attention_decode"
    with pytest.raises(ValueError, match="kernel='prefill'"):
        get_family("prefill")


# ---- rendering ----------------------------------------------------------------------------------
@pytest.mark.parametrize("split_k", [1, "auto"])
def test_rendered_attention_module_is_python_with_its_kernels(split_k):
    config = AttentionVariantConfig(head_dim=80, block_size=8, group_size=3, q_tile=32,
                                    split_k=split_k, dtype="bf16", features="alibi")
    source = render.render_source(config)
    tree = ast.parse(source)
    jit = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)
           and any("jit" in ast.unparse(d) for d in n.decorator_list)}
    assert set(render.kernel_names(config)) <= jit
    assert ("_merge_kernel" in jit) == (split_k != 1)
    assert "_decode_kernel" not in jit and "_attend_tiles" not in jit  # decode's own are left out
    imports = {a.name.split(".")[0] for n in tree.body if isinstance(n, ast.Import) for a in n.names}
    assert imports == {"math", "os", "torch", "triton"}
    assert f'VARIANT_KEY = "{config.key}"' in source and "def paged_attention(" in source
    assert paths.template_hash("attention") in source and "_Q_TILE = 32" in source


def test_template_hash_per_family(tmp_path, monkeypatch):
    """Attention templates never change the decode family's hash (nor its modules' header, nor
    the provenance of its tuning records); the decode family's shared templates change both."""
    for path in paths.template_files():
        (tmp_path / path.name).write_text(path.read_text())
    monkeypatch.setattr(paths, "templates_dir", lambda: tmp_path)
    decode, attention = paths.template_hash(), paths.template_hash("attention")
    assert decode == paths.template_hash("decode") != attention
    assert not any(p.name.startswith("attention_") for p in paths.template_files("decode"))
    (tmp_path / "attention_plan.py.j2").write_text("changed")
    assert paths.template_hash() == decode and paths.template_hash("attention") != attention
    (tmp_path / "merge.py.j2").write_text("changed")
    assert paths.template_hash() != decode
    with pytest.raises(ValueError, match="family='prefill'"):
        paths.template_hash("prefill")


def test_load_kernel_takes_either_family(tmp_path):
    module = load_kernel(KEY, directory=tmp_path)
    assert load_kernel(AttentionVariantConfig.from_key(KEY)) is module
    assert module.VARIANT_KEY == KEY and module.CONFIG == AttentionVariantConfig.from_key(KEY).to_dict()
    assert module.__name__ == module_name(KEY) == "kgen_kernel_" + KEY.replace("-", "_")
    assert module.KERNELS == ("_attention_kernel", "_attention_segment_kernel", "_merge_kernel")
    assert callable(module.plan_launch) and callable(module.plan_segments)


@pytest.mark.parametrize("table_name, fields", [
    ("AUDITED_ATTENTION", ("q_tile", "tile_tokens", "num_warps", "num_stages")),
    ("AUDITED_DECODE", ("tile_tokens", "num_warps", "num_stages"))])
def test_audited_defaults_are_live_and_sound(monkeypatch, table_name, fields):
    """Every audited exception of either family is taken by its default function, is not
    pruned, and differs from what the rule alone gives (no stale entry)."""
    from kgen import space, space_audited

    attention = table_name == "AUDITED_ATTENTION"
    default = default_attention_config if attention else space.default_config
    pruned = prune_reason if attention else space.prune_reason
    table = dict(getattr(space_audited, table_name))
    assert table

    def launch(config):
        return tuple(getattr(config, f) for f in fields)

    shapes = {key: dict(head_dim=key[3], block_size=key[4], group_size=key[5], dtype=key[0],
                        kv_dtype=key[1], features=key[2]) for key in table}
    for key, kw in shapes.items():
        config = default(**kw)
        assert launch(config) == table[key] and pruned(config) is None
    monkeypatch.setattr(space_audited, table_name, {})
    for key, kw in shapes.items():
        assert launch(default(**kw)) != table[key], key
