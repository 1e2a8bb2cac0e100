"""The per-workload search space: the template parameters that do not change the cache layout.

A workload fixes dtype, head dim, block size, group size, KV dtype and attention features; the
tuner searches split-K (``auto`` and 1 included), tokens per inner tile, ``num_warps`` and
``num_stages``, with the values of :data:`kgen.space.AXES`. The generator's pure prune rules (:func:`kgen.space.prune_reason`) reject
a candidate before anything is built.

Optuna sees each axis as an ordered integer index into its sorted values (parameter
``<axis>_idx``; split-K ``auto`` is index 0), so TPE can exploit that neighbouring values perform
alike instead of treating them as unrelated categories.
"""

from __future__ import annotations

from kgen.space import AXES, default_config, prune_reason
from kgen.variant import SPLIT_AUTO, VariantConfig
from kgen.workload import Workload

SEARCH_AXES = ("split_k", "tile_tokens", "num_warps", "num_stages")
PARAM_NAMES = tuple(f"{axis}_idx" for axis in SEARCH_AXES)


def search_space(workload: Workload) -> dict[str, tuple]:
    """Axis name -> sorted candidate values for one workload (split-K capped by the context)."""
    space = {name: tuple(sorted(AXES[name])) for name in SEARCH_AXES}
    # More partitions than KV pages (of the context bucket) can only add empty partitions.
    pages = max(1, workload.context // workload.block_size)
    space["split_k"] = tuple(s for s in space["split_k"] if s == SPLIT_AUTO or s <= pages)
    return space


def config_for(workload: Workload, params: dict) -> VariantConfig:
    """The variant of ``workload`` for Optuna ``params`` (``<axis>_idx`` -> index)."""
    unknown = set(params) - set(PARAM_NAMES)
    if unknown or len(params) != len(PARAM_NAMES):
        raise ValueError(f"params={params!r} do not name exactly {', '.join(PARAM_NAMES)}")
    space = search_space(workload)
    values = {}
    for axis, name in zip(SEARCH_AXES, PARAM_NAMES):
        index = params[name]
        if not isinstance(index, int) or not 0 <= index < len(space[axis]):
            raise ValueError(f"{name}={index!r} is outside 0..{len(space[axis]) - 1}")
        values[axis] = space[axis][index]
    return VariantConfig(**workload.variant_fields(), **values)


def params_of(workload: Workload, config: VariantConfig) -> dict | None:
    """Optuna params of a variant (inverse of :func:`config_for`); None if outside the space."""
    space = search_space(workload)
    params = {}
    for axis, name in zip(SEARCH_AXES, PARAM_NAMES):
        value = getattr(config, axis)
        if value not in space[axis]:
            return None
        params[name] = space[axis].index(value)
    return params


def grid_space(workload: Workload) -> dict[str, list[int]]:
    """Every index of every parameter (for Optuna's GridSampler)."""
    space = search_space(workload)
    return {name: list(range(len(space[axis]))) for axis, name in zip(SEARCH_AXES, PARAM_NAMES)}


def default_variant(workload: Workload) -> VariantConfig:
    """The generator's untuned default for the workload's shape (the warm start)."""
    return default_config(**workload.variant_fields())


def static_prune(config: VariantConfig) -> str | None:
    """The generator's prune rules (pure, instant): a reason to skip ``config``, or None."""
    return prune_reason(config)


def all_candidates(workload: Workload) -> list[VariantConfig]:
    """Every point of the workload's search space (pruned ones included), in a fixed order."""
    import itertools

    space = search_space(workload)
    return [VariantConfig(**workload.variant_fields(), **dict(zip(SEARCH_AXES, combo)))
            for combo in itertools.product(*(space[name] for name in SEARCH_AXES))]
