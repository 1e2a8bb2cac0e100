"""The kernel families kgen generates, each as one record of what varies between them.

``decode`` is one query token per sequence (:class:`kgen.variant.VariantConfig`,
``paged_attention_decode``); ``attention`` any query length (:class:`kgen.variant_attention.
AttentionVariantConfig`, ``paged_attention``). The CLI's ``--kernel`` option, the audit and the
benchmarks pick a family here instead of branching on config classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from kgen import space, space_attention
from kgen.variant import VariantConfig
from kgen.variant_attention import AttentionVariantConfig, as_config


@dataclass(frozen=True)
class Family:
    """What a family is made of: its config class, axes, space functions and entry point."""

    name: str
    config_class: type
    axes: dict
    iter_variants: Callable  # (*, prune, target, **filters) -> iterator of configs
    space_size: Callable  # (*, prune, target, **filters) -> int
    prune_reason: Callable  # (config) -> str | None
    default_config: Callable  # (*, head_dim, block_size, group_size, dtype, split_k, kv_dtype, features)
    entry_point: str  # the launcher function a rendered module exposes


FAMILIES = {
    "decode": Family("decode", VariantConfig, space.AXES, space.iter_variants, space.space_size,
                     space.prune_reason, space.default_config, "paged_attention_decode"),
    "attention": Family("attention", AttentionVariantConfig, space_attention.AXES,
                        space_attention.iter_attention_variants,
                        space_attention.attention_space_size, space_attention.prune_reason,
                        space_attention.default_attention_config, "paged_attention"),
}


def get_family(name: str) -> Family:
    """The family called ``name`` (``decode`` or ``attention``); ValueError naming it otherwise."""
    family = FAMILIES.get(str(name).strip().lower())
    if family is None:
        raise ValueError(f"kernel={name!r} is not a kernel family; use one of {', '.join(FAMILIES)}")
    return family


def family_of(config) -> Family:
    """The family of a variant (either config class, or a key of either family)."""
    return FAMILIES[as_config(config).family]


def default_variant(workload):
    """The generator's untuned default of a workload's family (:attr:`Workload.kernel`) for its
    shape: the tuner's warm start, what every winner is compared with, the lookup's fallback."""
    return get_family(workload.kernel).default_config(**workload.variant_fields())
