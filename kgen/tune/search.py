"""The per-workload search space: the template parameters that do not change the cache layout.

A workload fixes dtype, head dim, block size, group size, KV dtype, attention features and the
kernel family its study searches (:attr:`kgen.workload.Workload.kernel`). The tuner searches the
family's launch axes: split-K / segments (``auto`` and 1 included), tokens per key tile,
``num_warps`` and ``num_stages``, and for the ``attention`` family also the query tile (rows of the
dot), with the values of the family's axes (:data:`kgen.space.AXES`,
:data:`kgen.space_attention.AXES`). The generator's pure prune rules of the family reject a
candidate before anything is built.

Optuna sees each axis as an ordered integer index into its sorted values (parameter
``<axis>_idx``; split-K ``auto`` is index 0), so TPE can exploit that neighbouring values perform
alike instead of treating them as unrelated categories.
"""

from __future__ import annotations

import itertools

from kgen.families import default_variant, get_family  # noqa: F401 - default_variant re-exported
from kgen.variant import SPLIT_AUTO
from kgen.workload import Workload

SEARCH_AXES = {"decode": ("split_k", "tile_tokens", "num_warps", "num_stages"),
               "attention": ("q_tile", "split_k", "tile_tokens", "num_warps", "num_stages")}
PARAM_SETS = {family: tuple(f"{axis}_idx" for axis in axes) for family, axes in SEARCH_AXES.items()}
PARAM_NAMES = PARAM_SETS["decode"]  # the decode family's (every study before the attention family)


def param_names(workload: Workload) -> tuple[str, ...]:
    """The Optuna parameter names of the workload's family, in order."""
    return PARAM_SETS[workload.kernel]


def search_space(workload: Workload) -> dict[str, tuple]:
    """Axis name -> sorted candidate values for one workload (split-K capped by the context;
    query tiles of more rows than the workload's query length fills are left out)."""
    axes = get_family(workload.kernel).axes
    space = {name: tuple(sorted(axes[name])) for name in SEARCH_AXES[workload.kernel]}
    # More partitions than KV pages (of the context bucket) can only add empty partitions.
    pages = max(1, workload.context // workload.block_size)
    space["split_k"] = tuple(s for s in space["split_k"] if s == SPLIT_AUTO or s <= pages)
    if "q_tile" in space:  # tiles the step's rows (query tokens x group heads) can fill
        valid = [q for q in space["q_tile"] if q >= workload.group_size]
        rows = 1 << (workload.query_len * workload.group_size - 1).bit_length()
        default = default_variant(workload).q_tile
        if rows <= valid[0]:  # a short query runs a row tile sized to it, whatever q_tile is
            space["q_tile"] = (default,)
        else:
            space["q_tile"] = tuple(sorted({q for q in valid if q <= rows} | {default}))
    return space


def _config(workload: Workload, values: dict):
    return get_family(workload.kernel).config_class(**workload.variant_fields(), **values)


def config_for(workload: Workload, params: dict):
    """The variant of ``workload`` for Optuna ``params`` (``<axis>_idx`` -> index)."""
    names = param_names(workload)
    unknown = set(params) - set(names)
    if unknown or len(params) != len(names):
        raise ValueError(f"params={params!r} do not name exactly {', '.join(names)}")
    space = search_space(workload)
    values = {}
    for axis, name in zip(SEARCH_AXES[workload.kernel], names):
        index = params[name]
        if not isinstance(index, int) or not 0 <= index < len(space[axis]):
            raise ValueError(f"{name}={index!r} is outside 0..{len(space[axis]) - 1}")
        values[axis] = space[axis][index]
    return _config(workload, values)


def params_of(workload: Workload, config) -> dict | None:
    """Optuna params of a variant (inverse of :func:`config_for`); None if outside the space
    (another family's variant included)."""
    if config.family != workload.kernel:
        return None
    space = search_space(workload)
    params = {}
    for axis, name in zip(SEARCH_AXES[workload.kernel], param_names(workload)):
        value = getattr(config, axis)
        if value not in space[axis]:
            return None
        params[name] = space[axis].index(value)
    return params


def grid_space(workload: Workload) -> dict[str, list[int]]:
    """Every index of every parameter (for Optuna's GridSampler)."""
    space = search_space(workload)
    return {name: list(range(len(space[axis])))
            for axis, name in zip(SEARCH_AXES[workload.kernel], param_names(workload))}


def static_prune(config) -> str | None:
    """The generator's prune rules of the config's family (pure, instant): a reason to skip
    ``config``, or None."""
    return get_family(config.family).prune_reason(config)


def all_candidates(workload: Workload) -> list:
    """Every point of the workload's search space (pruned ones included), in a fixed order."""
    space = search_space(workload)
    axes = SEARCH_AXES[workload.kernel]
    return [_config(workload, dict(zip(axes, combo)))
            for combo in itertools.product(*(space[name] for name in axes))]
