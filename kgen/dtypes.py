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
#
# The one vocabulary of KV-cache dtypes, accepted alike by the CLI (``--kv-dtype``), the runtime
# (``generate(kv_cache_dtype=...)``), :class:`kgen.shape.AttentionShape` and the vLLM adapter:
# the canonical names, vLLM's ``fp8`` (= e4m3) and torch's fp8 dtypes (objects or their names).
# Spellings are exact (no case folding, no abbreviations such as ``e4m3``).
KV_DTYPES = ("auto", "fp8_e4m3", "fp8_e5m2")
KV_DTYPE_ALIASES = {
    "auto": "auto", "fp8": "fp8_e4m3",
    "fp8_e4m3": "fp8_e4m3", "float8_e4m3fn": "fp8_e4m3", "torch.float8_e4m3fn": "fp8_e4m3",
    "fp8_e5m2": "fp8_e5m2", "float8_e5m2": "fp8_e5m2", "torch.float8_e5m2": "fp8_e5m2",
}
KV_TORCH_NAMES = {"fp8_e4m3": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2"}
KV_KEY_TAGS = {"fp8_e4m3": "kvfp8e4m3", "fp8_e5m2": "kvfp8e5m2"}  # variant / workload key suffixes
KV_ELEM_BYTES = {"fp8_e4m3": 1, "fp8_e5m2": 1}
KV_DTYPE_SPELLINGS = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2", "torch.float8_e4m3fn", "torch.float8_e5m2")

# Triton converts e4m3 (fp8e4nv) only on sm_89 and newer ("type fp8e4nv not supported in this
# architecture" for sm_80, checked with triton 3.9); e5m2 converts everywhere. The one rule, used
# by the variant space's target prune (by compile target) and by dispatch (by the GPU's name).
FP8_E4M3_MIN_CC = 89


def normalize_kv_dtype(kv_dtype, *, name: str = "kv_dtype", model_dtype=None) -> str:
    """Map a KV-cache dtype to ``auto|fp8_e4m3|fp8_e5m2`` (see :data:`KV_DTYPE_ALIASES`).

    ``None`` means ``auto``. With ``model_dtype`` given, a plain dtype equal to it (vLLM passes
    ``"bfloat16"`` for a bf16 model's cache) also means ``auto``.

    Raises
    ------
    ValueError
        Naming ``name`` and the value, with the accepted spellings.
    """
    if kv_dtype is None:
        return "auto"
    canonical = KV_DTYPE_ALIASES.get(str(kv_dtype).strip()) if not isinstance(kv_dtype, bool) else None
    if canonical is not None:
        return canonical
    plain = DTYPE_ALIASES.get(str(kv_dtype).strip())
    if plain is not None and model_dtype is not None:
        model = normalize_dtype(model_dtype, name="model dtype")
        if plain == model:
            return "auto"
        raise ValueError(f"{name}={kv_dtype!r} differs from the model's dtype {model}: a KV cache "
                         f"holds the model's dtype ('auto') or fp8 ({', '.join(KV_DTYPE_SPELLINGS)})")
    raise ValueError(f"{name}={kv_dtype!r} is not supported; use one of "
                     f"{', '.join(KV_DTYPE_SPELLINGS)}")


def kv_dtype_target_problem(kv_dtype: str, cc: int | None, where: str) -> str | None:
    """Why a (canonical) KV dtype cannot run on compute capability ``cc`` (e.g. 80), or None.

    ``where`` names the target in the message (``sm_80``, ``a100 (ampere)``). An unknown ``cc``
    (None) is never refused.
    """
    if kv_dtype == "fp8_e4m3" and cc is not None and cc < FP8_E4M3_MIN_CC:
        return (f"kv_dtype=fp8_e4m3 is not supported on {where}: Triton converts e4m3 only on "
                f"sm_{FP8_E4M3_MIN_CC}+ (fp8_e5m2 works everywhere)")
    return None


def kv_torch_dtype(kv_dtype, dtype):
    """The cache's ``torch.dtype``: ``dtype``'s for ``auto``, else the fp8 type (imports torch)."""
    import torch  # heavy: only callers that build tensors pay for it

    kv = normalize_kv_dtype(kv_dtype)
    return torch_dtype(dtype) if kv == "auto" else getattr(torch, KV_TORCH_NAMES[kv])
