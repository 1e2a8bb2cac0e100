"""Render a variant's Triton module from the Jinja templates; cache it on disk; emit it.

Every value the templates print is computed here by :func:`slots` from the frozen
:class:`~kgen.variant.VariantConfig`; the templates only hold ``{{ }}`` slots and simple
``{% if %}`` blocks (the emitted header's optional lines, the launcher's split-K path); the
split-K kernels are included by :func:`template_parts`. A module is the concatenation of
``header``, ``attend`` (shared inner loop), ``decode`` (single pass), for split-K variants
``decode_partial`` and ``merge``, ``plan`` (the split planner), ``launch_features`` (checks and
kernel arguments of the KV dtype and the attention features) and ``launcher``.

The ``paged_attention`` family (:class:`kgen.variant_attention.AttentionVariantConfig`, any query
length) renders from its own ``attention_*`` templates plus the shared ``merge``, ``plan`` and
``launch_features``; its slots are computed by :func:`kgen.render_attention.attention_slots`,
which :func:`slots` dispatches to, so this stays the one entry point for every family's values.
"""

from __future__ import annotations

import datetime
import functools
import math
import os
import tempfile
from pathlib import Path

import jinja2

from kgen import __version__
from kgen.dtypes import KV_TORCH_NAMES, TORCH_NAMES
from kgen.paths import cache_dir, template_hash, templates_dir
from kgen.render_attention import attention_kernel_names, attention_slots, attention_template_parts
from kgen.space import kv_elem_bytes, padded_group, padded_head_dim
from kgen.variant import MAX_SPLIT_K, VariantConfig
from kgen.variant_attention import AttentionVariantConfig, as_config

SINGLE_PASS_KERNELS = ("_decode_kernel",)
SPLIT_KERNELS = ("_decode_kernel", "_decode_partial_kernel", "_merge_kernel")
# Kernel parameters each compiled-in feature adds (the launcher passes them by name). A plain
# variant's kernels have none of them: its signature and code are those of the plain space.
FEATURE_PARAMS = {
    "kv_fp8": ("k_scale_ptr", "v_scale_ptr", "stride_ksc", "stride_vsc", "v_mul"),
    "sliding_window": ("window",),
    "soft_cap": ("cap_log2",),
    "alibi": ("alibi_ptr", "stride_al"),
    "sinks": ("sinks_ptr", "stride_sk"),
}
# Split planning (templates/plan.py.j2). Off-GPU the planner assumes the SM count of the largest
# GPU kgen targets (H100/H200: 132); on a GPU it reads the device's.
INTERPRETER_SMS = 132
PROGRAMS_PER_SM = 2  # resident programs per SM assumed before the compiled kernel is known
SPLIT_OVERHEAD = 1 / 8  # a partition's partial write + merge read, at most this share of its K/V bytes
MERGE_CHUNKS = (16, 32, 64)  # partitions per merge step; 256 partitions take 4 dependent steps


@functools.lru_cache(maxsize=4)
def _environment(folder: str) -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.FileSystemLoader(folder), undefined=jinja2.StrictUndefined,
                              keep_trailing_newline=True, autoescape=False)


def kernel_names(config) -> tuple[str, ...]:
    """Names of the module-level ``@triton.jit`` kernels a variant's module launches."""
    if isinstance(config, AttentionVariantConfig):
        return attention_kernel_names(config)
    return SPLIT_KERNELS if config.split_k != 1 else SINGLE_PASS_KERNELS


def feature_params(config: VariantConfig) -> tuple[str, ...]:
    """Names of the kernel parameters the variant's KV dtype and features add, in order."""
    groups = (["kv_fp8"] if config.kv_fp8 else []) + list(config.features)
    return tuple(name for group in groups for name in FEATURE_PARAMS[group])


def slots(config, *, generated_at: str | None = None,
          command_line: str | None = None, template_digest: str | None = None) -> dict:
    """Every value the templates print, computed from ``config`` (a variant of either family).

    ``template_digest`` is :func:`kgen.paths.template_hash` of the config's family when the
    caller has it already (None: compute it).
    """
    if isinstance(config, AttentionVariantConfig):
        return attention_slots(config, shared_slots(config, generated_at=generated_at,
                                                    command_line=command_line,
                                                    template_digest=template_digest))
    if not isinstance(config, VariantConfig):
        raise ValueError(f"config={config!r} is not a VariantConfig or an AttentionVariantConfig")
    return {**shared_slots(config, generated_at=generated_at, command_line=command_line,
                           template_digest=template_digest),
            "g_pad": padded_group(config.group_size)}


def shared_slots(config, *, generated_at, command_line, template_digest) -> dict:
    """The slots every family's templates print (header, constants, features, dots, planner)."""
    d_pad = padded_head_dim(config.head_dim)
    params = feature_params(config)
    kv_torch = KV_TORCH_NAMES.get(config.kv_dtype, TORCH_NAMES[config.dtype])
    return {
        "variant_key": config.key,
        "config_text": ", ".join(f"{k}={v}" for k, v in config.to_dict().items()),
        "config_dict": repr(config.to_dict()),
        "kernels": repr(kernel_names(config)),
        "kgen_version": __version__,
        "template_hash": template_hash(config.family) if template_digest is None else template_digest,
        "generated_at": generated_at,
        "command_line": command_line,
        "head_dim": config.head_dim,
        "d_pad": d_pad,
        "pad_d": d_pad != config.head_dim,
        "block_size": config.block_size,
        "group_size": config.group_size,
        "tile_tokens": config.tile_tokens,
        "pages_per_tile": max(1, config.tile_tokens // config.block_size),
        "page_step": min(config.tile_tokens, config.block_size),
        "split": config.split_k != 1,
        "split_k": config.split_k,
        "max_splits": MAX_SPLIT_K,
        "num_warps": config.num_warps,
        "num_stages": config.num_stages,
        "dtype_name": config.dtype,
        "torch_dtype": "torch." + TORCH_NAMES[config.dtype],
        "kv_dtype_name": config.kv_dtype if config.kv_fp8 else config.dtype,
        "kv_torch_dtype": "torch." + kv_torch,
        "kv_fp8": config.kv_fp8,
        "features": repr(tuple(config.features)),
        "features_text": ", ".join(config.features) if config.features else "none",
        # "a, b, " spliced into kernel signatures and calls before the next parameter ('' if plain)
        "feature_params": "".join(f"{name}, " for name in params),
        # fp32 dots in full precision (not tf32); 16-bit dots use tensor cores either way.
        "dot_precision": "ieee" if config.dtype == "fp32" else "tf32",
        **plan_slots(config, d_pad),
    }


def plan_slots(config: VariantConfig, d_pad: int) -> dict:
    """The split planner's constants for ``config`` (see templates/plan.py.j2)."""
    tile_bytes = 2 * config.tile_tokens * config.head_dim * kv_elem_bytes(config)  # K and V of a tile
    partial_bytes = 2 * config.group_size * (config.head_dim + 2) * 4  # fp32 written, then read
    # The merge holds a [chunk, D_PAD] fp32 tile: one warp per 1024 of its values (1..8 warps)
    # keeps that at <= 32 registers per thread.
    shapes = tuple((chunk, max(1, min(8, chunk * d_pad // 1024))) for chunk in MERGE_CHUNKS)
    return {
        "min_tiles_per_split": max(1, math.ceil(partial_bytes / (SPLIT_OVERHEAD * tile_bytes))),
        "programs_per_sm": PROGRAMS_PER_SM,
        "interpreter_sms": INTERPRETER_SMS,
        "merge_shapes": repr(shapes),
    }


def template_parts(config) -> tuple[str, ...]:
    """Template names making up the variant's module, in order."""
    if isinstance(config, AttentionVariantConfig):
        return attention_template_parts(config)
    middle = ("decode_partial.py.j2", "merge.py.j2") if config.split_k != 1 else ()
    return ("header.py.j2", "attend.py.j2", "decode.py.j2", *middle, "plan.py.j2",
            "launch_features.py.j2", "launcher.py.j2")


def render_source(config, *, generated_at: str | None = None,
                  command_line: str | None = None, template_digest: str | None = None) -> str:
    """The Python source of the variant's module (kernels + launcher), as text.

    ``template_digest``: as in :func:`slots` (None: compute it).
    """
    config = as_config(config)
    env = _environment(str(templates_dir()))
    values = slots(config, generated_at=generated_at, command_line=command_line,
                   template_digest=template_digest)
    return "".join(env.get_template(name).render(**values) for name in template_parts(config))


def _write_if_changed(path: Path, text: str) -> Path:
    """Atomically replace ``path`` with ``text`` unless it already holds exactly that text."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        if path.read_text() == text:
            return path
    except FileNotFoundError:
        pass
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_source(config, directory=None) -> Path:
    """Render ``config`` to ``<directory>/<key>.py``.

    The default directory is ``<cache_dir>/<template hash>/`` (:func:`kgen.paths.cache_dir`): two
    kgen versions (or checkouts) with different templates on one machine never overwrite each
    other's module of the same key, so a process cannot import another version's kernel. The
    file is rewritten only when its text changed, so its mtime (and Triton's caches keyed on the
    source) stay put across runs.
    """
    config = as_config(config)
    digest = template_hash(config.family)  # once: names the default folder, printed in the header
    folder = Path(directory) if directory is not None else cache_dir() / digest
    return _write_if_changed(folder / f"{config.key}.py",
                             render_source(config, template_digest=digest))


def _check_output_path(path: Path) -> None:
    """Refuse, naming the path, an output that is a folder or would sit under a regular file."""
    if path.is_dir():
        raise ValueError(f"output path={str(path)!r} is a directory; give the module's file name")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"output path={str(path)!r} is under {str(parent)!r}, which is a "
                                 f"file, not a directory")
            return


def emit(config, path, *, command_line: str | None = None) -> Path:
    """Write a standalone module for ``config`` to ``path`` (imports only torch and triton).

    The header names the variant key, its config, the kgen version, the template hash, the UTC
    date and, when given, the command line that produced it.
    """
    path = Path(path)
    _check_output_path(path)
    if path.suffix != ".py":
        raise ValueError(f"output path={str(path)!r} must end in .py (it is a Python module)")
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    return _write_if_changed(path, render_source(config, generated_at=now, command_line=command_line))
