"""The native CPU kernels in bfloat16 and float16: decode against a float64 reference (its register
tiles and head sizes, permuted and shared blocks with garbage around the live rows, soft-caps, fp8
caches, the threaded path), both the build with the CPU's BF16 instructions (VDPBF16PS scores)
and the build without them that other CPUs get, and without OpenMP."""

import ctypes

import pytest
import torch

from runtime import native_build
from runtime.attention import AttentionMetadata
from runtime.kv_cache import LayerKV
from test_model_parity import NATIVE, cpu_backend, prepare_on_threads, random_paged_case, reference_decode

ULP = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}  # half an ulp, relative
pytestmark = pytest.mark.skipif(bool(NATIVE), reason=str(NATIVE))


def assert_rounded_close(out, ref, dtype):
    """out (``dtype``) is ref (float64) rounded to ``dtype``: within half an ulp of it, plus the
    float32 arithmetic's own error."""
    assert out.dtype == dtype and not out.isnan().any()
    torch.testing.assert_close(out.double(), ref, rtol=ULP[dtype] * 1.01, atol=2e-5)


def build_variant(extra, flag_set=0):
    """``kgen_paged_decode`` of a library built with extra flags, as NativeDecode calls it."""
    lib = native_build.load_variant(flag_set, extra)
    fn = lib.kgen_paged_decode
    fn.argtypes, fn.restype, fn.openmp = native_build.ARGTYPES, ctypes.c_int, lib.openmp
    return lib, fn


def decode_case(dtype, bs, kvh, group, d, lens, seed, window=None):
    q, kc, vc, tables, seq_lens = random_paged_case(bs, kvh, group, d, lens, seed=seed, dtype=dtype)
    meta = AttentionMetadata(slot_mapping=None, prefills=[], num_prefill_tokens=0, block_tables=tables,
                             seq_lens=seq_lens, max_seq_len=max(lens))
    backend = cpu_backend("native", bs, kvh, kvh * group, d, kc.shape[0], window=window, dtype=dtype)
    return q, kc, vc, tables, seq_lens, meta, backend


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 80, 128])
@pytest.mark.parametrize("group", [1, 2, 5, 8])
def test_native_decode_low_precision_matches_float64(dtype, d, group):
    """Tiles of 4, 2 and 1 query heads, d=80 (16-lane remainder, and no VDPBF16PS: it takes 32
    values a step), contexts past the prefetch distance, a soft-cap; q, cache and output in
    ``dtype``, against float64 attention over the same (rounded) values."""
    lens = [1, 15, 16, 17, 33, 70]
    q, kc, vc, tables, seq_lens, meta, backend = decode_case(dtype, 16, 2, group, d, lens, seed=d + group)
    backend.prepare(meta)
    out = backend.decode(q, LayerKV(kc, vc, 1.0, 1.0, dtype), meta, scale=d ** -0.5, logits_soft_cap=3.0)
    assert_rounded_close(out, reference_decode(q, kc, vc, tables, seq_lens, d ** -0.5, cap=3.0), dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_native_decode_low_precision_q_with_fp8_cache(dtype):
    bs, d = 16, 64
    q, kc, vc, tables, seq_lens, meta, backend = decode_case(dtype, bs, 2, 4, d, [1, 15, 16, 17, 40], seed=3)
    kq = (kc.float().clamp(-1e3, 1e3) / 0.02).clamp(-448, 448).to(torch.float8_e4m3fn)
    vq = (vc.float().clamp(-1e3, 1e3) / 0.5).clamp(-448, 448).to(torch.float8_e4m3fn)
    backend.prepare(meta)
    out = backend.decode(q, LayerKV(kq, vq, 0.02, 0.5, dtype), meta, scale=0.125)
    ref = reference_decode(q, kq.double(), vq.double(), tables, seq_lens, 0.125, k_scale=0.02, v_scale=0.5)
    assert_rounded_close(out, ref, dtype)


@pytest.mark.parametrize("window", [None, 5])
def test_native_decode_bf16_on_threads_never_reads_freed_blocks(window):
    """Two OpenMP threads; window-freed entries and the padding point at a NaN block."""
    bs, lens = 4, [1, 3, 4, 5, 8, 9, 16, 17, 31]
    q, kc, vc, tables, seq_lens, meta, backend = decode_case(torch.bfloat16, bs, 2, 4, 32, lens, seed=7,
                                                             window=window)
    used = {int(tables[i, j]) for i, n in enumerate(lens) for j in range(-(-n // bs))}
    poison = min(set(range(kc.shape[0])) - used)
    kc[poison] = vc[poison] = float("nan")
    for i, n in enumerate(lens):
        tables[i, -(-n // bs):] = poison
        if window:
            tables[i, : max(0, n - window) // bs] = poison
    prepare_on_threads(backend, meta, 2)
    assert meta.extra["native_threads"] == 2
    out = backend.decode(q, LayerKV(kc, vc, 1.0, 1.0, torch.bfloat16), meta, scale=0.25, sliding_window=window)
    assert_rounded_close(out, reference_decode(q, kc, vc, tables, seq_lens, 0.25, window=window), torch.bfloat16)


@pytest.mark.parametrize("flag_set,extra", [(0, native_build.NO_BF16_FLAGS), (1, [])],
                         ids=["without-bf16-instructions", "without-openmp"])
def test_native_decode_bf16_builds_other_cpus_get(flag_set, extra):
    """The library a CPU without AVX512-BF16 gets (bfloat16 widened to float32 before each
    multiply) and the one a compiler without OpenMP gives (chunks on Python threads) decode
    bfloat16 to the same float64 reference; the usual build here uses VDPBF16PS."""
    import platform

    if extra and platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the BF16 instruction flags are x86-64 flags")
    lib, fn = build_variant(extra, flag_set)
    assert lib.info["bf16_dot"] is False if extra else lib.info["openmp"] is False
    assert lib.info["cflags"].endswith(" ".join(extra)) and "-ffast-math" not in lib.info["cflags"]
    lens = [70, 1, 33, 16, 17, 5, 64]
    q, kc, vc, tables, seq_lens, meta, backend = decode_case(torch.bfloat16, 16, 2, 4, 64, lens, seed=11)
    backend.fn = fn
    prepare_on_threads(backend, meta, 2)
    out = backend.decode(q, LayerKV(kc, vc, 1.0, 1.0, torch.bfloat16), meta, scale=0.125)
    assert_rounded_close(out, reference_decode(q, kc, vc, tables, seq_lens, 0.125), torch.bfloat16)


def test_the_usual_build_says_what_it_uses():
    """On a CPU with AVX512-BF16 the usual build takes bfloat16 scores with VDPBF16PS."""
    from pathlib import Path

    info = native_build.native_info()
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    has_bf16 = " avx512_bf16" in flags and native_build.extra_flags() == []
    assert info["bf16_dot"] == has_bf16 and (info["isa"] == "avx512_bf16") == has_bf16
    assert info["float16"] and "-ffast-math" not in info["cflags"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_portable_avx2_build_decodes_and_rounds_like_torch(dtype):
    """The library an AVX2 CPU gets (no AVX-512: the generic 16-lane code widens and rounds
    bfloat16 and float16 with integer ops): decode within rounding of float64, RoPE with torch's
    bits, SiLU x up with torch's bits but for rare one-ulp exp differences."""
    import platform

    from runtime.model.native_ops import NativeOps
    from runtime.model.ops import rotate_half

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("an x86-64 build flag")
    lib, fn = build_variant(["-march=x86-64-v3"])
    assert lib.info["isa"] == "avx2" and lib.info["bf16_dot"] is False
    lens = [70, 1, 33, 16, 17]
    q, kc, vc, tables, seq_lens, meta, backend = decode_case(dtype, 16, 2, 4, 64, lens, seed=13)
    backend.fn = fn
    prepare_on_threads(backend, meta, 2)
    out = backend.decode(q, LayerKV(kc, vc, 1.0, 1.0, dtype), meta, scale=0.125, logits_soft_cap=2.0)
    assert_rounded_close(out, reference_decode(q, kc, vc, tables, seq_lens, 0.125, cap=2.0), dtype)
    ops = NativeOps(lib, dtype)
    g = torch.Generator().manual_seed(2)
    qk = (torch.randn(9, 10, 40, generator=g) * 3).to(dtype)          # half 20: a 4-lane tail
    emb = torch.rand(9, 20, generator=g).repeat(1, 2) * 50
    cos, sin = emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]
    want = qk * cos + rotate_half(qk) * sin
    assert torch.equal(ops.rope_(qk, cos, sin), want)
    gate_up = (torch.randn(7, 2 * 100, generator=g) * 4).to(dtype)
    gate_up[0, :3] = torch.tensor([-200.0, 200.0, float("nan")])
    gate, up = gate_up.chunk(2, dim=-1)
    got, want = ops.silu_mul(gate_up), torch.nn.functional.silu(gate) * up
    assert got[0, 2].isnan() and torch.equal(got[0, :2], want[0, :2])
    apart = (got.view(torch.int16).int() - want.view(torch.int16).int()).abs()[want.isfinite()]
    assert int(apart.max()) <= 1 and float((apart > 0).float().mean()) <= 0.01
