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
from kgen.space import AXES as DECODE_AXES
from kgen.space import (ELEM_BYTES, SMEM_BUDGET_BYTES, VECTOR_BYTES, count_space,
                        first_reason, iter_space, kv_elem_bytes, padded_head_dim,
                        prune_fp32_fp8_stages, prune_registers, prune_stages)
from kgen.space_audited import audited_launch
from kgen.variant import HEAD_DIMS, parse_split_k
from kgen.variant_attention import Q_TILES, AttentionVariantConfig

# Axis name -> allowed values, in AttentionVariantConfig field order: the decode family's axes
# (kgen.space.AXES) with the q tile after the group size.
AXES: dict[str, tuple] = {}
for _name, _values in DECODE_AXES.items():
    AXES[_name] = _values
    if _name == "group_size":
        AXES["q_tile"] = Q_TILES

# Registers per thread (4-byte units) the row state may take, as estimated by
# :func:`row_registers`, where one thread may use 255 registers (up to 8 warps): beyond it ptxas
# runs out and spills. Calibrated with the static audit (sm_80 / sm_90, triton 3.9): estimates
# of 96..128 compiled to 155..167 registers without spills (d128 m32 t64 w4, d128 m64 t64 w8,
# d64 m64 t64 w4, fp32 d128 m16 t32 w4); 136..192 reached 240..255 registers and spilled up to
# 76 B (d128 m64 t64 w4, fp32 d128 m32 t32 w4, fp32 d64 m16 t128 w4). 16 warps leave a thread
# 128 registers (64K per SM), one warp spilled sooner (d64 m16 t32 w1: 4 B at an estimate of
# 112): both get half the budget (:func:`row_register_budget`). fp32 queries (FMA dots, their
# operands in registers) spilled from an estimate of 104 (d128 m32 t64 w8 on sm_80: 352 B over
# the 2D and segmented kernels; d64 m32 t64 w4 at 112: 492 B) and compiled at 100 (d128 m16
# t32 w4: 122 registers): they get 25/32 of it (100), and at most MAX_FP32_SCORE_TILE score
# elements (64 x 128 spilled 12 KB with 8 warps, 1.3 KB with 16), and never 16 warps (ptxas
# gave d256 m16 t32 w16 64 registers and 32 B of spills on sm_80 at an estimate of 49).
MAX_ROW_REGISTERS = 128
MAX_FP32_SCORE_TILE = 2048


def row_registers(config: AttentionVariantConfig) -> int:
    """Estimated registers per thread of a program's state at ``q_tile`` rows.

    The fp32 accumulator [q_tile, D] and scores [q_tile, tile], the query operand [q_tile, D],
    and the key and value tiles [tile, D] in the dot's dtype (the query's; fp8 tiles are
    converted to it), spread over ``32 * num_warps`` threads.
    """
    threads = 32 * config.num_warps
    d_pad = padded_head_dim(config.head_dim)
    elem = ELEM_BYTES[config.dtype]
    rows = config.q_tile * (d_pad * 4 + d_pad * elem + config.tile_tokens * 4)
    kv = 2 * config.tile_tokens * d_pad * elem
    return (rows + kv) // 4 // threads


def row_register_budget(num_warps: int, dtype: str = "fp16") -> int:
    """:data:`MAX_ROW_REGISTERS` scaled to the registers a thread may have at ``num_warps``
    (65536 per SM over 32 * num_warps threads, at most 255), halved for a single warp, 25/32 of
    that for fp32 queries."""
    cap = min(255, 65536 // (32 * num_warps))
    budget = MAX_ROW_REGISTERS * cap // 255
    budget = budget // 2 if num_warps == 1 else budget
    return budget * 25 // 32 if dtype == "fp32" else budget


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
    """The state of ``q_tile`` rows (:func:`row_registers`) must fit the thread's budget
    (:func:`row_register_budget`)."""
    need, budget = row_registers(config), row_register_budget(config.num_warps, config.dtype)
    if config.dtype == "fp32" and config.q_tile * config.tile_tokens > MAX_FP32_SCORE_TILE:
        return (f"fp32 FMA dots of a {config.q_tile} x {config.tile_tokens} score tile spill "
                f"(at most {MAX_FP32_SCORE_TILE} elements)")
    if config.dtype == "fp32" and config.num_warps == 16:
        return "fp32 FMA dots over 16 warps spill (ptxas keeps them at 64 registers)"
    if need > budget:
        return (f"about {need} registers per thread for {config.q_tile} rows' accumulator, "
                f"scores, query and K/V tiles would spill (at most {budget} with "
                f"{config.num_warps} warps)")
    return None


PRUNE_RULES: tuple[Callable, ...] = (prune_smem_rows, prune_registers, prune_row_registers,
                                     prune_stages, prune_fp32_fp8_stages)


def prune_reason(config: AttentionVariantConfig) -> str | None:
    """The first prune rule's reason for rejecting ``config``, or None if it is kept."""
    return first_reason(PRUNE_RULES, config)


def is_pruned(config: AttentionVariantConfig) -> bool:
    return prune_reason(config) is not None


def default_attention_config(*, head_dim: int, block_size: int, group_size: int, dtype,
                             kv_dtype="auto", features=(), split_k="auto") -> AttentionVariantConfig:
    """A sound untuned variant for a workload shape (any query lengths).

    Rule (checked by the static audit sweeps ``bench/results/audit_sweep_attention_defaults.md``
    and ``..._features.md`` on sm_80 and sm_90: no spills, 16-byte K/V loads, tensor-core dots for
    16-bit queries; the shapes where the rule's choice spilled take the audited launch parameters
    of :mod:`kgen.space_audited`): segments ``auto`` (planned per call: one pass when
    the batch fills the GPU, many segments for a few long decodes). 16-bit queries: 64-row q tiles
    with 64-token key tiles over 8 warps (prefill tiles that read each K/V tile once per 64 / group
    query tokens; short queries use a row tile sized to them whatever q_tile is), 2 stages, one at
    groups of 16 or more; at head dims padded to 256, 32-row tiles with 16-token key tiles.
    fp32 queries: 16-row tiles and 32-token key tiles over 4 warps (8 at groups of 16), 2 stages;
    16-token key tiles over 8 warps at head dims padded to 256; with one-token blocks 32-token
    tiles over 8 warps and one stage (4 warps spilled up to 352 B on sm_90); one stage over an fp8
    cache at head dims padded to 128+ (see :func:`kgen.space.prune_fp32_fp8_stages`). An fp8
    cache keeps at least 16 fp8 elements per thread in a key tile (one 16-byte load).
    """
    dtype, kv_dtype = normalize_dtype(dtype), normalize_kv_dtype(kv_dtype)
    d_pad = padded_head_dim(head_dim) if head_dim in HEAD_DIMS else head_dim
    if dtype != "fp32" and d_pad <= 128:
        q_tile, tile, warps, stages = 64, 64, 8, (1 if group_size >= 16 else 2)
    elif dtype != "fp32":
        q_tile, tile, warps, stages = 32, 16, 8, 2
    elif block_size == 1:  # a page per token: 4 warps or 2 stages spilled up to 352 B on sm_90
        q_tile, tile, warps, stages = 16, 32, 8, 1
    elif d_pad <= 128:
        q_tile, tile, warps, stages = 16, 32, 8 if group_size >= 16 else 4, 2
    else:
        q_tile, tile, warps, stages = 16, 16, 8, 2
    if dtype == "fp32" and kv_dtype != "auto" and d_pad >= 128:
        stages = 1  # see kgen.space.prune_fp32_fp8_stages
    if kv_dtype != "auto":
        tile = max(tile, VECTOR_BYTES * 32 * warps // d_pad)
    config = AttentionVariantConfig(
        head_dim=head_dim, block_size=block_size, group_size=group_size, q_tile=q_tile,
        split_k=parse_split_k(split_k), tile_tokens=tile, num_warps=warps, num_stages=stages,
        dtype=dtype, kv_dtype=kv_dtype, features=features)
    audited = audited_launch(config)
    if audited is not None:  # the rule's choice spilled for this shape: the audited one instead
        q_tile, tile, warps, stages = audited
        config = config.replace(q_tile=q_tile, tile_tokens=tile, num_warps=warps, num_stages=stages)
    reason = prune_reason(config)
    if reason:  # pragma: no cover - guarded by tests over the whole shape space
        raise AssertionError(f"default variant {config.key} is pruned: {reason}")
    return config


def iter_attention_variants(*, prune: bool = True, target=None,
                            **filters) -> Iterator[AttentionVariantConfig]:
    """Yield the attention variants whose fields match ``filters`` (as
    :func:`kgen.space.iter_variants`: one value or a collection per axis; ``kv_dtype`` and
    ``features`` default to the plain space)."""
    return iter_space(AttentionVariantConfig, AXES, prune_reason, prune=prune, target=target,
                      filters=filters)


def enumerate_attention_variants(*, prune: bool = True, **filters) -> list[AttentionVariantConfig]:
    """All (pruned) attention variants matching ``filters``."""
    return list(iter_attention_variants(prune=prune, **filters))


def attention_space_size(*, prune: bool = False, target=None, **filters) -> int:
    """Number of attention variants matching ``filters`` (counting pruned ones unless ``prune``)."""
    return count_space(AXES, iter_attention_variants, prune=prune, target=target, filters=filters)
