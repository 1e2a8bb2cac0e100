"""kgen's CPU GEMM (``runtime/native/gemm.c`` through ``runtime/model/linear.py``) against a float64
reference: random weights and inputs, panel tails (out_features not a multiple of 64), row tails
(not a multiple of 6), k blocks (in_features past 256), bias, strided and 3-D inputs, a poisoned
output, 1 and 2 threads, non-finite values, clear errors on bad input; bfloat16 (VDPBF16PS)
against float64 and against oneDNN's F.linear, and the build without BF16 instructions."""

import ctypes

import pytest
import torch
import torch.nn.functional as F

from helpers_native import require_native
from runtime.model.linear import Linear
from runtime.model.native_gemm import PANEL, NativeGemm
from runtime.native_build import NO_BF16_FLAGS, load_variant, native_info

require_native()


def _reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    y = x.double() @ w.double().T
    return y if b is None else y + b.double()


def _tol(k: int) -> dict:
    # float32 sums of k products of N(0,1) values: errors grow about with k * 2^-24 * |terms|
    return dict(rtol=1e-5, atol=4e-7 * k)


@pytest.mark.parametrize("m,k,n,bias", [(1, 1, 1, True), (5, 33, 80, True), (6, 512, 768, False),
                                        (7, 64, 64, True), (13, 1376, 512, False), (64, 512, 4096, False),
                                        (200, 300, 130, True), (3, 257, 200, True)])
def test_gemm_matches_float64_reference(m, k, n, bias):
    g = torch.Generator().manual_seed(m * 1000 + k + n)
    w, x = torch.randn(n, k, generator=g), torch.randn(m, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    lin = Linear(w.clone(), None if b is None else b.clone())
    assert lin.path == "native_gemm"
    y = lin(x)
    assert y.shape == (m, n) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), _reference(x, w, b), **_tol(k))
    torch.testing.assert_close(y, F.linear(x, w, b), **_tol(k))


def test_every_output_written_and_nothing_past_it():
    """The C entry point with a poisoned, wider output (row stride past n): every [m, n] value is
    the reference's, the gap columns keep their sentinel."""
    g = torch.Generator().manual_seed(3)
    m, k, n, ldy = 11, 96, 100, 131
    w, x, b = torch.randn(n, k, generator=g), torch.randn(m, k, generator=g), torch.randn(n, generator=g)
    gemm = NativeGemm.for_weight(w, b)
    y = torch.full((m, ldy), float("nan"))
    y[:, n:] = 12345.0
    status = gemm._run(x.data_ptr(), k, m, k, gemm.packed.data_ptr(), n, gemm.bias.data_ptr(), y.data_ptr(), ldy,
                       torch.get_num_threads())
    assert status == 0
    torch.testing.assert_close(y[:, :n].double(), _reference(x, w, b), **_tol(k))
    assert bool((y[:, n:] == 12345.0).all())


def test_impossible_sizes_are_refused_before_writing():
    w = torch.randn(64, 32)
    gemm = NativeGemm.for_weight(w, None)
    x, y = torch.randn(4, 32), torch.full((4, 64), 7.0)
    for args in [(x.data_ptr(), 16, 4, 32), (x.data_ptr(), 32, -1, 32), (x.data_ptr(), 32, 4, 0)]:
        assert gemm._run(*args, gemm.packed.data_ptr(), 64, None, y.data_ptr(), 64, 1) != 0
    assert bool((y == 7.0).all())


def test_strided_and_batched_inputs():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(144, 200, generator=g)
    lin = Linear(w.clone())
    wide = torch.randn(9, 333, generator=g)
    view = wide[:, 50:250]                      # rows 333 floats apart: read in place
    torch.testing.assert_close(lin(view).double(), _reference(view, w, None), **_tol(200))
    cols = torch.randn(200, 9, generator=g).T   # column-major: copied first
    torch.testing.assert_close(lin(cols).double(), _reference(cols, w, None), **_tol(200))
    batched = torch.randn(2, 5, 200, generator=g)
    y = lin(batched)
    assert y.shape == (2, 5, 144)
    torch.testing.assert_close(y.double(), _reference(batched.reshape(10, 200), w, None).reshape(2, 5, 144),
                               **_tol(200))
    assert lin(torch.randn(0, 200)).shape == (0, 144)


def test_one_and_two_threads_give_the_same_bits():
    g = torch.Generator().manual_seed(7)
    w, x = torch.randn(2752, 512, generator=g), torch.randn(37, 512, generator=g)
    lin = Linear(w.clone())
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = lin(x)
        torch.set_num_threads(2)
        two = lin(x)
        narrow = Linear(torch.randn(PANEL, 512, generator=g))  # one panel: two threads split the rows
        x2 = torch.randn(40, 512, generator=g)
        torch.set_num_threads(2)
        split = narrow(x2)
        torch.set_num_threads(1)
        whole = narrow(x2)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two) and torch.equal(split, whole)


def test_non_finite_values_stay_where_float32_puts_them():
    g = torch.Generator().manual_seed(9)
    w, x = torch.randn(70, 40, generator=g), torch.randn(8, 40, generator=g)
    x[3, 5], w[10, 7], w[20, 1] = float("nan"), float("inf"), float("-inf")
    y, ref = Linear(w.clone())(x), F.linear(x, w)
    assert torch.equal(torch.isnan(y), torch.isnan(ref)) and torch.equal(torch.isinf(y), torch.isinf(ref))
    finite = torch.isfinite(ref)
    torch.testing.assert_close(y[finite], ref[finite], **_tol(40))


def test_bad_inputs_name_the_value(monkeypatch):
    lin = Linear(torch.randn(64, 32))
    with pytest.raises(ValueError, match=r"\(4, 31\).*\[\.\.\., 32\]"):
        lin(torch.randn(4, 31))
    with pytest.raises(ValueError, match="torch.float64"):
        lin(torch.randn(4, 32, dtype=torch.float64))
    monkeypatch.setenv("KGEN_CPU_LINEAR", "fastest")
    with pytest.raises(ValueError, match="KGEN_CPU_LINEAR='fastest'.*native, onednn, aten"):
        Linear(torch.randn(64, 32))


BF16_GEMM = native_info()["bf16_gemm"]
needs_bf16 = pytest.mark.skipif(not BF16_GEMM, reason="this CPU has no AVX512-BF16 (the build without it is "
                                                      "tested below)")


@pytest.mark.parametrize("choice,dtype,expected", [("native", torch.float32, "native_gemm"),
                                                   ("onednn", torch.float32, "onednn_packed"),
                                                   ("aten", torch.float32, "aten"),
                                                   ("native", torch.bfloat16, "native_gemm" if BF16_GEMM else
                                                    "onednn_packed"),
                                                   ("onednn", torch.bfloat16, "onednn_packed")])
def test_path_choice(monkeypatch, choice, dtype, expected):
    """float32 (and bfloat16 where the CPU has AVX512-BF16) takes the native GEMM unless
    KGEN_CPU_LINEAR says otherwise; else oneDNN (or F.linear where this torch's oneDNN cannot pack
    the dtype)."""
    monkeypatch.setenv("KGEN_CPU_LINEAR", choice)
    g = torch.Generator().manual_seed(11)
    w, x = torch.randn(96, 64, generator=g).to(dtype), torch.randn(5, 64, generator=g).to(dtype)
    lin = Linear(w.clone())
    assert lin.path == expected or (expected == "onednn_packed" and lin.path == "aten")
    tol = _tol(64) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(lin(x).float(), F.linear(x, w).float(), **tol)



@needs_bf16
@pytest.mark.parametrize("m,k,n,bias", [(1, 2, 1, True), (5, 33, 80, True), (7, 512, 768, False),
                                        (13, 1377, 512, True), (64, 512, 4096, False), (130, 96, 200, True)])
def test_bf16_gemm_is_onednns_answer_and_near_float64(m, k, n, bias):
    """One float32 sum per output rounded once to bfloat16 (odd k: the last pair padded): within
    bfloat16 rounding of float64, and F.linear's bits but where the two float32 sums round apart."""
    g = torch.Generator().manual_seed(m + k + n)
    w, x = torch.randn(n, k, generator=g).bfloat16(), torch.randn(m, k, generator=g).bfloat16()
    b = torch.randn(n, generator=g).bfloat16() if bias else None
    lin = Linear(w.clone(), None if b is None else b.clone())
    assert lin.path == "native_gemm"
    y = lin(x)
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)
    ref = _reference(x, w, b)
    torch.testing.assert_close(y.double(), ref, rtol=2 ** -8, atol=1e-6 * k)
    onednn = F.linear(x, w, b)
    apart = (y != onednn)
    assert float(apart.float().mean()) < 0.01
    torch.testing.assert_close(y[apart].double(), onednn[apart].double(), rtol=2 ** -7, atol=0)


@needs_bf16
def test_bf16_poison_strides_and_non_finite():
    g = torch.Generator().manual_seed(13)
    m, k, n, ldy = 9, 70, 100, 129
    w, x = torch.randn(n, k, generator=g).bfloat16(), torch.randn(m, k + 30, generator=g).bfloat16()[:, 10:10 + k]
    x[2, 3] = float("nan")
    gemm = NativeGemm.for_weight(w, None)
    y = torch.full((m, ldy), float("nan"), dtype=torch.bfloat16)
    y[:, n:] = 3.0
    assert gemm._run(x.data_ptr(), x.stride(0), m, k, gemm.packed.data_ptr(), n, None, y.data_ptr(), ldy, 2) == 0
    ref = F.linear(x, w)
    assert bool(torch.isnan(y[2, :n]).all()) and not bool(torch.isnan(y[torch.arange(m) != 2, :n]).any())
    keep = torch.arange(m) != 2
    torch.testing.assert_close(y[keep, :n].double(), ref[keep].double(), rtol=2 ** -7, atol=0)
    assert bool((y[:, n:] == 3.0).all())


def test_build_without_bf16_instructions_has_no_bf16_gemm():
    """The library a CPU without AVX512-BF16 gets (forced here): its bfloat16 GEMM says so and
    refuses, so bfloat16 projections stay on oneDNN there; its float32 GEMM still computes."""
    lib = load_variant(extra=list(NO_BF16_FLAGS))
    assert lib.info["bf16_gemm"] is False
    x, y = torch.randn(4, 32).bfloat16(), torch.zeros(4, 64, dtype=torch.bfloat16)
    packed = torch.zeros(64 * 32, dtype=torch.bfloat16)
    assert lib.kgen_gemm_bf16(ctypes.c_void_p(x.data_ptr()), ctypes.c_int64(32), ctypes.c_int64(4),
                              ctypes.c_int64(32), ctypes.c_void_p(packed.data_ptr()), ctypes.c_int64(64), None,
                              ctypes.c_void_p(y.data_ptr()), ctypes.c_int64(64), ctypes.c_int64(1)) == 2
    w, x32 = torch.randn(64, 32), torch.randn(4, 32)
    p32, y32 = torch.empty(64 * 32), torch.empty(4, 64)
    P, I = ctypes.c_void_p, ctypes.c_int64
    lib.kgen_gemm_f32_pack(P(w.data_ptr()), I(64), I(32), P(p32.data_ptr()))
    assert lib.kgen_gemm_f32(P(x32.data_ptr()), I(32), I(4), I(32), P(p32.data_ptr()), I(64), None,
                             P(y32.data_ptr()), I(64), I(1)) == 0
    torch.testing.assert_close(y32.double(), _reference(x32, w, None), **_tol(32))
