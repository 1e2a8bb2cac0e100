"""The ``paged_attention`` family's space: axes as data, pure prune rules, a default, enumeration.

Shared with the decode family (:mod:`kgen.space`): the axis filters, the iteration, the target
rules (an e4m3 cache needs sm_89+) and the rules about the K/V tile, which is loaded and pipelined
exactly as in decode (``prune_smem``'s K/V stages, ``prune_registers``' per-thread tile bytes and
16-byte vector-load floor, ``prune_stages``, ``prune_fp32_fp8_stages``). This family adds the rules
about its query rows: a program holds a [q_tile, head_dim] query tile, a [q_tile, tile_tokens]
score tile and a [q_tile, head_dim] fp32 accumulator, all of which grow with ``q_tile``.
"""

from __future__ import annotations

from typing import Callable, Iterator

from kgen.dtypes import normalize_dtype, normalize_kv_dtype
from kgen.features import all_feature_sets
from kgen.space import (ELEM_BYTES, SMEM_BUDGET_BYTES, SPLIT_KS, VECTOR_BYTES, count_space,
                        iter_space, kv_elem_bytes, padded_head_dim, prune_fp32_fp8_stages,
                        prune_registers, prune_stages)
from kgen.variant import (BLOCK_SIZES, DTYPES, GROUP_SIZES, HEAD_DIMS, KV_DTYPES, NUM_STAGES,
                          NUM_WARPS, TILE_TOKENS, parse_split_k)
from kgen.variant_attention import Q_TILES, AttentionVariantConfig

# Axis name -> allowed values, in AttentionVariantConfig field order.
AXES: dict[str, tuple] = {
    "head_dim": HEAD_DIMS,
    "block_size": BLOCK_SIZES,
    "group_size": GROUP_SIZES,
    "q_tile": Q_TILES,
    "split_k": SPLIT_KS,
    "tile_tokens": TILE_TOKENS,
    "num_warps": NUM_WARPS,
    "num_stages": NUM_STAGES,
    "dtype": DTYPES,
    "kv_dtype": KV_DTYPES,
    "features": all_feature_sets(),
}

# fp32 values per thread the row state may take: the accumulator [q_tile, D] and the scores /
# probabilities [q_tile, tile] (the rest of 255 registers holds the query operand, addresses, the
# K/V tile in flight and the softmax's row vectors). Calibrated with the static audit.
MAX_ROW_VALUES_PER_THREAD = 128


def prune_smem_rows(config: AttentionVariantConfig) -> str | None:
    """K and V tiles x stages (as decode) plus the query tile, which tensor-core dots may stage
    in shared memory, must fit the shared-memory budget."""
    d_pad = padded_head_dim(config.head_dim)
    kv = 2 * config.tile_tokens * d_pad * kv_elem_bytes(config) * config.num_stages
    need = kv + config.q_tile * d_pad * ELEM_BYTES[config.dtype]
    if need > SMEM_BUDGET_BYTES:
        return f"K/V tiles x {config.num_stages} stages and the query tile need {need} B of shared memory"
    return None


def prune_row_registers(config: AttentionVariantConfig) -> str | None:
    """The fp32 accumulator and score tile of ``q_tile`` rows, spread over the warps, must leave
    registers for the rest (else they spill)."""
    threads = 32 * config.num_warps
    per_thread = config.q_tile * (padded_head_dim(config.head_dim) + config.tile_tokens) // threads
    if per_thread > MAX_ROW_VALUES_PER_THREAD:
        return (f"{per_thread} fp32 accumulator and score values per thread ({config.q_tile} rows) "
                f"would spill (at most {MAX_ROW_VALUES_PER_THREAD})")
    return None


PRUNE_RULES: tuple[Callable, ...] = (prune_smem_rows, prune_registers, prune_row_registers,
                                     prune_stages, prune_fp32_fp8_stages)


def prune_reason(config: AttentionVariantConfig) -> str | None:
    """The first prune rule's reason for rejecting ``config``, or None if it is kept."""
    for rule in PRUNE_RULES:
        reason = rule(config)
        if reason:
            return reason
    return None


def is_pruned(config: AttentionVariantConfig) -> bool:
    return prune_reason(config) is not None


def default_attention_config(*, head_dim: int, block_size: int, group_size: int, dtype,
                             kv_dtype="auto", features=(), split_k="auto") -> AttentionVariantConfig:
    """A sound untuned variant for a workload shape (any query lengths).

    Rule: segments ``auto`` (planned per call: one pass when the batch fills the GPU, many
    segments for a few long decodes); 64-row q tiles for 16-bit queries (prefill tiles large
    enough for tensor cores; short queries use a row tile sized to them whatever q_tile is),
    64-token key tiles, 4 warps, 2 stages; head dims padded to 256 take 8 warps and 32-token key
    tiles (the accumulator of 64 x 256 fp32 values needs the registers of 8 warps). fp32 queries
    take 32-row q tiles and 32-token key tiles (16 at head dim 256 or block size 1), one stage
    over an fp8 cache at head dims padded to 128+ (see :func:`kgen.space.prune_fp32_fp8_stages`).
    An fp8 cache keeps at least 16 fp8 elements per thread in a key tile (one 16-byte load).
    """
    dtype, kv_dtype = normalize_dtype(dtype), normalize_kv_dtype(kv_dtype)
    d_pad = padded_head_dim(head_dim) if head_dim in HEAD_DIMS else head_dim
    q_tile, tile, warps, stages = 64, 64, 4, 2
    if dtype == "fp32":
        q_tile, tile = 32, (16 if d_pad >= 256 or block_size == 1 else 32)
        if kv_dtype != "auto" and d_pad >= 128:
            stages = 1
    if d_pad >= 256:
        warps, tile = 8, min(tile, 32)
    q_tile = max(q_tile, group_size)
    if kv_dtype != "auto":
        tile = max(tile, VECTOR_BYTES * 32 * warps // d_pad)
    config = AttentionVariantConfig(
        head_dim=head_dim, block_size=block_size, group_size=group_size, q_tile=q_tile,
        split_k=parse_split_k(split_k), tile_tokens=tile, num_warps=warps, num_stages=stages,
        dtype=dtype, kv_dtype=kv_dtype, features=features)
    reason = prune_reason(config)
    if reason:  # pragma: no cover - guarded by tests over the whole shape space
        raise AssertionError(f"default variant {config.key} is pruned: {reason}")
    return config


def iter_attention_variants(*, prune: bool = True, target=None,
                            **filters) -> Iterator[AttentionVariantConfig]:
    """Yield the attention variants whose fields match ``filters`` (as
    :func:`kgen.space.iter_variants`: one value or a collection per axis; ``kv_dtype`` and
    ``features`` default to the plain space). Combinations with ``q_tile < group_size`` do not
    exist and are never yielded."""
    return iter_space(AttentionVariantConfig, AXES, prune_reason, prune=prune, target=target,
                      filters=filters)


def enumerate_attention_variants(*, prune: bool = True, **filters) -> list[AttentionVariantConfig]:
    """All (pruned) attention variants matching ``filters``."""
    return list(iter_attention_variants(prune=prune, **filters))


def attention_space_size(*, prune: bool = False, target=None, **filters) -> int:
    """Number of attention axis combinations matching ``filters`` (unpruned: the product of the
    axes, counting the ``q_tile < group_size`` combinations that are no variant; pruned: the
    variants kept)."""
    return count_space(AXES, iter_attention_variants, prune=prune, target=target, filters=filters)
