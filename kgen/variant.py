"""VariantConfig: one point of the PagedAttention decode kernel space.

A variant is a frozen dataclass that checks itself on construction and names the bad field in its
error. Its readable key, e.g. ``paged_decode-d128-b16-g4-s4-t64-w4-st2-bf16``, names the rendered
source file, the in-process cache entry, tuning records and the header of an emitted module.

Key fields, in order:

====  ============  ===============================================================
d     head_dim      64, 80, 96, 112, 128, 192, 256 (non powers of two padded, masked)
b     block_size    tokens per KV page: 1, 8, 16, 32, 64, 128, 256
g     group_size    query heads per KV head (GQA), 1..16
s     split_k       partitions of the context (flash-decoding); 1 = single pass,
                    ``auto`` (stored as 0) = chosen at call time
t     tile_tokens   tokens per inner step (one or several pages), power of two 16..256
w     num_warps     Triton ``num_warps``: 1, 2, 4, 8, 16
st    num_stages    Triton ``num_stages``: 1..5
--    dtype         fp16, bf16, fp32 (query, output and, by default, the KV cache)
kv    kv_dtype      the KV cache's element type when it differs: ``-kvfp8e4m3``, ``-kvfp8e5m2``
--    features      attention features compiled in: ``-swa`` ``-cap`` ``-alibi`` ``-sinks``
====  ============  ===============================================================

The last two are suffixes present only when not the default (``auto`` KV dtype, no features), so
every key written before they existed still parses to the same variant, e.g.
``paged_decode-d128-b16-g4-s4-t64-w4-st2-bf16-kvfp8e4m3-swa-cap``.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from kgen.dtypes import (DTYPES, KV_DTYPES, KV_KEY_TAGS, kv_torch_dtype,  # noqa: F401 - re-exported
                         normalize_dtype, normalize_kv_dtype, torch_dtype)
from kgen.features import FEATURES, KEY_TAGS, SUFFIX_PATTERN, drop_default_axes, key_suffix, parse_suffix
from kgen.shape import BLOCK_SIZES, GROUP_SIZES, HEAD_DIMS, normalize_fields  # noqa: F401 - re-exported

TILE_TOKENS = (16, 32, 64, 128, 256)
NUM_WARPS = (1, 2, 4, 8, 16)
NUM_STAGES = (1, 2, 3, 4, 5)
MAX_SPLIT_K = 256
SPLIT_AUTO = 0  # split_k value meaning "pick the partition count at call time"

KEY_PREFIX = "paged_decode"
_KEY_RE = re.compile(
    r"^paged_decode-d(?P<head_dim>\d+)-b(?P<block_size>\d+)-g(?P<group_size>\d+)"
    r"-s(?P<split_k>\d+|auto)-t(?P<tile_tokens>\d+)-w(?P<num_warps>\d+)-st(?P<num_stages>\d+)"
    r"-(?P<dtype>fp16|bf16|fp32)"
    + SUFFIX_PATTERN + "$"
)


def parse_split_k(value) -> int:
    """``"auto"`` -> 0 (SPLIT_AUTO); an integer string or int -> that int (validated later)."""
    if isinstance(value, str):
        if value.strip().lower() == "auto":
            return SPLIT_AUTO
        try:
            return int(value)
        except ValueError:
            raise ValueError(f"split_k={value!r} is not an integer or 'auto'") from None
    return int(value)


def normalize_variant_fields(config, axes) -> None:
    """Normalize and check a frozen variant dataclass in place (its ``__post_init__``).

    ``split_k`` is parsed here; ``dtype``, ``kv_dtype``, ``features`` and the integer ``axes``
    (``(name, allowed)`` pairs) go through :func:`kgen.shape.normalize_fields`, the one
    normalisation shared with :class:`kgen.shape.AttentionShape` and
    :class:`kgen.workload.Workload`. The ValueError names the field, its value and what is allowed.
    """
    object.__setattr__(config, "split_k", parse_split_k(config.split_k))
    normalize_fields(config, allowed=dict(axes))
    if not 0 <= config.split_k <= MAX_SPLIT_K:
        raise ValueError(f"split_k={config.split_k!r} must be 'auto' (0) or 1..{MAX_SPLIT_K}")


class VariantFields:
    """What every kernel family's variant dataclass shares: validation, the key and its parsing,
    dict round trips, the KV-dtype and feature properties. A subclass (a frozen dataclass) sets
    ``family``, ``KEY_PREFIX``, ``KEY_EXAMPLE``, ``_AXES`` (the integer fields and their allowed
    values), ``_KEY_PARTS`` (``(tag, field)`` in key order) and ``_KEY_RE`` (named groups = its
    fields, plus :data:`kgen.features.SUFFIX_PATTERN`'s)."""

    def __post_init__(self) -> None:
        normalize_variant_fields(self, self._AXES)

    @property
    def key(self) -> str:
        """Readable unique name: the family prefix, ``<tag><value>`` per key part (split-K 0 as
        ``auto``), the dtype, then the KV dtype and feature suffixes, e.g.
        ``paged_decode-d128-b16-g4-s4-t64-w4-st2-bf16``."""
        parts = [f"{tag}{'auto' if name == 'split_k' and self.split_k == SPLIT_AUTO else getattr(self, name)}"
                 for tag, name in self._KEY_PARTS]
        return ("-".join([self.KEY_PREFIX, *parts, self.dtype])
                + key_suffix(KV_KEY_TAGS.get(self.kv_dtype), self.features))

    @classmethod
    def from_key(cls, key: str):
        """Parse a key produced by :attr:`key`; raises ValueError naming the key if malformed."""
        match = cls._KEY_RE.match(key.strip())
        if not match:
            raise ValueError(f"variant key {key!r} is malformed; expected e.g. {cls.KEY_EXAMPLE!r}")
        fields = match.groupdict()
        suffix = parse_suffix(fields)
        config = cls(**{k: (v if k in ("dtype", "split_k") else int(v)) for k, v in fields.items()},
                     **suffix)
        if config.key != key.strip():
            raise ValueError(f"variant key {key!r} is not canonical (feature suffixes once each, "
                             f"in the order {', '.join(KEY_TAGS[f] for f in FEATURES)}); "
                             f"did you mean {config.key!r}?")
        return config

    # ---- conversions ------------------------------------------------------------------------
    @property
    def split_auto(self) -> bool:
        return self.split_k == SPLIT_AUTO

    @property
    def kv_fp8(self) -> bool:
        """True when the KV cache holds fp8 values (dequantized with k_scale / v_scale)."""
        return self.kv_dtype != "auto"

    @property
    def plain(self) -> bool:
        """True for the original space: KV cache in ``dtype``, no attention feature."""
        return self.kv_dtype == "auto" and not self.features

    def has(self, feature: str) -> bool:
        """Whether ``feature`` (one of :data:`kgen.features.FEATURES`) is compiled in."""
        return feature in self.features

    def to_dict(self) -> dict:
        """The fields as JSON-ready values, :meth:`from_dict`'s input.

        ``kv_dtype`` and ``features`` appear only when not the default, so a plain variant's dict
        (and the tuning records holding it) is the same as before these axes existed.
        """
        return drop_default_axes(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown variant field(s): {', '.join(sorted(unknown))}")
        return cls(**data)

    def replace(self, **changes):
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @property
    def torch_dtype(self):
        return torch_dtype(self.dtype)

    @property
    def kv_torch_dtype(self):
        """The KV cache's torch dtype (``torch_dtype`` for ``auto``)."""
        return kv_torch_dtype(self.kv_dtype, self.dtype)

    def __str__(self) -> str:
        return self.key


@dataclass(frozen=True)
class VariantConfig(VariantFields):
    """One decode kernel variant. Frozen and hashable; validates itself on construction.

    Parameters
    ----------
    head_dim : int
        Size of one attention head; one of ``HEAD_DIMS``.
    block_size : int
        Tokens per KV-cache page; one of ``BLOCK_SIZES``.
    group_size : int
        Query heads sharing one KV head (``num_heads // num_kv_heads``), 1..16.
    split_k : int
        Number of context partitions (1 = single pass; 0 = ``auto``, chosen per call).
    tile_tokens : int
        Tokens processed per inner-loop step; one of ``TILE_TOKENS``.
    num_warps, num_stages : int
        Triton launch parameters.
    dtype : str
        ``fp16``, ``bf16`` or ``fp32`` (aliases such as ``torch.bfloat16`` are accepted): the
        query's and the output's element type.
    kv_dtype : str
        The KV cache's element type: ``auto`` (same as ``dtype``), ``fp8_e4m3`` or ``fp8_e5m2``.
    features : tuple of str
        Attention features compiled in, any of ``sliding_window``, ``soft_cap``, ``alibi``,
        ``sinks`` (a comma string or any iterable is accepted; stored in canonical order).
    """

    head_dim: int = 128
    block_size: int = 16
    group_size: int = 1
    split_k: int = 1
    tile_tokens: int = 64
    num_warps: int = 4
    num_stages: int = 2
    dtype: str = "fp16"
    kv_dtype: str = "auto"
    features: tuple = ()

    family = "decode"  # the kernel family (a class attribute, not a field)
    KEY_PREFIX = KEY_PREFIX
    KEY_EXAMPLE = "paged_decode-d128-b16-g4-s4-t64-w4-st2-bf16"
    _KEY_RE = _KEY_RE
    _AXES = (("head_dim", HEAD_DIMS), ("block_size", BLOCK_SIZES), ("group_size", GROUP_SIZES),
             ("tile_tokens", TILE_TOKENS), ("num_warps", NUM_WARPS), ("num_stages", NUM_STAGES))
    _KEY_PARTS = (("d", "head_dim"), ("b", "block_size"), ("g", "group_size"), ("s", "split_k"),
                  ("t", "tile_tokens"), ("w", "num_warps"), ("st", "num_stages"))

