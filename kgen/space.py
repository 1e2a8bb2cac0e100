"""The variant space as data, pure prune rules, a heuristic default and the enumerator.

The axes below are the values :class:`kgen.variant.VariantConfig` accepts, except split-K, where the
space keeps a few partition counts plus ``auto``. A prune rule is a pure function
``rule(config) -> str | None`` returning why a variant is not worth building (or None). Rules use
only the config, so the same decision is made everywhere (CLI, tuner, tests).
"""

from __future__ import annotations

import itertools
from typing import Callable, Iterator

from kgen.variant import (BLOCK_SIZES, DTYPES, GROUP_SIZES, HEAD_DIMS, NUM_STAGES, NUM_WARPS,
                          SPLIT_AUTO, TILE_TOKENS, VariantConfig, normalize_dtype, parse_split_k)

SPLIT_KS = (1, 2, 4, 8, 16, 32, SPLIT_AUTO)

# Axis name -> allowed values, in VariantConfig field order.
AXES: dict[str, tuple] = {
    "head_dim": HEAD_DIMS,
    "block_size": BLOCK_SIZES,
    "group_size": GROUP_SIZES,
    "split_k": SPLIT_KS,
    "tile_tokens": TILE_TOKENS,
    "num_warps": NUM_WARPS,
    "num_stages": NUM_STAGES,
    "dtype": DTYPES,
}

# Budgets the prune rules use (conservative for sm_80 / sm_90).
SMEM_BUDGET_BYTES = 160 * 1024  # shared memory the pipelined K and V tiles may take
# K tile bytes per thread before registers spill (the static audit found 16-bit tiles of 256
# elements per thread spilling on sm_80 and sm_90: bench/results/audit_sweep.md).
MAX_TILE_BYTES_PER_THREAD = 256
MAX_TILE_ELEMS_ONE_WARP = 64  # one warp holds K, V, P and acc alone: it spills sooner
MIN_TILE_ELEMS_PER_THREAD = 8  # fewer and one 16-byte vector load per thread is not possible
ELEM_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (n >= 1)."""
    return 1 << (int(n) - 1).bit_length()


def padded_head_dim(head_dim: int) -> int:
    """Head dim rounded up to a power of two (80 -> 128, 192 -> 256)."""
    return next_pow2(head_dim)


def padded_group(group_size: int) -> int:
    """Query rows per program: the group padded to a power of two and to tl.dot's minimum 16."""
    return max(16, next_pow2(group_size))


# ---- prune rules (pure) -----------------------------------------------------------------------
def prune_smem(config: VariantConfig) -> str | None:
    """K and V tiles times pipeline stages must fit in shared memory."""
    tile_bytes = config.tile_tokens * padded_head_dim(config.head_dim) * ELEM_BYTES[config.dtype]
    need = 2 * tile_bytes * config.num_stages
    if need > SMEM_BUDGET_BYTES:
        return f"K/V tiles x {config.num_stages} stages need {need} B of shared memory"
    return None


def prune_registers(config: VariantConfig) -> str | None:
    """A K tile spread over the warps must neither spill nor starve vector loads."""
    threads = 32 * config.num_warps
    per_thread = config.tile_tokens * padded_head_dim(config.head_dim) // threads
    if per_thread * ELEM_BYTES[config.dtype] > MAX_TILE_BYTES_PER_THREAD:
        return f"{per_thread} tile elements ({config.dtype}) per thread would spill"
    if config.num_warps == 1 and per_thread > MAX_TILE_ELEMS_ONE_WARP:
        return f"{per_thread} tile elements per thread in a single warp would spill"
    if per_thread < MIN_TILE_ELEMS_PER_THREAD:
        return f"{per_thread} tile elements per thread is too few for vector loads"
    return None


def prune_stages(config: VariantConfig) -> str | None:
    """No more than 3 pipeline stages for tiles of 128 tokens or more."""
    if config.num_stages > 3 and config.tile_tokens >= 128:
        return "more than 3 stages of 128+ token tiles"
    return None


PRUNE_RULES: tuple[Callable[[VariantConfig], str | None], ...] = (prune_smem, prune_registers,
                                                                   prune_stages)


def prune_reason(config: VariantConfig) -> str | None:
    """The first prune rule's reason for rejecting ``config``, or None if it is kept."""
    for rule in PRUNE_RULES:
        reason = rule(config)
        if reason:
            return reason
    return None


def is_pruned(config: VariantConfig) -> bool:
    return prune_reason(config) is not None


# ---- default and enumeration ------------------------------------------------------------------
def default_config(*, head_dim: int, block_size: int, group_size: int, dtype,
                   split_k="auto") -> VariantConfig:
    """A sound untuned variant for a workload shape.

    Split-K defaults to ``auto``: the partition count is picked per call from the batch, the KV
    heads and the longest context, so one variant serves both a large batch (single pass) and one
    long sequence (many partitions). Measured on an H200 (bench/results/h200/kernel_bench.md):
    a single pass over 1 x 32k tokens ran 0.86 ms, ``auto`` 0.16 ms.

    Tiles of 64 tokens for 16-bit dtypes (fp32: 32, or 16 for padded head dims of 256 and for block size 1), 4 warps,
    2 stages: enough work per step to hide latency while fitting every GPU's shared memory and
    register budgets (the fp32 tiles are the ones the static audit found spill-free).
    """
    dtype = normalize_dtype(dtype)
    d_pad = padded_head_dim(head_dim) if head_dim in HEAD_DIMS else head_dim
    if dtype != "fp32":
        tile = 64
    else:
        # block size 1 gathers one page per token row: 64-bit row addresses cost registers too
        tile = 16 if d_pad >= 256 or block_size == 1 else 32
    config = VariantConfig(head_dim=head_dim, block_size=block_size, group_size=group_size,
                           split_k=parse_split_k(split_k), tile_tokens=tile, num_warps=4,
                           num_stages=2, dtype=dtype)
    reason = prune_reason(config)
    if reason:  # pragma: no cover - guarded by tests over the whole shape space
        raise AssertionError(f"default variant {config.key} is pruned: {reason}")
    return config


def _axis_values(name: str, wanted) -> tuple:
    allowed = AXES[name]
    if wanted is None:
        return allowed
    values = wanted if isinstance(wanted, (list, tuple, set, frozenset)) else (wanted,)
    if name == "dtype":
        values = [normalize_dtype(v) for v in values]
    elif name == "split_k":
        values = [parse_split_k(v) for v in values]
    out = []
    for value in values:
        if value not in allowed:
            shown = ", ".join("auto" if v == SPLIT_AUTO and name == "split_k" else str(v)
                              for v in allowed)
            raise ValueError(f"{name}={value!r} is not in the space; allowed: {shown}")
        out.append(value)
    return tuple(dict.fromkeys(out))


def iter_variants(*, prune: bool = True, **filters) -> Iterator[VariantConfig]:
    """Yield the variants whose fields match ``filters`` (one value or a collection per axis).

    Unknown filter names raise ValueError; with ``prune`` the prune rules drop variants.
    """
    unknown = set(filters) - set(AXES)
    if unknown:
        raise ValueError(f"unknown filter(s): {', '.join(sorted(unknown))}; axes: {', '.join(AXES)}")
    values = [_axis_values(name, filters.get(name)) for name in AXES]
    for combo in itertools.product(*values):
        config = VariantConfig(*combo)
        if not prune or prune_reason(config) is None:
            yield config


def enumerate_variants(*, prune: bool = True, **filters) -> list[VariantConfig]:
    """All (pruned) variants matching ``filters``, e.g. ``enumerate_variants(head_dim=128,
    dtype="bf16", group_size=[1, 4])``."""
    return list(iter_variants(prune=prune, **filters))


def space_size(*, prune: bool = False, **filters) -> int:
    """Number of variants matching ``filters`` (counting pruned ones unless ``prune``)."""
    if not prune:
        total = 1
        for name in AXES:
            total *= len(_axis_values(name, filters.get(name)))
        return total
    return sum(1 for _ in iter_variants(prune=True, **filters))
