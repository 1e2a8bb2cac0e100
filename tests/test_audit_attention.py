"""The static audit of the ``paged_attention`` family (sm_80 / sm_90, no GPU): representative
variants compile without spills, with only 16-byte K/V loads and tensor-core dots for 16-bit
queries, for every row-tile shape the launcher may pick; the tensor-core count is parsed and
required; ``kgen inspect --kernel attention --json`` reports it."""

from __future__ import annotations

import json

import pytest

from kgen.audit import AuditResult, audit_many, failures, passes
from kgen.audit.asm import sass_mma_count
from kgen.audit.capture_attention import plan_shapes
from kgen.space_attention import default_attention_config

ALL = ("sliding_window", "soft_cap", "alibi", "sinks")


def _default(**kw):
    return default_attention_config(block_size=16, **kw)


SAMPLE = [  # (variant, target): fp16, bf16, e5m2 on sm_80, e4m3 on sm_90, features on
    (_default(head_dim=128, group_size=4, dtype="fp16"), "sm_80"),
    (_default(head_dim=128, group_size=8, dtype="bf16"), "sm_90"),
    (_default(head_dim=128, group_size=4, dtype="fp16", kv_dtype="fp8_e5m2", features=ALL), "sm_80"),
    (_default(head_dim=128, group_size=8, dtype="bf16", kv_dtype="fp8_e4m3", features=ALL), "sm_90"),
    (_default(head_dim=256, group_size=3, dtype="bf16", features=ALL).replace(block_size=1), "sm_80"),
    # defaults the full sweep once found spilling (fp32 one-token blocks spilled 352 B on sm_90;
    # padded head dims at group 16 and head dims padded to 256 spilled with two stages)
    (default_attention_config(head_dim=128, block_size=1, group_size=8, dtype="fp32"), "sm_90"),
    (default_attention_config(head_dim=64, block_size=1, group_size=3, dtype="fp32"), "sm_80"),
    (default_attention_config(head_dim=96, block_size=128, group_size=16, dtype="bf16"), "sm_80"),
    (default_attention_config(head_dim=192, block_size=16, group_size=3, dtype="fp16"), "sm_90"),
    # audited exceptions (kgen.space_audited): the rule's choices spilled on sm_80 (16-bit and fp32
    # d256) and sm_90 (fp32 over e4m3); fp32 d256's first replacement spilled on sm_90
    (default_attention_config(head_dim=256, block_size=128, group_size=3, dtype="fp16"), "sm_80"),
    (default_attention_config(head_dim=256, block_size=128, group_size=3, dtype="fp32"), "sm_90"),
    (default_attention_config(head_dim=80, block_size=16, group_size=8, dtype="fp32",
                              kv_dtype="fp8_e4m3"), "sm_90"),
]


@pytest.fixture(scope="module")
def results():
    found = {}
    for target in ("sm_80", "sm_90"):
        configs = [c for c, t in SAMPLE if t == target]
        found.update({(c, t): r for c, t, r in audit_many(configs, (target,), jobs=2)})
    return found


@pytest.mark.parametrize("index", range(len(SAMPLE)), ids=lambda i: f"{SAMPLE[i][0].key}@{SAMPLE[i][1]}")
def test_attention_variant_passes_the_audit(results, index):
    config, target = SAMPLE[index]
    result = results[(config, target)]
    assert isinstance(result, AuditResult), result
    assert result.variant == config.key and result.target == target
    assert result.spill_bytes == 0 and all(k.local_bytes == 0 for k in result.kernels)
    assert set(result.kv_load_bits) == {128}, result.kv_load_bits
    assert all(k.consistent for k in result.kernels)
    assert 0 < result.registers <= 255
    # every row-tile shape the launcher may launch was compiled: 2D and segmented kernels with
    # 16 rows and with the q tile (one when they coincide), the merge's narrow and wide steps
    names = [k.name for k in result.kernels]
    tiles = 1 if config.q_tile == 16 else 2
    assert names.count("_merge_kernel") == 2 and names.count("_attention_kernel") == tiles
    assert names.count("_attention_segment_kernel") == tiles
    assert len(plan_shapes(config)) == 5
    dots = [k for k in result.kernels if k.kv_load_bits]  # the kernels that read K/V attend
    assert dots and (config.dtype == "fp32" or all(k.mma_instructions > 0 for k in dots))  # 16-bit: tensor cores
    assert result.mma_instructions == sum(k.mma_instructions for k in result.kernels)
    assert passes(result) and failures(result) == []
    assert AuditResult.from_dict(json.loads(result.to_json())) == result


def test_tensor_core_rule_and_parser():
    sass = """
        /*0100*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;   /* 0x000000000c04723c */
        /*0110*/              @!P0 HMMA.16816.F32 R16, R8, R14, R16 ;      /* 0x000000000e10723c */
        /*0120*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24 ; /* 0x00 */
        /*0130*/                   FFMA R1, R2, R3, R1 ;                    /* 0x0000000302017223 */
        /*0140*/                   IMAD R1, R2, R3, R1 ;                    /* 0x0000000302017224 */
    """
    assert sass_mma_count(sass) == 3
    config, target = SAMPLE[0]
    good = _fake_result(config, target, mma=7)
    assert passes(good)
    cpu_dots = _fake_result(config, target, mma=0)
    assert failures(cpu_dots) == ["_attention_kernel: fp16 dots without tensor-core instructions "
                                  "(no HMMA / HGMMA in the SASS)"]
    fp32 = _fake_result(config.replace(dtype="fp32"), target, mma=0)  # FMA dots are fp32's way
    assert passes(fp32, vector_dtypes=())
    unknown = _fake_result(config, target, mma=None)  # audits read before the count existed
    assert passes(unknown) and unknown.mma_instructions is None


def _fake_result(config, target, *, mma):
    from kgen.audit import KernelAudit

    kernel = KernelAudit(name="_attention_kernel", registers=128, spill_bytes=0,
                         spill_load_bytes=0, stack_bytes=0, local_bytes=0, shared_bytes=1024,
                         kv_load_bits={128: 4}, other_load_bits={32: 2},
                         sass_load_bits={128: 4, 32: 2}, consistent=True, num_warps=4,
                         num_stages=2, compile_seconds=0.0, mma_instructions=mma)
    return AuditResult(config.key, config.dtype, target, (kernel,), 0.0)


def test_inspect_attention_json_reports_mma(capsys):
    from kgen.cli import main

    config, target = SAMPLE[1]
    assert main(["inspect", "--kernel", "attention", "--key", config.key, "--target", target,
                 "--json", "--check"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["variant"] == config.key and data["mma_instructions"] > 0
    assert [k["name"] for k in data["kernels"]][:2] == ["_attention_kernel", "_attention_kernel"]
    assert all("mma_instructions" in k for k in data["kernels"])


def test_audit_sweep_takes_the_attention_family(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    config, target = SAMPLE[1]
    out = tmp_path / "sweep.json"
    proc = subprocess.run([sys.executable, str(repo / "bench" / "audit_sweep.py"), "--kernel",
                           "attention", "--keys", config.key, "--targets", target, "--json",
                           str(out)], capture_output=True, text=True, timeout=600, cwd=repo)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    (row,) = data["rows"]
    assert data["kernel"] == "attention" and row["variant"] == config.key and row["passes"]
    assert row["mma_instructions"] > 0 and row["spill_bytes"] == 0
    assert {k["name"] for k in row["kernels"]} == {"_attention_kernel", "_attention_segment_kernel",
                                                   "_merge_kernel"}
    assert "attention family" in proc.stdout and f"| {config.key} | {target} |" in proc.stdout
