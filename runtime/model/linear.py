"""``y = x W^T + b`` with the weight packed once for oneDNN when the model runs on the CPU in
float32 or bfloat16.

float32: torch's ``F.linear`` on the CPU calls MKL's sgemm, which on AMD processors takes its AVX2
path; oneDNN (also inside torch) picks AVX-512 where the CPU has it and reads a weight reordered
once into its blocked layout. Measured on the 2-core EPYC (``bench/results/cpu_kernels.md``, the
e2e model's five projection shapes): 1.13-1.46x faster than ``F.linear`` for 1-2048 rows on one
thread, 1.14-1.99x on two. The results equal ``F.linear`` up to fp32 rounding (a different
summation order; every HF-parity test passes with it).

bfloat16: ``F.linear`` already runs oneDNN's bf16 GEMM (AVX512-BF16 where the CPU has it, float32
accumulation); the packed weight saves its per-call reorder (``bench/cpu_kernels.py``) and gives
the same bits (so the same tokens as transformers, which calls ``F.linear``). A torch whose oneDNN
refuses to pack bf16 on this CPU falls back to ``F.linear``.

Everything else (a GPU, float16, whose oneDNN packing needs AVX512-FP16 or AVX-NE-CONVERT, a
torch without oneDNN, or ``KGEN_CPU_LINEAR=aten`` in the environment) uses ``F.linear`` on the
dense weight; :attr:`Linear.path` says which.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

PACKED_DTYPES = (torch.float32, torch.bfloat16)


def onednn_available() -> bool:
    """Whether this torch has the oneDNN (mkldnn) packed-linear ops and they are not switched off."""
    if os.environ.get("KGEN_CPU_LINEAR", "onednn").lower() == "aten":
        return False
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


class Linear:
    """A projection with an optional bias.

    Parameters
    ----------
    weight : torch.Tensor
        ``[out_features, in_features]``, contiguous, on its device and dtype.
    bias : torch.Tensor, optional
        ``[out_features]``.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        self.bias = bias
        self.packed = None
        self.weight = weight
        self._dtype = weight.dtype
        if weight.device.type == "cpu" and weight.dtype in PACKED_DTYPES and onednn_available():
            try:
                self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
                self.weight = None  # the packed copy replaces it
            except RuntimeError:  # this CPU or torch has no oneDNN path for the dtype
                self.packed = None

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def path(self) -> str:
        """``onednn_packed`` or ``aten`` (``F.linear``)."""
        return "onednn_packed" if self.packed is not None else "aten"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``[tokens, in_features]`` -> ``[tokens, out_features]``."""
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)
