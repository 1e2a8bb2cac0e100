"""Element types, written once: the short names kgen uses and the torch dtypes they stand for.

Standard library only (torch is imported inside :func:`torch_dtype`), so the variant space, the
workload vocabulary and the database can name dtypes without importing torch.
"""

from __future__ import annotations

DTYPES = ("fp16", "bf16", "fp32")  # query / output / (default) KV-cache element types

# Accepted spellings (torch names and short names) -> canonical short name.
DTYPE_ALIASES = {
    "fp16": "fp16", "float16": "fp16", "half": "fp16", "torch.float16": "fp16",
    "bf16": "bf16", "bfloat16": "bf16", "torch.bfloat16": "bf16",
    "fp32": "fp32", "float32": "fp32", "float": "fp32", "torch.float32": "fp32",
}

# Short name -> attribute of the ``torch`` module (``torch.<name>``).
TORCH_NAMES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


def normalize_dtype(dtype, *, name: str = "dtype") -> str:
    """Map a dtype (``torch.bfloat16``, ``"bfloat16"``, ``"bf16"`` ...) to ``fp16|bf16|fp32``.

    Raises ValueError naming ``name`` and the value when it is not one of them.
    """
    canonical = DTYPE_ALIASES.get(str(dtype).lower())
    if canonical is None:
        raise ValueError(f"{name}={dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    return canonical


def torch_dtype(dtype, *, name: str = "dtype"):
    """The ``torch.dtype`` for a short name or alias (imports torch)."""
    import torch  # heavy: only callers that build tensors pay for it

    return getattr(torch, TORCH_NAMES[normalize_dtype(dtype, name=name)])
