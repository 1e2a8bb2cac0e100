"""Test-wide setup: run Triton kernels under the interpreter when no GPU is present.

TRITON_INTERPRET must be set before any ``@triton.jit`` function is created, so it is set here,
before test modules import kernels. On a GPU machine (bench/gpu_check.sh) it is left unset and the
same tests run the compiled kernels.

Tests marked ``gpu`` (they live in ``tests/test_gpu_*.py``; ``bench/gpu_check.sh`` runs them with
``-m gpu``) check what the interpreter cannot: compiled bf16 tensor-core dots, long contexts, the
tuner's timing path. They are skipped, with the reason, where there is no CUDA device or where
TRITON_INTERPRET=1 would run them on the interpreter.
"""

import os

import pytest

try:
    import torch

    HAS_GPU = torch.cuda.is_available()
except Exception:  # pragma: no cover - torch missing is reported by the tests themselves
    HAS_GPU = False

if "TRITON_INTERPRET" not in os.environ and not HAS_GPU:
    os.environ["TRITON_INTERPRET"] = "1"


def _gpu_skip_reason() -> str | None:
    if not HAS_GPU:
        return "needs a CUDA GPU (compiled Triton kernels); bench/gpu_check.sh runs it there"
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return "TRITON_INTERPRET is set: this test checks compiled kernels, not the interpreter"
    return None


def pytest_collection_modifyitems(config, items):
    reason = _gpu_skip_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)
