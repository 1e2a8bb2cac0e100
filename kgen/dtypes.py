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


# ---- KV-cache element types -------------------------------------------------------------------
# ``auto``: the cache holds the query's dtype; fp8: the cache holds 8-bit floats dequantized with
# k_scale / v_scale inside the kernel (query and output stay in the query's dtype).
KV_DTYPES = ("auto", "fp8_e4m3", "fp8_e5m2")
KV_DTYPE_ALIASES = {
    "auto": "auto", "none": "auto", "": "auto",
    "fp8_e4m3": "fp8_e4m3", "fp8e4m3": "fp8_e4m3", "e4m3": "fp8_e4m3", "float8_e4m3fn": "fp8_e4m3",
    "torch.float8_e4m3fn": "fp8_e4m3", "fp8": "fp8_e4m3",
    "fp8_e5m2": "fp8_e5m2", "fp8e5m2": "fp8_e5m2", "e5m2": "fp8_e5m2", "float8_e5m2": "fp8_e5m2",
    "torch.float8_e5m2": "fp8_e5m2",
}
KV_TORCH_NAMES = {"fp8_e4m3": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2"}
KV_KEY_TAGS = {"fp8_e4m3": "kvfp8e4m3", "fp8_e5m2": "kvfp8e5m2"}  # variant / workload key suffixes
KV_ELEM_BYTES = {"fp8_e4m3": 1, "fp8_e5m2": 1}


def normalize_kv_dtype(kv_dtype, *, name: str = "kv_dtype") -> str:
    """Map a KV-cache dtype (``None``/``"auto"``, ``"fp8_e4m3"``, ``torch.float8_e5m2`` ...) to
    ``auto|fp8_e4m3|fp8_e5m2``; raises ValueError naming ``name`` and the value otherwise."""
    canonical = KV_DTYPE_ALIASES.get("auto" if kv_dtype is None else str(kv_dtype).strip().lower())
    if canonical is None:
        raise ValueError(f"{name}={kv_dtype!r} is not supported; use one of {', '.join(KV_DTYPES)}")
    return canonical


def kv_torch_dtype(kv_dtype, dtype):
    """The cache's ``torch.dtype``: ``dtype``'s for ``auto``, else the fp8 type (imports torch)."""
    import torch  # heavy: only callers that build tensors pay for it

    kv = normalize_kv_dtype(kv_dtype)
    return torch_dtype(dtype) if kv == "auto" else getattr(torch, KV_TORCH_NAMES[kv])
