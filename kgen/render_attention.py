"""The ``paged_attention`` family's part of rendering: its template parts, kernels and slots.

:func:`kgen.render.slots` dispatches here for an :class:`AttentionVariantConfig`; it computes the
values both families print (:func:`kgen.render.shared_slots`) and passes them in, and this module
adds the family's own (the q tile and the segment planner's partial cost).
"""

from __future__ import annotations

from kgen.space import kv_elem_bytes
from kgen.variant_attention import AttentionVariantConfig

SINGLE_PASS_KERNELS = ("_attention_kernel",)
SEGMENT_KERNELS = ("_attention_kernel", "_attention_segment_kernel", "_merge_kernel")


def attention_kernel_names(config: AttentionVariantConfig) -> tuple[str, ...]:
    """The ``@triton.jit`` kernels the module launches (the segmented ones unless split_k is 1)."""
    return SEGMENT_KERNELS if config.split_k != 1 else SINGLE_PASS_KERNELS


def attention_template_parts(config: AttentionVariantConfig) -> tuple[str, ...]:
    """Template names making up the module, in order. ``plan`` and ``launch_features`` are the
    decode family's (device facts, merge shapes, feature arguments), ``merge`` too: the segments
    of a (token, head) combine exactly as the partitions of a decode (sequence, head)."""
    segments = ("attention_segments.py.j2", "merge.py.j2") if config.split_k != 1 else ()
    return ("attention_header.py.j2", "attention_rows.py.j2", "attention_attend.py.j2",
            "attention_tiles.py.j2", *segments, "plan.py.j2", "attention_plan.py.j2",
            "launch_features.py.j2", "attention_launcher.py.j2")


def attention_slots(config: AttentionVariantConfig, shared: dict) -> dict:
    """Every value the attention templates print: ``shared`` (both families' slots of
    ``config``) and the family's own, computed from ``config``."""
    tile_bytes = 2 * config.tile_tokens * config.head_dim * kv_elem_bytes(config)  # K and V of a tile
    row_partial_bytes = 2 * (config.head_dim + 2) * 4  # a row's fp32 m, l, acc: written, then read
    return {
        **shared,
        "q_tile": config.q_tile,
        "row_partial_tiles": repr(round(row_partial_bytes / tile_bytes, 6)),
    }
