"""``y = x W^T + b`` with the weight packed once for oneDNN when the model runs fp32 on the CPU.

torch's ``F.linear`` on the CPU calls MKL's sgemm, which on AMD processors takes its AVX2 path;
oneDNN (also inside torch) picks AVX-512 where the CPU has it and reads a weight reordered once
into its blocked layout. Measured on the 2-core EPYC (``bench/results/cpu_kernels.md``, the e2e
model's five projection shapes): 1.13-1.46x faster than ``F.linear`` for 1-2048 rows on one
thread, 1.14-1.99x on two. The results equal ``F.linear`` up to fp32 rounding (a different
summation order; every HF-parity test passes with it).

Everything else (a GPU, fp16/bf16, a torch without oneDNN, or ``KGEN_CPU_LINEAR=aten`` in the
environment) uses ``F.linear`` on the dense weight.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F


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
        if weight.device.type == "cpu" and weight.dtype == torch.float32 and onednn_available():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
            self.weight = None  # the packed copy replaces it

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32 if self.packed is not None else self.weight.dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``[tokens, in_features]`` -> ``[tokens, out_features]``."""
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)
