"""The variant space as data, pure prune rules, a heuristic default and the enumerator.

The axes below are the values :class:`kgen.variant.VariantConfig` accepts, except split-K, where the
space keeps a few partition counts plus ``auto``. The KV dtype and feature axes are filtered to
their defaults (``auto``, no features) unless a filter names them, so the plain space is listed
as before. A prune rule is a pure function ``rule(config) -> str | None`` returning why a variant
is not worth building (or None). Rules use only the config, so the same decision is made
everywhere (CLI, tuner, tests); :func:`target_prune_reason` adds the rules that depend on the
compile target (``sm_80``, ``sm_90``).
"""

from __future__ import annotations

import itertools
import re
from typing import Callable, Iterator

from kgen.dtypes import KV_ELEM_BYTES, kv_dtype_target_problem, normalize_kv_dtype
from kgen.features import all_feature_sets, normalize_features
from kgen.space_audited import audited_launch
from kgen.variant import (BLOCK_SIZES, DTYPES, GROUP_SIZES, HEAD_DIMS, KV_DTYPES, NUM_STAGES,
                          NUM_WARPS, SPLIT_AUTO, TILE_TOKENS, VariantConfig, normalize_dtype,
                          parse_split_k)

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
    "kv_dtype": KV_DTYPES,
    "features": all_feature_sets(),
}
# Axes whose unfiltered enumeration is only their default value (the plain space).
DEFAULT_ONLY = {"kv_dtype": ("auto",), "features": ((),)}

# Budgets the prune rules use (conservative for sm_80 / sm_90).
SMEM_BUDGET_BYTES = 160 * 1024  # shared memory the pipelined K and V tiles may take
# K tile bytes per thread before registers spill (the static audit found 16-bit tiles of 256
# elements per thread spilling on sm_80 and sm_90: bench/results/audit_sweep.md).
MAX_TILE_BYTES_PER_THREAD = 256
MAX_TILE_ELEMS_ONE_WARP = 64  # one warp holds K, V, P and acc alone: it spills sooner
MIN_TILE_ELEMS_PER_THREAD = 8  # fewer and one 16-byte vector load per thread is not possible
VECTOR_BYTES = 16  # one 16-byte load per thread: fp8 tiles need 16 elements per thread
ELEM_BYTES = {"fp16": 2, "bf16": 2, "fp32": 4}


def kv_elem_bytes(config: VariantConfig) -> int:
    """Bytes of one KV-cache element (the query dtype's unless the cache is fp8)."""
    return KV_ELEM_BYTES.get(config.kv_dtype, ELEM_BYTES[config.dtype])


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
    """K and V tiles (in the cache's element type) times pipeline stages must fit in shared memory."""
    tile_bytes = config.tile_tokens * padded_head_dim(config.head_dim) * kv_elem_bytes(config)
    need = 2 * tile_bytes * config.num_stages
    if need > SMEM_BUDGET_BYTES:
        return f"K/V tiles x {config.num_stages} stages need {need} B of shared memory"
    return None


def prune_registers(config: VariantConfig) -> str | None:
    """A K tile spread over the warps must neither spill nor starve vector loads.

    The register budget counts the tile in the query dtype (an fp8 tile is converted before the
    dot); the vector-load floor counts it in the cache's dtype: an fp8 tile needs 16 elements per
    thread for one 16-byte load.
    """
    threads = 32 * config.num_warps
    per_thread = config.tile_tokens * padded_head_dim(config.head_dim) // threads
    if per_thread * ELEM_BYTES[config.dtype] > MAX_TILE_BYTES_PER_THREAD:
        return f"{per_thread} tile elements ({config.dtype}) per thread would spill"
    if config.num_warps == 1 and per_thread > MAX_TILE_ELEMS_ONE_WARP:
        return f"{per_thread} tile elements per thread in a single warp would spill"
    if per_thread < MIN_TILE_ELEMS_PER_THREAD:
        return f"{per_thread} tile elements per thread is too few for vector loads"
    if config.kv_fp8 and per_thread * kv_elem_bytes(config) < VECTOR_BYTES:
        return (f"{per_thread} {config.kv_dtype} tile elements per thread is too few for "
                f"16-byte loads (needs {VECTOR_BYTES})")
    return None


def prune_stages(config: VariantConfig) -> str | None:
    """No more than 3 pipeline stages for tiles of 128 tokens or more."""
    if config.num_stages > 3 and config.tile_tokens >= 128:
        return "more than 3 stages of 128+ token tiles"
    return None


def prune_fp32_fp8_stages(config: VariantConfig) -> str | None:
    """fp32 queries over an fp8 cache: no pipelining (num_stages > 1) at head dims padded to 128+.

    The static audit (bench/results/audit_sweep_features.md) found every such variant spilling
    hundreds of bytes on sm_80 and sm_90 (the pipelined fp8 tile is converted to fp32 in the FMA
    dot's operand layout), and the same tiles spill-free with one stage.
    """
    if (config.kv_fp8 and config.dtype == "fp32" and config.num_stages > 1
            and padded_head_dim(config.head_dim) >= 128):
        return (f"fp32 queries over a pipelined {config.kv_dtype} tile (num_stages="
                f"{config.num_stages}) at head dim {config.head_dim} spill")
    return None


PRUNE_RULES: tuple[Callable[[VariantConfig], str | None], ...] = (
    prune_smem, prune_registers, prune_stages, prune_fp32_fp8_stages)


def first_reason(rules, *args) -> str | None:
    """The first non-empty ``rule(*args)`` of ``rules`` (a rule's reason), or None."""
    for rule in rules:
        reason = rule(*args)
        if reason:
            return reason
    return None


def prune_reason(config: VariantConfig) -> str | None:
    """The first prune rule's reason for rejecting ``config``, or None if it is kept."""
    return first_reason(PRUNE_RULES, config)


def is_pruned(config: VariantConfig) -> bool:
    return prune_reason(config) is not None


# ---- target rules (pure): what a compile target cannot do ---------------------------------------
def target_cc(target) -> int:
    """``"sm_80"``, ``"sm80"``, ``"80"``, ``80``, ``"8.0"`` -> 80 (ValueError naming the target)."""
    text = str(target).strip().lower()
    match = re.fullmatch(r"(?:sm_?)?(\d)\.?(\d)a?", text)
    if not match:
        raise ValueError(f"target={target!r} is not a compute capability such as sm_80 or sm_90")
    return int(match.group(1)) * 10 + int(match.group(2))


def prune_fp8_target(config: VariantConfig, target) -> str | None:
    """An e4m3 cache needs a target where Triton converts fp8e4nv (sm_89+): the one rule of
    :func:`kgen.dtypes.kv_dtype_target_problem`."""
    cc = target_cc(target)
    return kv_dtype_target_problem(config.kv_dtype, cc, f"sm_{cc}")


TARGET_RULES: tuple[Callable, ...] = (prune_fp8_target,)


def target_prune_reason(config: VariantConfig, target) -> str | None:
    """The first target rule's reason ``config`` cannot run on ``target``, or None."""
    return first_reason(TARGET_RULES, config, target)


# ---- default and enumeration ------------------------------------------------------------------
def default_config(*, head_dim: int, block_size: int, group_size: int, dtype,
                   split_k="auto", kv_dtype="auto", features=()) -> VariantConfig:
    """A sound untuned variant for a workload shape.

    Split-K defaults to ``auto``: the partition count is picked per call from the batch, the KV
    heads and the longest context, so one variant serves both a large batch (single pass) and one
    long sequence (many partitions). Measured on an H200 (bench/results/h200/kernel_bench.md):
    a single pass over 1 x 32k tokens ran 0.86 ms, ``auto`` 0.16 ms.

    Tiles of 64 tokens for 16-bit dtypes (fp32: 32, or 16 for padded head dims of 256 and for block size 1), 4 warps,
    2 stages: enough work per step to hide latency while fitting every GPU's shared memory and
    register budgets (the fp32 tiles are the ones the static audit found spill-free).

    An fp8 cache (bench/results/audit_sweep_features.md): 16-bit queries keep tiles of 64 tokens,
    128 for head dim 64 (64-token fp8 tiles left an 8-byte ptxas stack spill on sm_90), with 8
    warps when attention features are on too (with 4, split-K partial kernels stopped at 96
    registers and spilled 16 bytes on sm_90); fp32 queries over head dims padded to 128+ take
    32-token tiles and one stage (see :func:`prune_fp32_fp8_stages`), 8 warps, or 4 with
    features (8 stopped at 64 registers and spilled 8 bytes at block size 1 on sm_90); never
    fewer than 16 fp8 elements per thread (one 16-byte load).

    Shapes where this rule's choice spilled in the static audit take the launch recorded in
    :mod:`kgen.space_audited` (fp32 group 8 at block 16: 8 warps).
    """
    dtype = normalize_dtype(dtype)
    d_pad = padded_head_dim(head_dim) if head_dim in HEAD_DIMS else head_dim
    if dtype != "fp32":
        tile = 64
    else:
        # block size 1 gathers one page per token row: 64-bit row addresses cost registers too
        tile = 16 if d_pad >= 256 or block_size == 1 else 32
    warps, stages = 4, 2
    if normalize_kv_dtype(kv_dtype) != "auto":
        if dtype != "fp32":
            tile = 128 if d_pad <= 64 else 64
            warps = 8 if features else 4
        elif d_pad >= 128:
            tile, warps, stages = 32, 4 if features else 8, 1
        tile = max(tile, VECTOR_BYTES * 32 * warps // d_pad)
    config = VariantConfig(head_dim=head_dim, block_size=block_size, group_size=group_size,
                           split_k=parse_split_k(split_k), tile_tokens=tile, num_warps=warps,
                           num_stages=stages, dtype=dtype, kv_dtype=kv_dtype, features=features)
    audited = audited_launch(config)
    if audited is not None:  # the rule's choice spilled for this shape (kgen/space_audited.py)
        tile, warps, stages = audited
        config = config.replace(tile_tokens=tile, num_warps=warps, num_stages=stages)
    reason = prune_reason(config)
    if reason:  # pragma: no cover - guarded by tests over the whole shape space
        raise AssertionError(f"default variant {config.key} is pruned: {reason}")
    return config


def axis_values(name: str, wanted, axes: dict = AXES) -> tuple:
    """The values of axis ``name`` a filter asks for (``None``: the unfiltered enumeration),
    checked against ``axes`` (a family's axis table); ValueError names a value not in it."""
    allowed = axes[name]
    if wanted is None:
        return DEFAULT_ONLY.get(name, allowed)
    if name == "features":  # one feature set (a string or a tuple of names) or a list of sets
        many = isinstance(wanted, list) and all(not isinstance(v, str) for v in wanted)
        values = [normalize_features(v) for v in (wanted if many else [wanted])]
        return tuple(dict.fromkeys(values))
    values = wanted if isinstance(wanted, (list, tuple, set, frozenset)) else (wanted,)
    if name == "dtype":
        values = [normalize_dtype(v) for v in values]
    elif name == "kv_dtype":
        values = [normalize_kv_dtype(v) for v in values]
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


def iter_space(make, axes: dict, prune_fn, *, prune: bool = True, target=None,
               filters: dict) -> Iterator:
    """Yield ``make(**fields)`` for the product of the filtered ``axes`` (a family's table),
    skipping, with ``prune``, what ``prune_fn`` (and for a ``target`` the target rules) reject."""
    unknown = set(filters) - set(axes)
    if unknown:
        raise ValueError(f"unknown filter(s): {', '.join(sorted(unknown))}; axes: {', '.join(axes)}")
    values = [axis_values(name, filters.get(name), axes) for name in axes]
    for combo in itertools.product(*values):
        config = make(**dict(zip(axes, combo)))
        if not prune or (prune_fn(config) is None
                         and (target is None or target_prune_reason(config, target) is None)):
            yield config


def iter_variants(*, prune: bool = True, target=None, **filters) -> Iterator[VariantConfig]:
    """Yield the variants whose fields match ``filters`` (one value or a collection per axis).

    ``kv_dtype`` and ``features`` default to the plain space (``auto``, no features); a
    ``features`` filter is one feature set (``"sliding_window,soft_cap"``) or a list of sets.
    Unknown filter names raise ValueError; with ``prune`` the prune rules drop variants, and with
    a ``target`` also the target rules (:func:`target_prune_reason`).
    """
    return iter_space(VariantConfig, AXES, prune_reason, prune=prune, target=target,
                      filters=filters)


def enumerate_variants(*, prune: bool = True, **filters) -> list[VariantConfig]:
    """All (pruned) variants matching ``filters``, e.g. ``enumerate_variants(head_dim=128,
    dtype="bf16", group_size=[1, 4])``."""
    return list(iter_variants(prune=prune, **filters))


def count_space(axes: dict, iterate, *, prune: bool, target, filters: dict) -> int:
    """Number of combinations of the filtered ``axes`` (``prune``: of those ``iterate`` keeps)."""
    if not prune:
        total = 1
        for name in axes:
            total *= len(axis_values(name, filters.get(name), axes))
        return total
    return sum(1 for _ in iterate(prune=True, target=target, **filters))


def space_size(*, prune: bool = False, target=None, **filters) -> int:
    """Number of variants matching ``filters`` (counting pruned ones unless ``prune``)."""
    return count_space(AXES, iter_variants, prune=prune, target=target, filters=filters)
