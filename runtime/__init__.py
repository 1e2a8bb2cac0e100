"""kgen's minimal serving runtime: paged KV memory, continuous batching and ``generate()``.

The public names are imported lazily, so that ``import runtime.kv_manager`` (the memory manager,
pure Python) does not pull in torch.

Imported before torch, the package sets ``OMP_WAIT_POLICY=PASSIVE`` unless the environment sets
it (see :mod:`runtime.threads`): torch's OpenMP threads then sleep between parallel regions
instead of spinning, which on a machine whose cores are also busy with other work kept two
threads from collapsing to a third of one thread's speed.
"""

from __future__ import annotations

import importlib
import os
import sys

if "torch" not in sys.modules:  # OpenMP reads it once, when torch loads its runtime
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    OMP_WAIT_POLICY = os.environ["OMP_WAIT_POLICY"].lower()
else:  # too late to choose: the environment's value if any (set before start-up), else spinning
    OMP_WAIT_POLICY = os.environ.get("OMP_WAIT_POLICY", "active").lower()

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
