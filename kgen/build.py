"""Load a variant's rendered module, cached in process by variant key.

Triton reads a ``@triton.jit`` function's source from its file, so the module is rendered to
disk first (:func:`kgen.render.write_source`) and imported from there. Set ``TRITON_INTERPRET=1``
before the first kernel module is loaded to run kernels on the CPU.
"""

from __future__ import annotations

import importlib.util
import sys
import threading
from pathlib import Path
from types import ModuleType

from kgen.render import write_source
from kgen.variant_attention import as_config, config_from_key

_MODULES: dict[str, ModuleType] = {}
_LOCK = threading.Lock()


def module_name(config) -> str:
    """The ``sys.modules`` name of a variant's module, e.g. ``kgen_kernel_paged_decode_d128_...``
    or ``kgen_kernel_paged_attention_d128_...``."""
    return "kgen_kernel_" + as_config(config).key.replace("-", "_")


def import_file(path, name: str) -> ModuleType:
    """Import the Python file ``path`` as module ``name`` (registered in ``sys.modules``)."""
    path = Path(path)
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def load_kernel(config, *, directory=None) -> ModuleType:
    """The module of variant ``config`` (a variant of either family, or its key), rendered and
    imported once.

    Returns
    -------
    module
        A decode variant's (:class:`kgen.variant.VariantConfig`) exposes
        ``paged_attention_decode(query, key_cache, value_cache, block_tables, seq_lens, *,
        scale=None, out=None, max_seq_len=None, num_splits=None, fixed_grid=False, validate=False)``
        and ``choose_num_splits``; an attention variant's
        (:class:`kgen.variant_attention.AttentionVariantConfig`) exposes
        ``paged_attention(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc,
        *, max_query_len=None, max_seq_len=None, ..., out=None, validate=False)`` and its planner
        ``plan_launch(num_seqs, num_kv_heads, max_query_len, max_seq_len, *, window=None,
        device=None) -> (BLOCK_M, BLOCK_Q, segments)`` (with ``plan_segments``). Both expose
        ``VARIANT_KEY``, ``CONFIG`` (a plain dict) and ``KERNELS`` (names of its jit kernels).

    Raises
    ------
    ValueError
        When ``config`` is neither a variant nor a key of either family.
    """
    config = as_config(config)
    key = config.key
    module = _MODULES.get(key)
    if module is not None:
        return module
    with _LOCK:
        module = _MODULES.get(key)
        if module is None:
            path = write_source(config, directory)
            module = import_file(path, module_name(config))
            _MODULES[key] = module
    return module


def loaded_keys() -> list[str]:
    """Keys of the variants loaded in this process."""
    return sorted(_MODULES)


def clear_cache() -> None:
    """Forget loaded modules (the next :func:`load_kernel` re-renders and re-imports)."""
    with _LOCK:
        for key in list(_MODULES):
            sys.modules.pop(module_name(config_from_key(key)), None)
        _MODULES.clear()
