"""AttentionVariantConfig: one point of the ``paged_attention`` kernel family (any query length).

The family serves every query length per sequence over the paged KV cache in one launch: decode
(1 token), speculative decode (2..16), chunked prefill and prefix extends (hundreds or thousands),
and batches mixing them. Its key, e.g. ``paged_attention-d128-b16-g4-m64-sauto-t64-w4-st2-bf16``,
names the family first, so a key says which kind of kernel it is (:func:`config_from_key`).

Key fields, in order:

====  ============  ===============================================================
d     head_dim      as the decode family: 64, 80, 96, 112, 128, 192, 256
b     block_size    as the decode family: 1, 8, 16, 32, 64, 128, 256
g     group_size    query heads per KV head (GQA), 1..16
m     q_tile        rows of the dot: query tokens x group heads packed, a power of two
                    16..128 (q_tile // group_size query tokens per tile: at least 1, as
                    groups have at most 16 heads)
s     split_k       segments of the context for short queries (decode, speculative):
                    1 = never, ``auto`` (stored as 0) = planned per call, n = n segments
t     tile_tokens   key tile: tokens per inner step, power of two 16..256
w     num_warps     Triton ``num_warps``: 1, 2, 4, 8, 16
st    num_stages    Triton ``num_stages``: 1..5
--    dtype         fp16, bf16, fp32 (query and output)
kv    kv_dtype      ``-kvfp8e4m3`` / ``-kvfp8e5m2`` when the cache is fp8 (as decode)
--    features      ``-swa`` ``-cap`` ``-alibi`` ``-sinks`` (as decode)
====  ============  ===============================================================
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from kgen.features import SUFFIX_PATTERN
from kgen.variant import SPLIT_AUTO, VariantConfig, VariantFields

Q_TILES = (16, 32, 64, 128)
KEY_PREFIX = "paged_attention"
_KEY_RE = re.compile(
    r"^paged_attention-d(?P<head_dim>\d+)-b(?P<block_size>\d+)-g(?P<group_size>\d+)"
    r"-m(?P<q_tile>\d+)-s(?P<split_k>\d+|auto)-t(?P<tile_tokens>\d+)-w(?P<num_warps>\d+)"
    r"-st(?P<num_stages>\d+)-(?P<dtype>fp16|bf16|fp32)"
    + SUFFIX_PATTERN + "$"
)


@dataclass(frozen=True)
class AttentionVariantConfig(VariantFields):
    """One ``paged_attention`` kernel variant. Frozen and hashable; validates itself.

    Parameters
    ----------
    head_dim, block_size, group_size : int
        As :class:`kgen.variant.VariantConfig` (group sizes 1..16, non powers of two included).
    q_tile : int
        Rows of the attention dot, one of :data:`Q_TILES`: ``q_tile // group_size`` query tokens
        times ``group_size`` heads of one KV head (row m is token m // group_size, head
        m % group_size; rows past the last whole token are masked). Every q tile (16+ rows) holds
        at least one token of the largest group (16 heads).
        Long queries are cut into tiles of that many tokens; a call whose longest query fits
        one tile uses a row tile sized to it (at least 16 rows, at most ``q_tile``).
    split_k : int
        Context segments for short queries (those fitting one q tile): 1 = never; 0 = ``auto``
        (the launcher's planner picks the count per call from the SMs, the batch, the KV heads
        and ``max_seq_len``); n = n segments.
    tile_tokens : int
        Key tile (tokens per inner-loop step), one of ``TILE_TOKENS``.
    num_warps, num_stages : int
        Triton launch parameters.
    dtype, kv_dtype, features
        As :class:`kgen.variant.VariantConfig`.
    """

    head_dim: int = 128
    block_size: int = 16
    group_size: int = 1
    q_tile: int = 64
    split_k: int = SPLIT_AUTO
    tile_tokens: int = 64
    num_warps: int = 4
    num_stages: int = 2
    dtype: str = "fp16"
    kv_dtype: str = "auto"
    features: tuple = ()

    family = "attention"  # the kernel family (a class attribute, not a field)
    KEY_PREFIX = KEY_PREFIX
    KEY_EXAMPLE = "paged_attention-d128-b16-g4-m64-sauto-t64-w4-st2-bf16"
    _KEY_RE = _KEY_RE
    _AXES = VariantConfig._AXES[:3] + (("q_tile", Q_TILES),) + VariantConfig._AXES[3:]
    _KEY_PARTS = VariantConfig._KEY_PARTS[:3] + (("m", "q_tile"),) + VariantConfig._KEY_PARTS[3:]

    @property
    def tokens_per_q_tile(self) -> int:
        """Query tokens one tile of ``q_tile`` rows holds (``q_tile // group_size``)."""
        return self.q_tile // self.group_size


FAMILIES = {VariantConfig.KEY_PREFIX: VariantConfig, KEY_PREFIX: AttentionVariantConfig}
CONFIG_TYPES = (VariantConfig, AttentionVariantConfig)


def family_class(key: str) -> type:
    """The config class of the family a variant key names by its prefix; ValueError naming it."""
    cls = FAMILIES.get(str(key).strip().split("-", 1)[0])
    if cls is None:
        raise ValueError(f"variant key {key!r} is malformed: it names no kernel family (its "
                         f"prefix must be one of {', '.join(FAMILIES)})")
    return cls


def config_from_key(key: str):
    """The variant a key names, of either family (``paged_decode-...`` or ``paged_attention-...``).

    Raises
    ------
    ValueError
        Naming the key when its prefix is no family's or it does not parse.
    """
    if not isinstance(key, str):
        raise ValueError(f"key={key!r} is not a variant key string")
    return family_class(key).from_key(key)


def as_config(config):
    """``config`` itself when it is a variant of either family, else the variant its key names."""
    if isinstance(config, CONFIG_TYPES):
        return config
    if isinstance(config, str):
        return config_from_key(config)
    raise ValueError(f"config={config!r} is not a VariantConfig, an AttentionVariantConfig or a "
                     "variant key")
