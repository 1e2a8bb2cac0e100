"""CPU fast paths for the decoder's elementwise steps (``runtime/native/layer_ops.c``) in float32,
bfloat16 and float16.

On the mixed benchmark's model torch spends several ops and temporaries on each of these per layer
and step (RMSNorm alone is pow, mean, add, rsqrt and two multiplies on this torch), where one C
pass over the rows does: residual add + RMSNorm, SiLU(gate) * up, and rotate-half RoPE in place.
The C code computes in float32 and rounds a bfloat16/float16 result after every op where torch
does (so where transformers does), so that it gives torch's bits but for RMSNorm's order of sums.
:meth:`NativeOps.for_model` gives None where they do not apply (another device, a float16 the
compiler lacks, or no C compiler: :func:`runtime.native_build.why_unavailable`), and the decoder
then runs torch's ops.
"""

from __future__ import annotations

import ctypes

import torch

from runtime.native_build import TYPE_CODES, load_native

_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float


def _rows_ok(t: torch.Tensor, dtype: torch.dtype) -> bool:
    """A CPU matrix of ``dtype`` whose rows are contiguous (any row stride)."""
    return t.dtype == dtype and t.device.type == "cpu" and t.dim() == 2 and t.stride(1) == 1


def _call(fn, *args) -> None:
    if fn(*args):
        raise ValueError(f"{fn.__name__}: the native library has no loop for these element types")


class NativeOps:
    """The C elementwise ops of one loaded library for one element type; see :meth:`for_model`."""

    def __init__(self, lib, dtype: torch.dtype = torch.float32) -> None:
        self.dtype, self.code = dtype, TYPE_CODES[dtype]
        self.add_rms_norm_fn = lib.kgen_add_rms_norm
        self.add_rms_norm_fn.argtypes = [_P, _I, _P, _I, _P, _P, _I, _I, _F, _I, _I]
        self.silu_mul_fn = lib.kgen_silu_mul
        self.silu_mul_fn.argtypes = [_P, _P, _I, _I, _I, _I]
        self.rope_fn = lib.kgen_rope
        self.rope_fn.argtypes = [_P, _I, _P, _P, _I, _I, _I, _I, _I]
        for fn in (self.add_rms_norm_fn, self.silu_mul_fn, self.rope_fn):
            fn.restype = ctypes.c_int

    @classmethod
    def for_model(cls, dtype: torch.dtype, device: torch.device) -> "NativeOps | None":
        """The ops for a float32, bfloat16 or float16 model on the CPU when the library builds
        (float16: when the compiler has ``_Float16``), else None."""
        if dtype not in TYPE_CODES or torch.device(device).type != "cpu":
            return None
        lib = load_native()
        if lib is None or (dtype == torch.float16 and not lib.float16):
            return None
        return cls(lib, dtype)

    def add_rms_norm(self, x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor | None,
                     eps: float) -> torch.Tensor | None:
        """``x += delta`` in place (x: ``[rows, dim]`` of the ops' dtype, rows contiguous; delta
        the same shape or None), then ``rms_norm(x) * weight`` as a new ``[rows, dim]`` tensor
        (None when ``weight`` is None). A weight of the ops' dtype rounds as Llama's RMSNorm
        (``w * round(norm(x))``); a float32 weight with a lower-precision x as Gemma's
        (``round(norm(x) * w)``)."""
        rows, dim = x.shape
        dt = self.dtype
        if not _rows_ok(x, dt) or (delta is not None and (not _rows_ok(delta, dt) or delta.shape != x.shape)):
            raise ValueError(f"add_rms_norm: x {tuple(x.shape)} {x.dtype} / delta need {dt} CPU rows with stride 1")
        wt = None if weight is None else weight.contiguous()
        if wt is not None and (wt.dtype not in (dt, torch.float32) or wt.shape != (dim,)):
            raise ValueError(f"add_rms_norm: weight {tuple(wt.shape)} {wt.dtype} must be [{dim}] of {dt} or float32")
        out = None if wt is None else torch.empty(rows, dim, dtype=dt)
        types = self.code + 16 * TYPE_CODES[dt if wt is None else wt.dtype]
        _call(self.add_rms_norm_fn, x.data_ptr(), x.stride(0), None if delta is None else delta.data_ptr(),
              0 if delta is None else delta.stride(0), None if wt is None else wt.data_ptr(),
              None if out is None else out.data_ptr(), rows, dim, eps, torch.get_num_threads(), types)
        return out

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """gate_up: ``[rows, 2 * inter]`` (``[gate | up]``) -> ``silu(gate) * up`` ``[rows, inter]``."""
        if gate_up.dtype != self.dtype or gate_up.dim() != 2:
            raise ValueError(f"silu_mul: gate_up {tuple(gate_up.shape)} {gate_up.dtype} must be 2-d {self.dtype}")
        gate_up = gate_up.contiguous()
        rows, inter = gate_up.shape[0], gate_up.shape[1] // 2
        out = torch.empty(rows, inter, dtype=self.dtype)
        _call(self.silu_mul_fn, gate_up.data_ptr(), out.data_ptr(), rows, inter, torch.get_num_threads(), self.code)
        return out

    def rope_(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate-half RoPE in place: x ``[tokens, heads, d]`` of the ops' dtype (heads contiguous
        within a row, any row stride); cos, sin ``[tokens, 1, d]`` or ``[tokens, d]`` of the same
        dtype. Returns x."""
        tokens, heads, d = x.shape
        if x.stride(2) != 1 or x.stride(1) != d or x.dtype != self.dtype:
            raise ValueError(f"rope_: x {tuple(x.shape)} {x.dtype} strides {x.stride()} need contiguous "
                             f"{self.dtype} heads")
        cos, sin = (t.reshape(tokens, d).to(self.dtype).contiguous() for t in (cos, sin))
        _call(self.rope_fn, x.data_ptr(), x.stride(0), cos.data_ptr(), sin.data_ptr(), tokens, heads, d,
              torch.get_num_threads(), self.code)
        return x
