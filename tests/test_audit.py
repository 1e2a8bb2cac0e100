"""The static audit: parsers on captured text, JIT-exact specialization, a representative sample
of fp16/bf16 variants compiled for sm_80 and sm_90 (no spills, only 16-byte K/V loads), negative
cases that must fail the audit, the ``kgen inspect`` CLI and the sweep script's quick run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kgen.audit.asm import ptx_loads, resource_usage, sass_load_bits, sass_spill_bytes, sass_width
from kgen.audit import AuditResult, audit_many, audit_variant, failures, parse_target, passes
from kgen.variant import VariantConfig

REPO = Path(__file__).resolve().parent.parent

SASS = """
        code for sm_80
                Function : _decode_kernel
        /*0000*/                   MOV R1, c[0x0][0x28] ;                      /* 0x00000a0000017a02 */
        /*00d0*/                   LDG.E R3, [R2.64] ;                         /* 0x0000000a02037981 */
        /*04d0*/               @P1 LDG.E.128 R8, [R2.64] ;                     /* 0x0000000a02081981 */
        /*0590*/              @!P5 LDG.E.U16 R14, [R10.64] ;                   /* 0x0000000a0a0e5981 */
        /*05a0*/                   LDG.E.64.CONSTANT R16, [R10.64+0x8] ;       /* 0x0000000a0a104981 */
        /*0ff0*/                   LDGSTS.E.BYPASS.LTC128B.128 [R0], [R2.64], P5 ;  /* 0x0000000002007fae */
        /*1010*/                   LDGSTS.E.BYPASS.128 [R0+0x800], [R14.64] ;  /* 0x008000000e007fae */
        /*1020*/                   LDS.128 R20, [R0] ;                         /* 0x0000000000147984 */
        /*1030*/                   STL.64 [R1+0x8], R20 ;                      /* 0x0000080114007387 */
        /*1040*/                   STL [R1], R22 ;                             /* 0x0000000116007387 */
        /*1050*/                   LDL.64 R20, [R1+0x8] ;                      /* 0x0000080001147983 */
        /*1060*/                   EXIT ;                                      /* 0x000000000000794d */
"""

PTX = """
.visible .entry _k(
	.param .u64 .ptr .global .align 1 _k_param_0,
	.param .u64 .ptr .global .align 1 _k_param_1,
	.param .u32 _k_param_2
)
{
	ld.param.b64 	%rd1, [_k_param_0];   // K cache
	ld.param.b64 	%rd2, [_k_param_1];   // block table
	ld.param.b32 	%r1, [_k_param_2];    // stride
	mov.u32 	%r9, %tid.x;
	mad.wide.u32 	%rd3, %r9, 4, %rd2;
	// begin inline asm
	ld.global.b32 { %r2 }, [ %rd3 + 0 ];
	// end inline asm
	mul.lo.s32 	%r3, %r2, %r1;
	mov.b64 	%rd4, %rd1;
$L__BB0_1:
	mad.wide.s32 	%rd5, %r3, 2, %rd4;
	@%p1 ld.global.L1::evict_last.v4.b32 { %r4, %r5, %r6, %r7 }, [ %rd5 + 0 ];
	cp.async.cg.shared.global [ %r8 + 0 ], [ %rd5 + 0 ], 0x10, %r2;
	add.s64 	%rd4, %rd4, 128;
	mov.pred 	%p2, 0;
	@%p2 ld.global.v2.b32 { %r4, %r5 }, [ %rd5 + 0 ];
	@%p1 bra 	$L__BB0_1;
	st.global.b16 	[%rd3+0], %rs1;
	ret;
}
"""


# ---- parsers on captured text ------------------------------------------------------------------
def test_sass_parser_counts_global_loads_by_width_and_spills():
    assert sass_width("LDG.E") == 32 and sass_width("LDG.E.U16") == 16
    assert sass_width("LDGSTS.E.BYPASS.LTC128B.128") == 128  # LTC128B is a cache hint
    assert sass_width("LDGSTS.E.BYPASS.LTC128B") == 32
    # shared loads (LDS) and local reloads (LDL) are not global loads
    assert sass_load_bits(SASS) == {128: 3, 64: 1, 32: 1, 16: 1}
    assert sass_spill_bytes(SASS) == (12, 8)
    usage = resource_usage(" Function _k:\n  REG:72 STACK:16 SHARED:1024 LOCAL:8 CONSTANT[0]:480")
    assert usage == {"registers": 72, "stack_bytes": 16, "shared_bytes": 1024, "local_bytes": 8}
    with pytest.raises(ValueError, match="REG"):
        resource_usage("no such line")


def test_ptx_provenance_separates_kv_from_block_table_loads():
    loads = ptx_loads(PTX)
    got = sorted((l.bits, l.kind, tuple(sorted(l.params))) for l in loads)
    # the table load traces to param 1 only; the K loads (address from param 0, offset from the
    # loaded table entry and the stride param 2) trace to params 0 and 2, not to the table; the
    # load under the constant-false %p2 is dead and dropped; stores are not loads.
    assert got == [(32, "ld", (1,)), (128, "cp.async", (0, 2)), (128, "ld", (0, 2))]


def test_ptx_provenance_flows_through_shared_memory():
    """Row addresses Triton re-lays out through shared memory keep their K/V provenance."""
    ptx = """
	ld.param.b64 	%rd1, [_k_param_0];
	ld.param.b64 	%rd2, [_k_param_1];
	ld.global.b32 { %r2 }, [ %rd2 + 0 ];
	mul.wide.s32 	%rd3, %r2, 256;
	add.s64 	%rd4, %rd1, %rd3;
	st.shared.b64 	[%r15+32768], %rd4;
	bar.sync 	0;
	ld.shared.b64 	%rd5, [%r15+32768];
	cp.async.cg.shared.global [ %r8 + 0 ], [ %rd5 + 0 ], 0x10, %r2;
	ld.shared.v2.b32 	{%r20, %r21}, [%r16];
"""
    got = sorted((l.bits, l.kind, tuple(sorted(l.params))) for l in ptx_loads(ptx))
    assert got == [(32, "ld", (1,)), (128, "cp.async", (0,))]


# ---- specialization matches Triton's JIT ---------------------------------------------------------
@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
def test_specialization_matches_tritons_own_binder():
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    from kgen.audit.capture import capture_launches, load_jit_module, specialize
    from kgen.render import write_source

    config = VariantConfig(head_dim=80, block_size=1, group_size=8, split_k=0, dtype="fp16")
    launches = capture_launches(load_jit_module(write_source(config)), config)
    # a split variant runs the two-stage path, the single pass when splits resolve to 1, and the
    # merge's widest step (64 partitions per step, 8 warps)
    assert [l.name for l in launches] == ["_decode_partial_kernel", "_merge_kernel", "_decode_kernel",
                                          "_merge_kernel"]
    assert launches[0].kv_args and not launches[1].kv_args and launches[2].kv_args
    assert (launches[1].kwargs["SPLIT_CHUNK"], launches[3].kwargs["SPLIT_CHUNK"]) == (16, 64)
    assert launches[3].kwargs["num_warps"] == 8
    backend = make_backend(GPUTarget("cuda", 90, 32))
    for launch in launches:
        binder = create_function_from_signature(launch.fn.signature, launch.fn.params, backend)
        bound, spec, opts = binder(*launch.args, **launch.kwargs)
        options, t_sig, t_constexprs, t_attrs = launch.fn._pack_args(backend, launch.kwargs, bound,
                                                                     spec, opts)
        sig, constexprs, attrs, my_options = specialize(launch.fn, launch.args, launch.kwargs)
        assert sig == t_sig
        assert constexprs == t_constexprs
        assert attrs == {k: v for k, v in t_attrs.items() if v}
        assert my_options["num_warps"] == options.num_warps


# ---- a representative sample on both targets ------------------------------------------------------
SAMPLE = [
    VariantConfig(head_dim=80, block_size=1, group_size=8, split_k=4, tile_tokens=64, dtype="fp16"),
    VariantConfig(head_dim=256, block_size=256, group_size=1, split_k=1, tile_tokens=32,
                  dtype="bf16"),
    VariantConfig(head_dim=128, block_size=16, group_size=8, split_k=0, tile_tokens=64,
                  dtype="bf16"),
    VariantConfig(head_dim=96, block_size=256, group_size=1, split_k=2, tile_tokens=64,
                  dtype="fp16"),
    VariantConfig(head_dim=64, block_size=32, group_size=4, split_k=1, tile_tokens=128,
                  num_warps=8, dtype="bf16"),
]


@pytest.fixture(scope="module")
def sample_results():
    return {(c, t): r for c, t, r in audit_many(SAMPLE, ("sm_80", "sm_90"), jobs=2)}


@pytest.mark.parametrize("target", ["sm_80", "sm_90"])
@pytest.mark.parametrize("config", SAMPLE, ids=lambda c: c.key)
def test_sample_variant_has_no_spills_and_only_16_byte_kv_loads(sample_results, config, target):
    result = sample_results[(config, target)]
    assert isinstance(result, AuditResult), result
    assert result.variant == config.key and result.target == target
    assert result.spill_bytes == 0 and all(k.local_bytes == 0 for k in result.kernels)
    assert result.kv_load_bits and set(result.kv_load_bits) == {128}, result.kv_load_bits
    assert all(k.consistent for k in result.kernels)
    assert 0 < result.registers <= 255 and result.shared_bytes > 0
    names = [k.name for k in result.kernels]
    assert names == (["_decode_kernel"] if config.split_k == 1
                     else ["_decode_partial_kernel", "_merge_kernel", "_decode_kernel", "_merge_kernel"])
    assert passes(result) and failures(result) == []
    assert AuditResult.from_dict(json.loads(result.to_json())) == result


SPILL_AND_NARROW = r"""
import json
from kgen.audit.compile import audit_compiled, compile_for
from kgen.audit.capture import capture_launches, load_jit_module, specialize
from kgen.render import write_source
from kgen.variant import VariantConfig
config = VariantConfig(head_dim=128, block_size=16, group_size=1, split_k=1, dtype="fp16")
launch = capture_launches(load_jit_module(write_source(config)), config)[0]
kv = {i for i, n in enumerate(launch.fn.arg_names) if n in launch.kv_args}
sig, constexprs, attrs, options = specialize(launch.fn, launch.args, launch.kwargs)
out = {}
squeezed = compile_for(launch.fn, sig, constexprs, attrs, dict(options, maxnreg=32), 80)
out["spill"] = audit_compiled(squeezed, "squeezed", kv, 0.0).spill_bytes
unaligned = {k: v for k, v in attrs.items() if k[0] not in kv}  # K/V pointers not 16-B aligned
narrow = compile_for(launch.fn, sig, constexprs, unaligned, options, 80)
out["narrow"] = audit_compiled(narrow, "narrow", kv, 0.0).kv_load_bits
print(json.dumps(out))
"""


def test_audit_detects_spills_and_narrow_kv_loads():
    """The checks can fail: 32 registers force spills; unaligned K/V pointers narrow the loads."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", SPILL_AND_NARROW], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["spill"] > 0
    narrow = {int(k): v for k, v in out["narrow"].items()}
    assert narrow and max(narrow) < 128, narrow


def test_failures_name_the_problem():
    good = audit_variant(SAMPLE[0], "sm_90")
    spilled = AuditResult(good.variant, good.dtype, good.target,
                          (good.kernels[0].__class__(**{**good.kernels[0].__dict__,
                                                        "spill_bytes": 64}),), 0.0)
    assert not passes(spilled) and "spills (64 B" in failures(spilled)[0]
    narrow = AuditResult(good.variant, "bf16", good.target,
                         (good.kernels[0].__class__(**{**good.kernels[0].__dict__,
                                                       "kv_load_bits": {128: 8, 32: 2}}),), 0.0)
    assert failures(narrow) == ["bf16 K/V loads are not all 16-byte: {'128': 8, '32': 2} (bits: count)"]
    assert passes(narrow, vector_dtypes=())  # fp32-style rule: width not required


def test_audit_worker_close_kills_a_hung_child_and_closes_its_pipes():
    from kgen.audit.worker import AuditWorker

    worker = AuditWorker()
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    real_wait = proc.wait

    def wait(timeout=None):  # the child ignores EOF: the bounded wait runs out
        if timeout is not None:
            raise subprocess.TimeoutExpired(proc.args, timeout)
        return real_wait()

    proc.wait = wait
    worker._proc = proc
    worker.close()
    assert worker._proc is None and proc.returncode is not None  # killed, reaped
    assert proc.stdin.closed and proc.stdout.closed
    worker.close()  # idempotent


# ---- targets and the CLI ---------------------------------------------------------------------------
def test_parse_target_spellings():
    assert {parse_target(t) for t in ("sm_80", "sm80", "80", 80, "SM_80")} == {"sm_80"}
    assert parse_target("90") == "sm_90"
    for bad in ("sm_70", "sm_100", "", "h100"):
        with pytest.raises(ValueError, match="target="):
            parse_target(bad)


def test_inspect_json_has_the_specified_keys(capsys):
    from kgen.cli import main

    config = SAMPLE[0]
    assert main(["inspect", "--key", config.key, "--target", "sm90", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {"registers", "spill_bytes", "shared_bytes", "kv_load_bits", "target",
            "variant"} <= set(data)
    assert data["variant"] == config.key and data["target"] == "sm_90"
    assert data["kv_load_bits"] == {"128": audit_variant(config, "sm_90").kv_load_bits[128]}
    assert data["spill_bytes"] == 0 and isinstance(data["registers"], int)


def test_inspect_table_has_a_row_per_kernel(capsys):
    from kgen.cli import main

    config = SAMPLE[0]
    assert main(["inspect", "--head-dim", "80", "--block-size", "1", "--group-size", "8",
                 "--split-k", "4", "--tile-tokens", "64", "--dtype", "fp16", "--target", "90",
                 "--num-warps", "4", "--num-stages", "2", "--check"]) == 0
    out = capsys.readouterr().out
    assert config.key in out and "_decode_partial_kernel" in out and "_merge_kernel" in out
    assert "K/V loads: " in out and "(100%)" in out and "audit: PASS" in out


@pytest.mark.parametrize("argv, needle", [
    (["--head-dim", "128", "--block-size", "16", "--target", "sm_70"], "target='sm_70'"),
    (["--head-dim", "100", "--block-size", "16"], "head_dim=100"),
    (["--head-dim", "128", "--block-size", "16", "--split-k", "many"], "split_k='many'"),
    (["--block-size", "16"], "--head-dim"),
])
def test_inspect_bad_options_exit_2_with_one_line(capsys, argv, needle):
    from kgen.cli import main

    assert main(["inspect", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err, err


# ---- the sweep script --------------------------------------------------------------------------------
def test_audit_sweep_quick_runs(tmp_path):
    out = tmp_path / "audit.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "audit_sweep.py"), "--quick",
                           "--json", str(out)], capture_output=True, text=True, timeout=240,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["machine"]["triton"] and len(data["rows"]) == 8
    assert {row["target"] for row in data["rows"]} == {"sm_80", "sm_90"}
    # the fp8 e4m3 variant (every feature on) is not compiled for sm_80: a target rule says why
    (skipped,) = [row for row in data["rows"] if "unsupported" in row]
    assert skipped["target"] == "sm_80" and "sm_89" in skipped["unsupported"]
    compiled = [row for row in data["rows"] if "unsupported" not in row]
    assert all(row["passes"] for row in compiled), compiled
    (fp8,) = [row for row in compiled if row["kv_dtype"] == "fp8_e4m3"]
    assert fp8["target"] == "sm_90" and set(fp8["kv_load_bits"]) == {"128"}
    assert fp8["spill_bytes"] == 0 and fp8["features"] == ["sliding_window", "soft_cap", "alibi", "sinks"]
    assert (tmp_path / "audit.md").read_text().startswith("# Static audit sweep")
    assert "| sm_90 | bf16 | auto | none |" in proc.stdout
    assert "| sm_90 | bf16 | fp8_e4m3 | sliding_window,soft_cap,alibi,sinks |" in proc.stdout
