"""float32 CPU fast paths for the decoder's elementwise steps (``runtime/native/layer_ops.c``).

On the mixed benchmark's model torch spends several ops and temporaries on each of these per layer
and step (RMSNorm alone is pow, mean, add, rsqrt and two multiplies on this torch), where one C
pass over the rows does: residual add + RMSNorm, SiLU(gate) * up, and rotate-half RoPE in place.
:meth:`NativeOps.for_model` gives None where they do not apply (another dtype or device, or no
C compiler: :func:`runtime.native_build.why_unavailable`), and the decoder then runs torch's ops;
both follow transformers' math (fp32 statistics), only the order of a row's sums differs.
"""

from __future__ import annotations

import ctypes

import torch

from runtime.native_build import load_native

_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float


def _rows_ok(t: torch.Tensor) -> bool:
    """A float32 CPU matrix whose rows are contiguous (any row stride)."""
    return t.dtype == torch.float32 and t.device.type == "cpu" and t.dim() == 2 and t.stride(1) == 1


class NativeOps:
    """The C elementwise ops of one loaded library; see :meth:`for_model`."""

    def __init__(self, lib) -> None:
        self.add_rms_norm_fn = lib.kgen_add_rms_norm
        self.add_rms_norm_fn.argtypes = [_P, _I, _P, _I, _P, _P, _I, _I, _F, _I]
        self.silu_mul_fn = lib.kgen_silu_mul
        self.silu_mul_fn.argtypes = [_P, _P, _I, _I, _I]
        self.rope_fn = lib.kgen_rope
        self.rope_fn.argtypes = [_P, _I, _P, _P, _I, _I, _I, _I]
        for fn in (self.add_rms_norm_fn, self.silu_mul_fn, self.rope_fn):
            fn.restype = None

    @classmethod
    def for_model(cls, dtype: torch.dtype, device: torch.device) -> "NativeOps | None":
        """The ops for a float32 model on the CPU when the library builds, else None."""
        if dtype != torch.float32 or torch.device(device).type != "cpu":
            return None
        lib = load_native()
        return None if lib is None else cls(lib)

    def add_rms_norm(self, x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor | None,
                     eps: float) -> torch.Tensor | None:
        """``x += delta`` in place (x: float32 ``[rows, dim]``, rows contiguous; delta the same
        shape or None), then ``rms_norm(x) * weight`` as a new ``[rows, dim]`` tensor (None when
        ``weight`` is None)."""
        rows, dim = x.shape
        if not _rows_ok(x) or (delta is not None and (not _rows_ok(delta) or delta.shape != x.shape)):
            raise ValueError(f"add_rms_norm: x {tuple(x.shape)} / delta need float32 CPU rows with stride 1")
        out = None if weight is None else torch.empty(rows, dim, dtype=torch.float32)
        wt = None if weight is None else weight.contiguous()
        self.add_rms_norm_fn(x.data_ptr(), x.stride(0), None if delta is None else delta.data_ptr(),
                             0 if delta is None else delta.stride(0), None if wt is None else wt.data_ptr(),
                             None if out is None else out.data_ptr(), rows, dim, eps, torch.get_num_threads())
        return out

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """gate_up: float32 ``[rows, 2 * inter]`` (``[gate | up]``) -> ``silu(gate) * up`` ``[rows, inter]``."""
        gate_up = gate_up.contiguous()
        rows, inter = gate_up.shape[0], gate_up.shape[1] // 2
        out = torch.empty(rows, inter, dtype=torch.float32)
        self.silu_mul_fn(gate_up.data_ptr(), out.data_ptr(), rows, inter, torch.get_num_threads())
        return out

    def rope_(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate-half RoPE in place: x float32 ``[tokens, heads, d]`` (heads contiguous within a
        row, any row stride); cos, sin ``[tokens, 1, d]`` or ``[tokens, d]``. Returns x."""
        tokens, heads, d = x.shape
        if x.stride(2) != 1 or x.stride(1) != d or x.dtype != torch.float32:
            raise ValueError(f"rope_: x {tuple(x.shape)} strides {x.stride()} need contiguous float32 heads")
        cos, sin = cos.reshape(tokens, d).contiguous(), sin.reshape(tokens, d).contiguous()
        self.rope_fn(x.data_ptr(), x.stride(0), cos.data_ptr(), sin.data_ptr(), tokens, heads, d,
                     torch.get_num_threads())
        return x
