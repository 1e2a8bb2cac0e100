"""Audited exceptions to :func:`kgen.space_attention.default_attention_config`'s rule: data.

The rule (a few plain cases by dtype, head dim, block size and group) leaves some shapes whose
default spills registers on sm_80 or sm_90; ptxas's spills at these sizes do not follow a rule
that fits in a few lines (the same tile spills at group 3 and not at groups 1, 8 or 16). The
static audit sweeps at commit 64a43d4 (``bench/results/audit_sweep_attention_defaults.json`` and
``..._features.json``) listed them; for each, candidate launch parameters were compiled for both
targets and the first that compiled without spills on both, with 16-byte K/V loads and (16-bit
queries) tensor-core dots, is recorded here. The sweeps rerun after this table (the same files)
show every default passing.

Key: (dtype, kv_dtype, features, head_dim, block_size, group_size); ``ALL`` is the four features
together, the set the features sweep audits. Value: (q_tile, tile_tokens, num_warps, num_stages).
"""

from __future__ import annotations

ALL = ("sliding_window", "soft_cap", "alibi", "sinks")

AUDITED_DEFAULTS: dict[tuple, tuple[int, int, int, int]] = {
    ('bf16', 'auto', (), 192, 1, 8): (16, 32, 8, 2),
    ('bf16', 'auto', (), 256, 128, 3): (16, 32, 8, 2),
    ('bf16', 'fp8_e4m3', (), 80, 128, 8): (64, 64, 8, 1),
    ('bf16', 'fp8_e4m3', (), 96, 128, 8): (64, 64, 8, 1),
    ('bf16', 'fp8_e4m3', (), 112, 128, 8): (64, 64, 8, 1),
    ('bf16', 'fp8_e4m3', (), 128, 128, 8): (64, 64, 8, 1),
    ('bf16', 'fp8_e4m3', ALL, 128, 16, 1): (64, 64, 8, 1),
    ('bf16', 'fp8_e5m2', (), 80, 128, 8): (64, 64, 8, 1),
    ('bf16', 'fp8_e5m2', (), 96, 128, 8): (64, 64, 8, 1),
    ('bf16', 'fp8_e5m2', (), 112, 128, 8): (64, 64, 8, 1),
    ('bf16', 'fp8_e5m2', (), 128, 128, 8): (64, 64, 8, 1),
    ('bf16', 'fp8_e5m2', ALL, 128, 16, 1): (64, 32, 8, 1),
    ('bf16', 'fp8_e5m2', ALL, 256, 16, 1): (16, 32, 8, 2),
    ('fp16', 'auto', (), 192, 1, 8): (16, 32, 8, 2),
    ('fp16', 'auto', (), 256, 128, 3): (16, 32, 8, 2),
    ('fp16', 'fp8_e4m3', (), 80, 128, 8): (64, 64, 8, 1),
    ('fp16', 'fp8_e4m3', (), 96, 128, 8): (64, 64, 8, 1),
    ('fp16', 'fp8_e4m3', (), 112, 128, 8): (64, 64, 8, 1),
    ('fp16', 'fp8_e4m3', (), 128, 128, 8): (64, 64, 8, 1),
    ('fp16', 'fp8_e4m3', (), 256, 128, 8): (16, 32, 8, 2),
    ('fp16', 'fp8_e5m2', (), 80, 128, 8): (64, 64, 8, 1),
    ('fp16', 'fp8_e5m2', (), 96, 128, 8): (64, 64, 8, 1),
    ('fp16', 'fp8_e5m2', (), 112, 128, 8): (64, 64, 8, 1),
    ('fp16', 'fp8_e5m2', (), 128, 128, 8): (64, 64, 8, 1),
    ('fp16', 'fp8_e5m2', (), 256, 1, 8): (16, 32, 8, 2),
    ('fp16', 'fp8_e5m2', (), 256, 16, 8): (16, 32, 8, 2),
    ('fp16', 'fp8_e5m2', (), 256, 128, 8): (16, 32, 8, 2),
    ('fp16', 'fp8_e5m2', ALL, 64, 16, 8): (64, 64, 8, 1),
    ('fp16', 'fp8_e5m2', ALL, 128, 16, 8): (64, 32, 8, 1),
    ('fp16', 'fp8_e5m2', ALL, 256, 16, 1): (16, 32, 8, 2),
    ('fp16', 'fp8_e5m2', ALL, 256, 16, 8): (16, 16, 8, 2),
    ('fp32', 'auto', (), 192, 16, 3): (16, 16, 8, 1),
    ('fp32', 'auto', (), 192, 128, 1): (16, 16, 8, 1),
    ('fp32', 'auto', (), 192, 128, 3): (16, 32, 8, 2),
    ('fp32', 'auto', (), 256, 1, 3): (16, 16, 8, 1),
    ('fp32', 'auto', (), 256, 16, 3): (16, 16, 8, 1),
    ('fp32', 'auto', (), 256, 128, 1): (16, 16, 8, 1),
    ('fp32', 'auto', (), 256, 128, 3): (16, 32, 8, 2),
    ('fp32', 'fp8_e4m3', (), 64, 128, 8): (16, 64, 8, 1),
    ('fp32', 'fp8_e4m3', (), 80, 1, 8): (16, 16, 4, 1),
    ('fp32', 'fp8_e4m3', (), 80, 16, 8): (16, 16, 4, 1),
    ('fp32', 'fp8_e4m3', (), 80, 128, 8): (16, 16, 4, 1),
    ('fp32', 'fp8_e4m3', (), 96, 1, 8): (16, 16, 4, 1),
    ('fp32', 'fp8_e4m3', (), 96, 16, 8): (16, 16, 4, 1),
    ('fp32', 'fp8_e4m3', (), 96, 128, 8): (16, 16, 4, 1),
    ('fp32', 'fp8_e4m3', (), 112, 1, 8): (16, 16, 4, 1),
    ('fp32', 'fp8_e4m3', (), 112, 16, 8): (16, 16, 4, 1),
    ('fp32', 'fp8_e4m3', (), 112, 128, 8): (16, 16, 4, 1),
    ('fp32', 'fp8_e4m3', (), 128, 1, 8): (16, 16, 4, 1),
    ('fp32', 'fp8_e4m3', (), 128, 16, 8): (16, 16, 4, 1),
    ('fp32', 'fp8_e4m3', (), 128, 128, 8): (16, 16, 4, 1),
    ('fp32', 'fp8_e5m2', (), 64, 128, 8): (16, 64, 8, 1),
    ('fp32', 'fp8_e5m2', (), 80, 1, 8): (16, 16, 4, 1),
    ('fp32', 'fp8_e5m2', (), 80, 16, 8): (16, 16, 4, 1),
    ('fp32', 'fp8_e5m2', (), 80, 128, 8): (16, 16, 4, 1),
    ('fp32', 'fp8_e5m2', (), 96, 1, 8): (16, 16, 4, 1),
    ('fp32', 'fp8_e5m2', (), 96, 16, 8): (16, 16, 4, 1),
    ('fp32', 'fp8_e5m2', (), 96, 128, 8): (16, 16, 4, 1),
    ('fp32', 'fp8_e5m2', (), 112, 1, 8): (16, 16, 4, 1),
    ('fp32', 'fp8_e5m2', (), 112, 16, 8): (16, 16, 4, 1),
    ('fp32', 'fp8_e5m2', (), 112, 128, 8): (16, 16, 4, 1),
    ('fp32', 'fp8_e5m2', (), 128, 1, 8): (16, 16, 4, 1),
    ('fp32', 'fp8_e5m2', (), 128, 16, 8): (16, 16, 4, 1),
    ('fp32', 'fp8_e5m2', (), 128, 128, 8): (16, 16, 4, 1),
    ('fp32', 'fp8_e5m2', (), 192, 1, 8): (16, 16, 8, 1),
    ('fp32', 'fp8_e5m2', ALL, 256, 16, 1): (16, 32, 8, 1),
}


def audited_launch(dtype: str, kv_dtype: str, features: tuple, head_dim: int, block_size: int,
                   group_size: int) -> tuple[int, int, int, int] | None:
    """(q_tile, tile_tokens, num_warps, num_stages) recorded for this shape, or None (the rule's)."""
    return AUDITED_DEFAULTS.get((dtype, kv_dtype, tuple(features), head_dim, block_size, group_size))
