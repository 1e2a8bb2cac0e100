"""kgen's minimal serving runtime: paged KV memory, continuous batching and ``generate()``.

The public names are imported lazily, so that ``import runtime.kv_manager`` (the memory manager,
pure Python) does not pull in torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "generate": "runtime.api",
    "SamplingParams": "runtime.sampling",
    "RequestOutput": "runtime.api",
    "CompletionOutput": "runtime.api",
    "GenerateOutputs": "runtime.api",
    "load_model": "runtime.loader",
    "LoadedModel": "runtime.loader",
    "Engine": "runtime.engine",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'runtime' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
