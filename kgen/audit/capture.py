"""Capture the kernel launches of a rendered module and specialize them like Triton's JIT.

Used by :mod:`kgen.audit` to compile a variant for a GPU target on a machine without one:

* :func:`load_jit_module` imports a rendered module with the interpreter off, so its kernels are
  real ``triton.runtime.jit.JITFunction`` objects even inside a ``TRITON_INTERPRET=1`` process.
* :func:`capture_launches` calls the module's ``paged_attention_decode`` on small random CPU
  tensors, with each kernel global (named in ``module.KERNELS``) replaced by a recorder.
* :func:`specialize` turns one captured launch into ``(signature, constexprs, attrs, options)``
  for ``triton.compile``, following the JIT's rules: tensors -> ``*fp16`` etc. with 16-byte
  alignment; ints -> ``i32``/``i64`` with divisibility-16, and 1 -> constexpr; floats -> ``fp32``.
"""

from __future__ import annotations

import importlib.util
import itertools
import sys

from kgen.audit.capture_attention import capture_attention_launches
from kgen.audit.recording import (AUTO_SPLITS, Launch, Recorder, _bind, interpreter_off,  # noqa: F401
                                  mark_kv_args, workload)
from kgen.families import family_of
from kgen.variant import SPLIT_AUTO

_TYPE_NAMES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "float64": "fp64",
               "int8": "i8", "int16": "i16", "int32": "i32", "int64": "i64", "uint8": "u8",
               "bool": "i1", "float8_e4m3fn": "fp8e4nv", "float8_e5m2": "fp8e5"}
_WIDE_MERGE_SPLITS = 64  # and a call whose merge reads its widest step (64 partitions, 8 warps)
_module_ids = itertools.count()


def load_jit_module(path, entry_point: str = "paged_attention_decode"):
    """Import the module at ``path`` as a fresh copy whose ``@triton.jit`` kernels compile.

    Raises
    ------
    ValueError
        If the module lacks ``KERNELS`` / ``entry_point`` (the family's launcher) or a kernel is
        not a JITFunction.
    """
    from triton.runtime.jit import JITFunction

    name = f"_kgen_audit_{next(_module_ids)}"
    spec = importlib.util.spec_from_file_location(name, str(path))
    if spec is None or spec.loader is None:
        raise ValueError(f"path={str(path)!r} is not an importable Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        with interpreter_off():
            spec.loader.exec_module(module)
    finally:
        sys.modules.pop(name, None)
    for attr in ("KERNELS", entry_point):
        if not hasattr(module, attr):
            raise ValueError(f"module {path} has no {attr!r}; is it a kgen-rendered kernel?")
    for kernel in module.KERNELS:
        if not isinstance(getattr(module, kernel, None), JITFunction):
            raise ValueError(f"{kernel!r} in {path} is not a triton JITFunction")
    return module


def capture_launches(module, config) -> list[Launch]:
    """Record the launches of a variant's representative calls (its family's): for decode,
    ``module.paged_attention_decode`` on :func:`workload` inputs; for attention,
    :func:`kgen.audit.capture_attention.capture_attention_launches`."""
    if family_of(config).name == "attention":
        return capture_attention_launches(module, config)
    inputs = workload(config)
    sink: list[Launch] = []
    saved = {name: getattr(module, name) for name in module.KERNELS}
    try:
        for name, fn in saved.items():
            setattr(module, name, Recorder(name, fn, sink))
        calls = [{"num_splits": AUTO_SPLITS} if config.split_k == SPLIT_AUTO else {}]
        if config.split_k != 1:  # a split variant runs the single-pass kernel when splits == 1
            calls.append({"num_splits": 1})
        with interpreter_off():  # the launcher may pick interpreter-only paths from the env
            for extra in calls:
                module.paged_attention_decode(**inputs, **extra)
            if config.split_k != 1:  # the merge's widest step; its partial launch is a repeat
                wide: list[Launch] = []
                for name in module.KERNELS:
                    getattr(module, name).sink = wide
                module.paged_attention_decode(**inputs, num_splits=_WIDE_MERGE_SPLITS)
                sink.extend(launch for launch in wide if launch.name == "_merge_kernel")
    finally:
        for name, fn in saved.items():
            setattr(module, name, fn)
    if not sink:
        raise ValueError(f"{config.key}: paged_attention_decode launched no kernel")
    return mark_kv_args(sink, inputs)


def _spec_value(param, value):
    """(type, divisible_by_16) of one runtime argument, or ("constexpr", value)."""
    specialize = not param.do_not_specialize
    align = not param.do_not_specialize_on_alignment
    annotation = param.annotation_type
    if value is None:
        return "constexpr", None
    if isinstance(value, bool):
        return "u1", False
    if isinstance(value, int):
        if annotation and (annotation == "u1" or annotation[:2] in ("fp", "bf")):
            return annotation, False
        if specialize and value == 1 and not annotation:
            return "constexpr", 1
        ty = "i32" if -2**31 <= value < 2**31 else ("u64" if value >= 2**63 else "i64")
        return annotation or ty, specialize and align and value % 16 == 0
    if isinstance(value, float):
        return annotation or "fp32", False
    if hasattr(value, "data_ptr") and hasattr(value, "dtype"):
        elem = _TYPE_NAMES.get(str(value.dtype).replace("torch.", ""))
        if elem is None:
            raise ValueError(f"{param.name}: tensor dtype {value.dtype} has no Triton type")
        ty = ("*k" if param.is_const else "*") + elem
        return ty, align and value.data_ptr() % 16 == 0
    raise ValueError(f"{param.name}={value!r}: cannot specialize a {type(value).__name__}")


def specialize(fn, args, kwargs):
    """Signature, constexprs, attrs and options for ``triton.compile`` from one launch.

    Returns
    -------
    tuple
        ``signature`` {param name: type or "constexpr"}, ``constexprs`` {(index,): value},
        ``attrs`` {(index,): [["tt.divisibility", 16]]}, ``options`` (num_warps, num_stages ...).
    """
    bound, options = _bind(fn, args, kwargs)
    signature, constexprs, attrs = {}, {}, {}
    for index, param in enumerate(fn.params):
        value = bound[param.name]
        if param.is_constexpr:
            signature[param.name], constexprs[(index,)] = "constexpr", value
            continue
        ty, extra = _spec_value(param, value)
        signature[param.name] = ty
        if ty == "constexpr":
            constexprs[(index,)] = extra
        elif extra:
            attrs[(index,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs, options
