"""Audited exceptions to the default-variant rules of both kernel families: data.

:func:`kgen.space.default_config` (decode) and
:func:`kgen.space_attention.default_attention_config` (any query length) are a few plain cases
by dtype, head dim, block size and group. They leave some shapes whose default spills registers
on sm_80 or sm_90, and ptxas's spills at these sizes follow no rule that fits in a few lines (the
same tile spills at group 3 and not at groups 1, 8 or 16; at block 16 and not at 8 or 32). The
static audit sweeps listed them; for each, candidate launch parameters were compiled for both
targets and the first that compiled without spills on both, with 16-byte K/V loads and (16-bit
queries) tensor-core dots, is recorded here:

- attention: the sweeps at commit 64a43d4 (``bench/results/audit_sweep_attention_defaults.json``
  and ``..._features.json``, rerun since with this table: every default passes);
- decode: the sweep at commit 7864ce7 (fp32 group 8 block 16 spilled 16 B on sm_90);
  ``bench/results/audit_decode_defaults_fixed.json`` audits the recorded launches and
  ``bench/results/audit_sweep.json``, rerun since, has no default spilling.

Key: (dtype, kv_dtype, features, head_dim, block_size, group_size); ``ALL`` is the four features
together, the set the features sweeps audit. Value: attention (q_tile, tile_tokens, num_warps,
num_stages); decode (tile_tokens, num_warps, num_stages).
"""

from __future__ import annotations

from kgen.features import FEATURES as ALL

AUDITED_ATTENTION: dict[tuple, tuple[int, int, int, int]] = {
    ("bf16", "auto", (), 192, 1, 8): (16, 32, 8, 2),
    ("bf16", "auto", (), 256, 128, 3): (16, 32, 8, 2),
    ("bf16", "fp8_e4m3", (), 80, 128, 8): (64, 64, 8, 1),
    ("bf16", "fp8_e4m3", (), 96, 128, 8): (64, 64, 8, 1),
    ("bf16", "fp8_e4m3", (), 112, 128, 8): (64, 64, 8, 1),
    ("bf16", "fp8_e4m3", (), 128, 128, 8): (64, 64, 8, 1),
    ("bf16", "fp8_e4m3", ALL, 128, 16, 1): (64, 64, 8, 1),
    ("bf16", "fp8_e5m2", (), 80, 128, 8): (64, 64, 8, 1),
    ("bf16", "fp8_e5m2", (), 96, 128, 8): (64, 64, 8, 1),
    ("bf16", "fp8_e5m2", (), 112, 128, 8): (64, 64, 8, 1),
    ("bf16", "fp8_e5m2", (), 128, 128, 8): (64, 64, 8, 1),
    ("bf16", "fp8_e5m2", ALL, 128, 16, 1): (64, 32, 8, 1),
    ("bf16", "fp8_e5m2", ALL, 256, 16, 1): (16, 32, 8, 2),
    ("fp16", "auto", (), 192, 1, 8): (16, 32, 8, 2),
    ("fp16", "auto", (), 256, 128, 3): (16, 32, 8, 2),
    ("fp16", "fp8_e4m3", (), 80, 128, 8): (64, 64, 8, 1),
    ("fp16", "fp8_e4m3", (), 96, 128, 8): (64, 64, 8, 1),
    ("fp16", "fp8_e4m3", (), 112, 128, 8): (64, 64, 8, 1),
    ("fp16", "fp8_e4m3", (), 128, 128, 8): (64, 64, 8, 1),
    ("fp16", "fp8_e4m3", (), 256, 128, 8): (16, 32, 8, 2),
    ("fp16", "fp8_e5m2", (), 80, 128, 8): (64, 64, 8, 1),
    ("fp16", "fp8_e5m2", (), 96, 128, 8): (64, 64, 8, 1),
    ("fp16", "fp8_e5m2", (), 112, 128, 8): (64, 64, 8, 1),
    ("fp16", "fp8_e5m2", (), 128, 128, 8): (64, 64, 8, 1),
    ("fp16", "fp8_e5m2", (), 256, 1, 8): (16, 32, 8, 2),
    ("fp16", "fp8_e5m2", (), 256, 16, 8): (16, 32, 8, 2),
    ("fp16", "fp8_e5m2", (), 256, 128, 8): (16, 32, 8, 2),
    ("fp16", "fp8_e5m2", ALL, 64, 16, 8): (64, 64, 8, 1),
    ("fp16", "fp8_e5m2", ALL, 128, 16, 8): (64, 32, 8, 1),
    ("fp16", "fp8_e5m2", ALL, 256, 16, 1): (16, 32, 8, 2),
    ("fp16", "fp8_e5m2", ALL, 256, 16, 8): (16, 16, 8, 2),
    ("fp32", "auto", (), 192, 16, 3): (16, 16, 8, 1),
    ("fp32", "auto", (), 192, 128, 1): (16, 16, 8, 1),
    ("fp32", "auto", (), 192, 128, 3): (16, 32, 8, 2),
    ("fp32", "auto", (), 256, 1, 3): (16, 16, 8, 1),
    ("fp32", "auto", (), 256, 16, 3): (16, 16, 8, 1),
    ("fp32", "auto", (), 256, 128, 1): (16, 16, 8, 1),
    ("fp32", "auto", (), 256, 128, 3): (16, 32, 8, 2),
    ("fp32", "fp8_e4m3", (), 64, 128, 8): (16, 64, 8, 1),
    ("fp32", "fp8_e4m3", (), 80, 1, 8): (16, 16, 4, 1),
    ("fp32", "fp8_e4m3", (), 80, 16, 8): (16, 16, 4, 1),
    ("fp32", "fp8_e4m3", (), 80, 128, 8): (16, 16, 4, 1),
    ("fp32", "fp8_e4m3", (), 96, 1, 8): (16, 16, 4, 1),
    ("fp32", "fp8_e4m3", (), 96, 16, 8): (16, 16, 4, 1),
    ("fp32", "fp8_e4m3", (), 96, 128, 8): (16, 16, 4, 1),
    ("fp32", "fp8_e4m3", (), 112, 1, 8): (16, 16, 4, 1),
    ("fp32", "fp8_e4m3", (), 112, 16, 8): (16, 16, 4, 1),
    ("fp32", "fp8_e4m3", (), 112, 128, 8): (16, 16, 4, 1),
    ("fp32", "fp8_e4m3", (), 128, 1, 8): (16, 16, 4, 1),
    ("fp32", "fp8_e4m3", (), 128, 16, 8): (16, 16, 4, 1),
    ("fp32", "fp8_e4m3", (), 128, 128, 8): (16, 16, 4, 1),
    ("fp32", "fp8_e5m2", (), 64, 128, 8): (16, 64, 8, 1),
    ("fp32", "fp8_e5m2", (), 80, 1, 8): (16, 16, 4, 1),
    ("fp32", "fp8_e5m2", (), 80, 16, 8): (16, 16, 4, 1),
    ("fp32", "fp8_e5m2", (), 80, 128, 8): (16, 16, 4, 1),
    ("fp32", "fp8_e5m2", (), 96, 1, 8): (16, 16, 4, 1),
    ("fp32", "fp8_e5m2", (), 96, 16, 8): (16, 16, 4, 1),
    ("fp32", "fp8_e5m2", (), 96, 128, 8): (16, 16, 4, 1),
    ("fp32", "fp8_e5m2", (), 112, 1, 8): (16, 16, 4, 1),
    ("fp32", "fp8_e5m2", (), 112, 16, 8): (16, 16, 4, 1),
    ("fp32", "fp8_e5m2", (), 112, 128, 8): (16, 16, 4, 1),
    ("fp32", "fp8_e5m2", (), 128, 1, 8): (16, 16, 4, 1),
    ("fp32", "fp8_e5m2", (), 128, 16, 8): (16, 16, 4, 1),
    ("fp32", "fp8_e5m2", (), 128, 128, 8): (16, 16, 4, 1),
    ("fp32", "fp8_e5m2", (), 192, 1, 8): (16, 16, 8, 1),
    ("fp32", "fp8_e5m2", ALL, 256, 16, 1): (16, 32, 8, 1),
}


AUDITED_DECODE: dict[tuple, tuple[int, int, int]] = {
    ("fp32", "auto", (), 80, 16, 8): (32, 8, 2),
    ("fp32", "auto", (), 96, 16, 8): (32, 8, 2),
    ("fp32", "auto", (), 112, 16, 8): (32, 8, 2),
    ("fp32", "auto", (), 128, 16, 8): (32, 8, 2),
}


def audited_launch(config) -> tuple | None:
    """The launch parameters recorded for ``config``'s shape (a VariantConfig or an
    AttentionVariantConfig, fields normalised), or None: the rule's choice stands."""
    table = AUDITED_ATTENTION if config.family == "attention" else AUDITED_DECODE
    return table.get((config.dtype, config.kv_dtype, tuple(config.features), config.head_dim,
                      config.block_size, config.group_size))
