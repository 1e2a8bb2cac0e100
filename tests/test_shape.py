"""AttentionShape: normalised once, one KV dtype vocabulary everywhere, one e4m3 rule, light imports."""

import subprocess
import sys

import pytest
import torch

from kgen.dtypes import FP8_E4M3_MIN_CC, KV_DTYPE_SPELLINGS, normalize_kv_dtype
from kgen.shape import CAPABILITIES, AttentionShape
from kgen.space import target_prune_reason
from kgen.variant import VariantConfig
from kgen.workload import Workload


def test_a_shape_is_normalised_once_and_hashable():
    a = AttentionShape(torch.bfloat16, 128, 4, kv_dtype=torch.float8_e4m3fn,
                       features="soft_cap, sliding_window")
    b = AttentionShape("bf16", 128, 4, kv_dtype="fp8", features=["sliding_window", "soft_cap"])
    assert a == b and hash(a) == hash(b) and {a: 1}[b] == 1
    assert (a.dtype, a.kv_dtype, a.features) == ("bf16", "fp8_e4m3", ("sliding_window", "soft_cap"))
    assert a.key == "bf16-d128-g4-b?-kvfp8e4m3-swa-cap"
    assert a.with_block_size(16).key == "bf16-d128-g4-b16-kvfp8e4m3-swa-cap"
    assert AttentionShape.from_heads(dtype="fp16", head_dim=64, num_heads=32, num_kv_heads=8).group_size == 4


@pytest.mark.parametrize("kwargs,needle", [
    (dict(dtype="int8", head_dim=64), "dtype='int8'"),
    (dict(dtype="fp16", head_dim=0), "head_dim=0"),
    (dict(dtype="fp16", head_dim=64, group_size=True), "group_size=True"),
    (dict(dtype="fp16", head_dim=64, block_size=-16), "block_size=-16"),
    (dict(dtype="fp16", head_dim=64, kv_dtype="e4m3"), "kv_dtype='e4m3'"),
    (dict(dtype="fp16", head_dim=64, features="none,alibi,rope"), "'rope' is not a feature"),
])
def test_a_malformed_shape_is_a_value_error_naming_the_field(kwargs, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(")):
        AttentionShape(**kwargs)


def test_from_heads_refuses_heads_that_do_not_divide():
    with pytest.raises(ValueError, match="num_heads=6 is not a multiple of num_kv_heads=4"):
        AttentionShape.from_heads(dtype="fp16", head_dim=64, num_heads=6, num_kv_heads=4)


def test_what_kgen_does_not_cover_is_a_problem_not_an_error():
    assert AttentionShape("fp16", 128, 4, block_size=16).problem() is None
    assert AttentionShape("fp16", 32, 4).problem().startswith("head_dim=32 is not supported")
    assert "group_size=20 (query heads per KV head)" in AttentionShape("fp16", 128, 20).problem()
    assert "block_size=48" in AttentionShape("fp16", 128, 4, block_size=48).problem()
    assert "1..16" in AttentionShape("fp16", 128, 20).problem()  # capabilities shown as data
    assert set(CAPABILITIES) == {"dtype", "kv_dtype", "head_dim", "group_size", "block_size", "features"}


def test_one_e4m3_rule_for_compile_targets_and_gpus():
    e4m3 = AttentionShape("bf16", 128, 4, kv_dtype="fp8_e4m3", block_size=16)
    variant = VariantConfig(**e4m3.variant_fields())
    assert FP8_E4M3_MIN_CC == 89
    by_target = target_prune_reason(variant, "sm_80")
    by_shape = e4m3.problem(80, "sm_80")
    assert by_target == by_shape and "sm_89+" in by_shape
    assert target_prune_reason(variant, "sm_90") is None and e4m3.problem(90) is None
    assert e4m3.problem(None) is None  # an unknown device is not refused


def test_one_kv_dtype_vocabulary_for_cli_generate_shape_and_vllm():
    """The same spellings are accepted, and the same refused, by every entry point."""
    from kgen.cli import main
    from kgen.integrations.vllm_attention import layer_needs
    from runtime.kv_cache import parse_kv_cache_dtype
    from types import SimpleNamespace

    def vllm(name):
        impl = SimpleNamespace(kv_cache_dtype=name, attn_type="decoder", sliding_window=None,
                               logits_soft_cap=None, alibi_slopes=None, sinks=None)
        problem, kv, _ = layer_needs(impl, torch.float16)
        return problem or kv

    for spelling in KV_DTYPE_SPELLINGS:
        canonical = normalize_kv_dtype(spelling)
        assert parse_kv_cache_dtype(spelling) == canonical
        assert AttentionShape("fp16", 64, kv_dtype=spelling).kv_dtype == canonical
        assert vllm(spelling) == canonical
        assert main(["variants", "--head-dim", "64", "--dtype", "fp16", "--kv-dtype", spelling,
                     "--count"]) == 0
    for wrong in ("e4m3", "FP8_E4M3", "fp8e5m2", "int8", "none"):
        with pytest.raises(ValueError, match=f"kv_cache_dtype={wrong!r}"):
            parse_kv_cache_dtype(wrong)
        with pytest.raises(ValueError, match=f"kv_dtype={wrong!r}"):
            AttentionShape("fp16", 64, kv_dtype=wrong)
        assert f"kv_cache_dtype={wrong!r}" in vllm(wrong)
        assert main(["variants", "--head-dim", "64", "--kv-dtype", wrong, "--count"]) == 2
    assert vllm("float16") == "auto"  # vLLM names the model's own dtype for the plain cache


def test_workloads_and_variants_share_the_shape_normalisation():
    w = Workload("h100", torch.bfloat16, 128, 16, 4, 8, 1024, kv_dtype="fp8",
                 features="soft_cap,sliding_window")
    assert w.shape == AttentionShape("bf16", 128, 4, "fp8_e4m3", ("sliding_window", "soft_cap"), 16)
    assert Workload.for_step("h100", w.shape, num_seqs=7, max_context=1000) == w
    with pytest.raises(ValueError, match="group_size=17 is not supported; allowed: 1..16"):
        VariantConfig(group_size=17)
    with pytest.raises(ValueError, match="group_size=17 is not supported; allowed: 1..16"):
        Workload("h100", "fp16", 128, 16, 17, 1, 512)


def test_runtime_config_imports_none_of_the_generators_machinery():
    code = ("import sys, runtime.config, runtime.kv_cache; "
            "heavy = [m for m in sys.modules if m.split('.')[0] in ('jinja2', 'optuna', 'pandas') "
            "or m.startswith(('kgen.render', 'kgen.db', 'kgen.tune', 'kgen.build'))]; "
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
    code = ("import sys, kgen.dispatch; "
            "print([m for m in sys.modules if m.split('.')[0] in ('jinja2', 'optuna', 'pandas', 'torch', "
            "'triton') or m.startswith(('kgen.render', 'kgen.tune', 'kgen.build'))])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
