"""Compile captured launches for a GPU target and read the binaries; the audit worker process.

Triton decides at decoration time whether ``@triton.jit`` functions (its own ``tl.cdiv`` too) are
interpreted. In a process that imported Triton with ``TRITON_INTERPRET=1`` (the CPU test suite)
its standard library cannot be compiled, so :class:`AuditWorker` runs the compile in a child
process (``python -m kgen.audit_compile``) started without that variable. It reads one
``KEY TARGET`` request per line and answers one JSON line per request.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

from kgen.asm import ptx_loads, resource_usage, sass_load_bits, sass_spill_bytes
from kgen.audit import TARGETS, AuditResult, KernelAudit, parse_target
from kgen.variant import VariantConfig


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
        consistent=_consistent(kv, other, sass_bits),
        num_warps=int(meta.num_warps), num_stages=int(meta.num_stages), compile_seconds=seconds,
    )


def _consistent(kv: Counter, other: Counter, sass_bits: dict) -> bool:
    """SASS agrees with the PTX: each K/V width appears at least as often among the SASS global
    loads (ptxas may unroll, never merge), and the SASS has no width the PTX lacks (a split)."""
    return (all(sass_bits.get(bits, 0) >= n for bits, n in kv.items())
            and set(sass_bits) <= set(kv) | set(other))


def audit_module_file(path, config: VariantConfig, target: str = "sm_90") -> AuditResult:
    """Audit the rendered module at ``path`` (implementing ``config``) for ``target``, here."""
    import triton

    from kgen.launch_capture import capture_launches, load_jit_module, specialize

    target = parse_target(target)
    if not can_compile_in_process():
        raise RuntimeError("Triton was imported with TRITON_INTERPRET set; use AuditWorker")
    launches = capture_launches(load_jit_module(path), config)
    kernels = []
    for launch in launches:
        signature, constexprs, attrs, options = specialize(launch.fn, launch.args, launch.kwargs)
        kv_params = {i for i, n in enumerate(launch.fn.arg_names) if n in launch.kv_args}
        start = time.perf_counter()
        compiled = compile_for(launch.fn, signature, constexprs, attrs, options, TARGETS[target])
        kernels.append(audit_compiled(compiled, launch.name, kv_params, time.perf_counter() - start))
    return AuditResult(variant=config.key, dtype=config.dtype, target=target, kernels=tuple(kernels),
                       compile_seconds=sum(k.compile_seconds for k in kernels),
                       triton_version=triton.__version__)


def audit_here(config: VariantConfig, target: str) -> AuditResult:
    from kgen.render import write_source

    return audit_module_file(write_source(config), config, target)


class AuditWorker:
    """A child process that audits variants on request (started lazily, reused, closed at exit)."""

    def __init__(self):
        self._proc = None

    def _start(self):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        self._proc = subprocess.Popen([sys.executable, "-m", "kgen.audit_compile"], env=env,
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=subprocess.DEVNULL, text=True, bufsize=1)

    def audit(self, config: VariantConfig, target: str) -> AuditResult:
        """Audit in the child; a compile failure there raises RuntimeError here with its message."""
        if self._proc is None or self._proc.poll() is not None:
            self.close()  # a child that died: release its pipes
            self._start()
        self._proc.stdin.write(f"{config.key} {parse_target(target)}\n")
        self._proc.stdin.flush()
        line = self._proc.stdout.readline()
        if not line:
            code = self._proc.wait()
            self.close()
            raise RuntimeError(f"audit worker exited ({code}) while auditing {config.key}")
        reply = json.loads(line)
        if not reply["ok"]:
            raise RuntimeError(f"{config.key} on {target}: {reply['error']}")
        return AuditResult.from_dict(reply["result"])

    def close(self):
        """End the child (EOF on its stdin; killed if it does not exit in 30 s), close its pipes."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.stdin.close()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        proc.stdin.close()
        proc.stdout.close()


def main() -> int:  # pragma: no cover - exercised through AuditWorker in the tests
    """Worker loop: ``KEY TARGET`` lines in, one JSON line out; stdout kept for replies only."""
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything printed by Triton or tools goes to stderr, not into the protocol
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            key, target = line.split()
            result = audit_here(VariantConfig.from_key(key), target)
            reply = {"ok": True, "result": result.to_dict()}
        except Exception as exc:  # noqa: BLE001 - every failure is reported to the parent
            reply = {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[:2000]}"}
        replies.write(json.dumps(reply) + "\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
