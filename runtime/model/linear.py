"""``y = x W^T + b`` with the weight packed once for the CPU: kgen's own GEMM in float32 and (with
AVX512-BF16) bfloat16, else oneDNN's.

Native (:mod:`runtime.model.native_gemm`, ``runtime/native/gemm.c``): a decode step streams every
weight from DRAM (the e2e model's 97 MB in float32 do not fit the cache); that kernel prefetches
each 64-column panel of the weight while it computes the one before, where oneDNN's packed GEMMs
(the previous path; in float32 itself faster than ``F.linear``, whose MKL sgemm takes its AVX2
path on AMD) wait on the stream. Times of both, warm and cold: ``bench/results/cpu_kernels.md``.
float32 results equal ``F.linear``'s up to float32 rounding (every HF-parity test passes with it);
bfloat16 ones are oneDNN's bits but where two float32 sums of different order round apart.

oneDNN packed: bfloat16 on CPUs without AVX512-BF16 (``F.linear``'s bits, as transformers calls
it); a torch whose oneDNN refuses to pack the dtype falls back to ``F.linear``.

``KGEN_CPU_LINEAR`` picks another path: ``onednn`` (oneDNN packed for both dtypes) or ``aten``
(``F.linear`` on the dense weight everywhere). Everything else (a GPU, float16, whose oneDNN
packing needs AVX512-FP16 or AVX-NE-CONVERT, a torch without oneDNN, no C compiler for the native
kernel) falls through to the next path that applies; :attr:`Linear.path` says which ran.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from runtime.model.native_gemm import NativeGemm

LINEAR_PATHS = ("native", "onednn", "aten")
"""Values of ``KGEN_CPU_LINEAR``, fastest first (``native`` is the default)."""
PACKED_DTYPES = (torch.float32, torch.bfloat16)


def linear_choice() -> str:
    """``KGEN_CPU_LINEAR`` (default ``native``), checked: a value that is not a path is an error."""
    choice = os.environ.get("KGEN_CPU_LINEAR", "native").strip().lower() or "native"
    if choice not in LINEAR_PATHS:
        raise ValueError(f"KGEN_CPU_LINEAR={os.environ['KGEN_CPU_LINEAR']!r}: expected one of "
                         f"{', '.join(LINEAR_PATHS)}")
    return choice


def onednn_available() -> bool:
    """Whether this torch has the oneDNN (mkldnn) packed-linear ops and they are not switched off."""
    if linear_choice() == "aten":
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
        self.packed = self.native = None
        self.weight = weight
        self._dtype = weight.dtype
        if linear_choice() == "native":
            self.native = NativeGemm.for_weight(weight, bias)
            if self.native is not None:
                self.weight = None  # the packed copy replaces it
                return
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
        """``native_gemm``, ``onednn_packed`` or ``aten`` (``F.linear``)."""
        return "native_gemm" if self.native is not None else "onednn_packed" if self.packed is not None else "aten"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``[tokens, in_features]`` -> ``[tokens, out_features]``."""
        if self.native is not None:
            return self.native(x)
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)
