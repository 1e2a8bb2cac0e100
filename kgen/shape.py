"""AttentionShape: an attention layer's static shape, normalised once; kgen's capabilities as data.

An engine describes each attention layer once: the query dtype, the head size, how many query
heads share a KV head, the KV cache's element type, the attention features it needs and, where
the cache layout already fixes it, the block size. Everything kgen answers about that layer
(supported?, which block size, which kernel per step) starts from this one frozen value:
:meth:`kgen.dispatch.Dispatcher.plan` takes it, workloads and database lookups are keyed by it.

A shape only has to be well formed (known dtype names, positive integers); whether kgen's kernels
cover it is :meth:`AttentionShape.problem`, a reason naming the value, read against
:data:`CAPABILITIES` (the kernel space as data, the way vLLM's backends declare
``supported_kv_cache_dtypes`` and ``supports_head_size``).

Standard library only: the runtime's config and model modules import it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from kgen.dtypes import (DTYPES, KV_DTYPES, KV_KEY_TAGS, kv_dtype_target_problem, normalize_dtype,
                         normalize_kv_dtype)
from kgen.features import FEATURES, key_suffix, normalize_features

HEAD_DIMS = (64, 80, 96, 112, 128, 192, 256)
BLOCK_SIZES = (1, 8, 16, 32, 64, 128, 256)
GROUP_SIZES = tuple(range(1, 17))
DEFAULT_BLOCK_SIZE = 16  # the paper's and vLLM's default, used when the database has no preference

# What kgen's kernels cover, as data: field -> values.
CAPABILITIES = {
    "dtype": DTYPES,
    "kv_dtype": KV_DTYPES,
    "head_dim": HEAD_DIMS,
    "group_size": GROUP_SIZES,
    "block_size": BLOCK_SIZES,
    "features": FEATURES,
}


def _shown(values: tuple) -> str:
    """``1..16`` for a run of consecutive integers, else the values comma-separated."""
    if len(values) > 3 and all(isinstance(v, int) for v in values) \
            and list(values) == list(range(values[0], values[-1] + 1)):
        return f"{values[0]}..{values[-1]}"
    return ", ".join(map(str, values))


def _positive_int(owner: str, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}: {name}={value!r} must be a positive int")


def normalize_fields(obj, *, allowed: dict[str, tuple] | None = None) -> None:
    """Normalise a frozen dataclass's ``dtype`` / ``kv_dtype`` / ``features`` in place, then
    check its integer fields against ``allowed`` (field -> allowed values).

    The one normalisation shared by :class:`AttentionShape`, :class:`kgen.variant.VariantConfig`
    and :class:`kgen.workload.Workload`. Raises ValueError naming the field and the value.
    """
    names = {f.name for f in dataclasses.fields(obj)}
    object.__setattr__(obj, "dtype", normalize_dtype(obj.dtype))
    if "kv_dtype" in names:
        object.__setattr__(obj, "kv_dtype", normalize_kv_dtype(obj.kv_dtype))
    if "features" in names:
        object.__setattr__(obj, "features", normalize_features(obj.features))
    for name, values in (allowed or {}).items():
        value = getattr(obj, name)
        if isinstance(value, bool) or not isinstance(value, int) or value not in values:
            raise ValueError(f"{name}={value!r} is not supported; allowed: {_shown(values)}")


@dataclass(frozen=True)
class AttentionShape:
    """The static shape of one attention layer, as kgen's dispatch sees it.

    Parameters
    ----------
    dtype : str or torch.dtype
        The query's (and output's) element type: ``fp16``, ``bf16``, ``fp32`` or an alias
        (``torch.bfloat16``, ``"bfloat16"``); stored as the short name.
    head_dim : int
        Size of one attention head.
    group_size : int
        Query heads per KV head (``num_heads // num_kv_heads``; 1 without GQA).
    kv_dtype : str or torch.dtype
        The KV cache's element type, one vocabulary (:mod:`kgen.dtypes`): ``auto`` (= dtype),
        ``fp8`` / ``fp8_e4m3`` / ``torch.float8_e4m3fn``, ``fp8_e5m2`` / ``torch.float8_e5m2``.
    features : str or iterable of str
        Attention features the layer needs (``sliding_window``, ``soft_cap``, ``alibi``,
        ``sinks``; a comma string is split), stored in kgen's canonical order.
    block_size : int or None
        Tokens per KV page when the cache layout fixes it (vLLM's cache); None lets the plan
        choose (the tuning database's preference for this shape, else 16).

    Raises
    ------
    ValueError
        On a malformed value (unknown dtype name, non-positive integer), naming it. A value kgen
        merely does not support is not an error here: see :meth:`problem`.
    """

    dtype: str
    head_dim: int
    group_size: int = 1
    kv_dtype: str = "auto"
    features: tuple = ()
    block_size: int | None = None

    def __post_init__(self) -> None:
        normalize_fields(self)
        for name in ("head_dim", "group_size"):
            _positive_int("AttentionShape", name, getattr(self, name))
        if self.block_size is not None:
            _positive_int("AttentionShape", "block_size", self.block_size)

    @classmethod
    def from_heads(cls, *, dtype, head_dim: int, num_heads: int, num_kv_heads: int,
                   **rest) -> "AttentionShape":
        """The shape of a layer with ``num_heads`` query heads over ``num_kv_heads`` KV heads."""
        _positive_int("AttentionShape", "num_heads", num_heads)
        _positive_int("AttentionShape", "num_kv_heads", num_kv_heads)
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
        return cls(dtype=dtype, head_dim=head_dim, group_size=num_heads // num_kv_heads, **rest)

    def with_block_size(self, block_size: int) -> "AttentionShape":
        """The same shape with its block size fixed."""
        return dataclasses.replace(self, block_size=block_size)

    @property
    def kv_fp8(self) -> bool:
        return self.kv_dtype != "auto"

    @property
    def key(self) -> str:
        """Readable name, e.g. ``bf16-d128-g4-b16-kvfp8e4m3-swa`` (``b?`` without a block size)."""
        block = "?" if self.block_size is None else self.block_size
        return (f"{self.dtype}-d{self.head_dim}-g{self.group_size}-b{block}"
                + key_suffix(KV_KEY_TAGS.get(self.kv_dtype), self.features))

    def variant_fields(self) -> dict:
        """The variant fields this shape fixes (block size included: it must be set)."""
        if self.block_size is None:
            raise ValueError(f"shape {self.key} has no block size; give one or use a plan's")
        return {"head_dim": self.head_dim, "block_size": self.block_size,
                "group_size": self.group_size, "dtype": self.dtype, "kv_dtype": self.kv_dtype,
                "features": self.features}

    def problem(self, compute_capability: int | None = None, where: str = "") -> str | None:
        """The first reason kgen's kernels do not cover this shape, or None.

        ``compute_capability`` (e.g. 80; None: any) adds the target rules: an e4m3 cache needs
        sm_89+. ``where`` names the device in that message.
        """
        for name in ("dtype", "kv_dtype", "head_dim", "group_size", "block_size"):
            value = getattr(self, name)
            if value is not None and value not in CAPABILITIES[name]:
                what = " (query heads per KV head)" if name == "group_size" else ""
                return (f"{name}={value}{what} is not supported "
                        f"(kgen has {_shown(CAPABILITIES[name])})")
        return kv_dtype_target_problem(self.kv_dtype, compute_capability,
                                       where or f"sm_{compute_capability}")

    def __str__(self) -> str:
        return self.key
