"""Test-wide setup: run Triton kernels under the interpreter when no GPU is present.

TRITON_INTERPRET must be set before any ``@triton.jit`` function is created, so it is set here,
before test modules import kernels. On a GPU machine (bench/gpu_check.sh) it is left unset and the
same tests run the compiled kernels.
"""

import os

if "TRITON_INTERPRET" not in os.environ:
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch missing is reported by the tests themselves
        has_gpu = False
    if not has_gpu:
        os.environ["TRITON_INTERPRET"] = "1"
