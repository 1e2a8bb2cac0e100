"""Whether the native CPU kernels serve a shape here, for tests that fall back when they cannot."""

import os
import shutil

import torch

from runtime.decode_native import native_lacks
from runtime.native_build import why_unavailable


def native_missing(num_heads: int, head_dim: int) -> str | None:
    """Why the native decode kernel cannot serve fp32 ``num_heads x head_dim`` here (None: it can).
    Where a C compiler exists and ``KGEN_NATIVE=0`` is not set, a failed build raises instead of
    being returned: tests must not quietly skip or switch backends over a broken kernel."""
    missing = native_lacks(torch.float32, num_heads, head_dim, torch.device("cpu"))
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if missing and why_unavailable() and compiler and os.environ.get("KGEN_NATIVE", "1") != "0":
        raise AssertionError(f"the native kernels did not build with {compiler}: {why_unavailable()}")
    return missing
