"""float32 projections through kgen's own CPU GEMM (``runtime/native/gemm.c``).

The weight is packed once into 64-column panels; each call computes ``y = x W^T + b`` with the
next panel prefetched while the current one is computed, which keeps the DRAM stream of a decode
step's weights under the arithmetic (see the C file, and bench/results/cpu_kernels.md for times
against oneDNN's packed sgemm).
"""

from __future__ import annotations

import ctypes

import torch

from runtime import huge_pages
from runtime.native_build import load_native

_P, _I = ctypes.c_void_p, ctypes.c_int64
PANEL = 64
"""Columns per packed panel (``NR`` in gemm.c)."""


def _functions():
    lib = load_native()
    if lib is None or not hasattr(lib, "kgen_gemm_f32"):
        return None
    pack, run = lib.kgen_gemm_f32_pack, lib.kgen_gemm_f32
    pack.argtypes, pack.restype = [_P, _I, _I, _P], None
    run.argtypes, run.restype = [_P, _I, _I, _I, _P, _I, _P, _P, _I, _I], ctypes.c_int
    return pack, run


class NativeGemm:
    """A float32 weight ``[out_features, in_features]`` packed for ``gemm.c``, and its bias.

    Use :meth:`for_weight`, which gives None where the kernel does not apply.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, functions) -> None:
        pack, self._run = functions
        self.out_features, self.in_features = weight.shape
        panels = -(-self.out_features // PANEL)
        w = weight.detach().contiguous()
        # packed: float32 [panels, in_features, 64], zeros past out_features
        self.packed = huge_pages.empty((panels * self.in_features * PANEL,), torch.float32)
        pack(w.data_ptr(), self.out_features, self.in_features, self.packed.data_ptr())
        self.bias = None
        if bias is not None:  # padded to whole panels: the last panel's tail adds zeros
            self.bias = torch.zeros(panels * PANEL, dtype=torch.float32)
            self.bias[: self.out_features] = bias.detach().to(torch.float32)
        self._packed_ptr = self.packed.data_ptr()
        self._bias_ptr = None if self.bias is None else self.bias.data_ptr()

    @classmethod
    def for_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None) -> "NativeGemm | None":
        """The packed weight for a float32 CPU weight when the native library builds, else None."""
        if weight.device.type != "cpu" or weight.dtype != torch.float32 or weight.dim() != 2 or weight.numel() == 0:
            return None
        functions = _functions()
        return None if functions is None else cls(weight, bias, functions)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: float32 ``[..., in_features]`` -> ``[..., out_features]``."""
        k, n = self.in_features, self.out_features
        if x.dtype != torch.float32 or x.device.type != "cpu" or x.dim() == 0 or x.shape[-1] != k:
            raise ValueError(f"Linear: x is {x.dtype} {tuple(x.shape)} on {x.device}; this projection takes float32 "
                             f"[..., {k}] on the CPU")
        rows = x if x.dim() == 2 else x.reshape(-1, k)
        if rows.stride(-1) != 1 or rows.stride(0) < k:  # rows may sit apart (a strided view), not overlap
            rows = rows.contiguous()
        m = rows.shape[0]
        y = torch.empty(m, n, dtype=torch.float32)
        status = self._run(rows.data_ptr(), rows.stride(0), m, k, self._packed_ptr, n, self._bias_ptr, y.data_ptr(),
                           n, torch.get_num_threads())
        if status:  # the checks above make this unreachable; never return unwritten memory
            raise RuntimeError(f"kgen_gemm_f32 refused x {tuple(rows.shape)} against weight [{n}, {k}] (code {status})")
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], n)
