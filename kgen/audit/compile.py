"""Compile captured launches for a GPU target (no GPU needed) and read the binaries.

Triton decides at decoration time whether ``@triton.jit`` functions (its own ``tl.cdiv`` too) are
interpreted: in a process that imported Triton with ``TRITON_INTERPRET=1`` nothing here can run
(:func:`can_compile_in_process`), and :mod:`kgen.audit.worker` compiles in a child process.
Triton is imported inside the functions: importing this module must not decide the interpreter
mode for the caller.
"""

from __future__ import annotations

import subprocess
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

from kgen.audit.asm import (ptx_loads, resource_usage, sass_load_bits, sass_mma_count,
                            sass_spill_bytes)
from kgen.audit.capture import capture_launches, load_jit_module, specialize
from kgen.audit.result import TARGETS, AuditResult, KernelAudit, parse_target
from kgen.families import family_of
from kgen.render import write_source


def can_compile_in_process() -> bool:
    """False when Triton's own jit functions were created for the interpreter."""
    import triton.language.standard as standard
    from triton.runtime.jit import JITFunction

    return isinstance(standard.cdiv, JITFunction)


def _cuobjdump() -> str:
    import triton

    try:
        from triton import knobs

        return knobs.nvidia.cuobjdump.path
    except (ImportError, AttributeError):  # pragma: no cover - older layouts
        return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def read_cubin(cubin: bytes) -> str:
    """``cuobjdump --dump-resource-usage --dump-sass`` of a cubin, as text."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        proc = subprocess.run([_cuobjdump(), "--dump-resource-usage", "--dump-sass", handle.name],
                              capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"cuobjdump failed ({proc.returncode}): {proc.stderr.strip()[:300]}")
    return proc.stdout


def compile_for(fn, signature, constexprs, attrs, options, cc: int):
    """``triton.compile`` of a JITFunction for ``GPUTarget("cuda", cc, 32)`` (no GPU needed)."""
    import inspect

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    params = inspect.signature(ASTSource).parameters
    if "constexprs" not in params or "attrs" not in params:
        raise RuntimeError(f"triton {triton.__version__}: ASTSource{tuple(params)} lacks "
                           "'constexprs'/'attrs'; kgen's audit needs triton >= 3.3")
    src = ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. the TRITON_DEFAULT_FP_FUSION notice of 3.9
        return triton.compile(src, target=GPUTarget("cuda", cc, 32), options=options)


def audit_compiled(compiled, name: str, kv_params, seconds: float) -> KernelAudit:
    """Read one compiled kernel: resource usage and SASS from cuobjdump, K/V loads from PTX."""
    dump = read_cubin(compiled.asm["cubin"])
    usage = resource_usage(dump)
    sass_bits = sass_load_bits(dump)
    stores, reloads = sass_spill_bytes(dump)
    kv, other = Counter(), Counter()
    for load in ptx_loads(compiled.asm["ptx"]):
        (kv if load.params & kv_params else other)[load.bits] += 1
    meta = compiled.metadata
    return KernelAudit(
        name=name, registers=usage["registers"], spill_bytes=stores, spill_load_bytes=reloads,
        stack_bytes=usage["stack_bytes"], local_bytes=usage["local_bytes"],
        shared_bytes=int(meta.shared), kv_load_bits=dict(sorted(kv.items(), reverse=True)),
        other_load_bits=dict(sorted(other.items(), reverse=True)), sass_load_bits=sass_bits,
        consistent=_consistent(kv, other, sass_bits), mma_instructions=sass_mma_count(dump),
        num_warps=int(meta.num_warps), num_stages=int(meta.num_stages), compile_seconds=seconds,
    )


def _consistent(kv: Counter, other: Counter, sass_bits: dict) -> bool:
    """SASS agrees with the PTX: each K/V width appears at least as often among the SASS global
    loads (ptxas may unroll, never merge), and the SASS has no width the PTX lacks (a split)."""
    return (all(sass_bits.get(bits, 0) >= n for bits, n in kv.items())
            and set(sass_bits) <= set(kv) | set(other))


def audit_module_file(path, config, target: str = "sm_90") -> AuditResult:
    """Audit the rendered module at ``path`` (implementing ``config``, either family) for
    ``target``, here."""
    import triton


    target = parse_target(target)
    if not can_compile_in_process():
        raise RuntimeError("Triton was imported with TRITON_INTERPRET set; use AuditWorker")
    launches = capture_launches(load_jit_module(path, family_of(config).entry_point), config)
    kernels = []
    for launch in launches:
        signature, constexprs, attrs, options = specialize(launch.fn, launch.args, launch.kwargs)
        kv_params = {i for i, n in enumerate(launch.fn.arg_names) if n in launch.kv_args}
        start = time.perf_counter()
        compiled = compile_for(launch.fn, signature, constexprs, attrs, options, TARGETS[target])
        kernels.append(audit_compiled(compiled, launch.name, kv_params, time.perf_counter() - start))
    return AuditResult(variant=config.key, dtype=config.dtype, target=target, kernels=tuple(kernels),
                       compile_seconds=sum(k.compile_seconds for k in kernels),
                       triton_version=triton.__version__, kv_dtype=config.kv_dtype)


def audit_here(config, target: str) -> AuditResult:
    return audit_module_file(write_source(config), config, target)
