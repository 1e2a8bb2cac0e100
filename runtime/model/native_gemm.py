"""float32 and bfloat16 projections through kgen's own CPU GEMM (``runtime/native/gemm.c``).

The weight is packed once into 64-column panels; each call computes ``y = x W^T + b`` with the
next panel prefetched while the current one is computed, which keeps the DRAM stream of a decode
step's weights under the arithmetic (see the C file, and bench/results/cpu_kernels.md for times
against oneDNN's packed GEMMs). bfloat16 needs AVX512-BF16 (VDPBF16PS); elsewhere
:meth:`NativeGemm.for_weight` gives None and the caller keeps oneDNN.
"""

from __future__ import annotations

import ctypes

import torch

from runtime import huge_pages
from runtime.native_build import load_native

_P, _I = ctypes.c_void_p, ctypes.c_int64
PANEL = 64
"""Columns per packed panel (``NR`` in gemm.c)."""


def _functions(dtype: torch.dtype):
    """(pack, run) of the library for float32 or bfloat16 (bfloat16: where it was built with
    AVX512-BF16), else None."""
    lib = load_native()
    name = {torch.float32: "f32", torch.bfloat16: "bf16"}.get(dtype)
    if lib is None or name is None or (name == "bf16" and not lib.info["bf16_gemm"]):
        return None
    pack, run = getattr(lib, f"kgen_gemm_{name}_pack"), getattr(lib, f"kgen_gemm_{name}")
    pack.argtypes, pack.restype = [_P, _I, _I, _P], None
    run.argtypes, run.restype = [_P, _I, _I, _I, _P, _I, _P, _P, _I, _I], ctypes.c_int
    return pack, run


class NativeGemm:
    """A float32 or bfloat16 weight ``[out_features, in_features]`` packed for ``gemm.c``, and its
    bias (kept in float32: bfloat16 outputs are rounded once, after it is added).

    Use :meth:`for_weight`, which gives None where the kernel does not apply.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, functions) -> None:
        pack, self._run = functions
        self.dtype = weight.dtype
        self.out_features, self.in_features = weight.shape
        panels = -(-self.out_features // PANEL)
        w = weight.detach().contiguous()
        # packed: float32 [panels, in_features, 64] or bfloat16 [panels, ceil(in_features / 2), 64, 2],
        # zeros past out_features (and past in_features)
        depth = self.in_features if self.dtype == torch.float32 else -(-self.in_features // 2) * 2
        self.packed = huge_pages.empty((panels * depth * PANEL,), self.dtype)
        pack(w.data_ptr(), self.out_features, self.in_features, self.packed.data_ptr())
        self.bias = None
        if bias is not None:  # padded to whole panels: the last panel's tail adds zeros
            self.bias = torch.zeros(panels * PANEL, dtype=torch.float32)
            self.bias[: self.out_features] = bias.detach().to(torch.float32)
        self._packed_ptr = self.packed.data_ptr()
        self._bias_ptr = None if self.bias is None else self.bias.data_ptr()

    @classmethod
    def for_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None) -> "NativeGemm | None":
        """The packed weight for a float32 or bfloat16 CPU weight when the native library builds
        (bfloat16: with AVX512-BF16), else None."""
        if weight.device.type != "cpu" or weight.dim() != 2 or weight.numel() == 0:
            return None
        functions = _functions(weight.dtype)
        return None if functions is None else cls(weight, bias, functions)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``[..., in_features]`` in the weight's dtype -> ``[..., out_features]``, same dtype."""
        k, n = self.in_features, self.out_features
        if x.dtype != self.dtype or x.device.type != "cpu" or x.dim() == 0 or x.shape[-1] != k:
            raise ValueError(f"Linear: x is {x.dtype} {tuple(x.shape)} on {x.device}; this projection takes "
                             f"{self.dtype} [..., {k}] on the CPU")
        rows = x if x.dim() == 2 else x.reshape(-1, k)
        if rows.stride(-1) != 1 or rows.stride(0) < k:  # rows may sit apart (a strided view), not overlap
            rows = rows.contiguous()
        m = rows.shape[0]
        y = torch.empty(m, n, dtype=self.dtype)
        status = self._run(rows.data_ptr(), rows.stride(0), m, k, self._packed_ptr, n, self._bias_ptr, y.data_ptr(),
                           n, torch.get_num_threads())
        if status:  # the checks above make this unreachable; never return unwritten memory
            raise RuntimeError(f"kgen_gemm ({self.dtype}) refused x {tuple(rows.shape)} against weight [{n}, {k}] "
                               f"(code {status})")
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], n)
