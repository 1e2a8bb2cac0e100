"""kgen's float32 CPU GEMM (``runtime/native/gemm.c`` through ``runtime/model/linear.py``) against a
float64 reference: random weights and inputs, panel tails (out_features not a multiple of 64),
row tails (not a multiple of 6), k blocks (in_features past 256), bias, strided and 3-D inputs,
a poisoned output, 1 and 2 threads, non-finite values, and clear errors on bad input."""

import pytest
import torch
import torch.nn.functional as F

from helpers_native import require_native
from runtime.model.linear import Linear
from runtime.model.native_gemm import PANEL, NativeGemm

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


@pytest.mark.parametrize("choice,dtype,expected", [("native", torch.float32, "native_gemm"),
                                                   ("onednn", torch.float32, "onednn_packed"),
                                                   ("aten", torch.float32, "aten"),
                                                   ("native", torch.bfloat16, "onednn_packed")])
def test_path_choice(monkeypatch, choice, dtype, expected):
    """float32 takes the native GEMM unless KGEN_CPU_LINEAR says otherwise; bfloat16 keeps oneDNN
    (or F.linear where this torch's oneDNN cannot pack it)."""
    monkeypatch.setenv("KGEN_CPU_LINEAR", choice)
    g = torch.Generator().manual_seed(11)
    w, x = torch.randn(96, 64, generator=g).to(dtype), torch.randn(5, 64, generator=g).to(dtype)
    lin = Linear(w.clone())
    assert lin.path == expected or (expected == "onednn_packed" and lin.path == "aten")
    tol = _tol(64) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(lin(x).float(), F.linear(x, w).float(), **tol)

