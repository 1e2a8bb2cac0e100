"""Static audit of a variant without a GPU: compile for sm_80 / sm_90 and read the binary.

How it works
------------
1. The variant's rendered module is imported with ``TRITON_INTERPRET`` off, so its kernels are
   real ``JITFunction`` objects (:mod:`kgen.launch_capture`).
2. Its launcher is called on small random CPU tensors of a representative workload with each
   kernel global replaced by a recorder; every launch's ``(args, kwargs)`` is captured.
3. Each launch is specialized the way Triton's JIT would (:func:`kgen.launch_capture.specialize`)
   and compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``.
4. ``cuobjdump --dump-resource-usage --dump-sass`` (bundled with Triton) gives registers, stack,
   local memory, spill stores (``STL``) and global loads by width; Triton's metadata gives the
   shared memory the launch requests.

K/V loads are told apart from other loads by pointer provenance in the PTX
(:func:`kgen.asm.ptx_loads`): a load is a K/V load when its address derives from the
``key_cache`` / ``value_cache`` argument. Block-table, query and workspace loads are "other" loads.
The PTX widths are cross-checked against the SASS (``consistent``): every K/V width counted in the
PTX must appear at least as often among the SASS global loads (``LDG.E.128``,
``LDGSTS.E.BYPASS.128``, ...), so a load ptxas split or narrowed fails the audit.
"""

from __future__ import annotations

import atexit
import json
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields

from kgen.variant import VariantConfig

TARGETS = {"sm_80": 80, "sm_90": 90}
_TARGET_SPELLINGS = {"sm_80": "sm_80", "sm80": "sm_80", "80": "sm_80", "8.0": "sm_80",
                     "sm_90": "sm_90", "sm90": "sm_90", "90": "sm_90", "9.0": "sm_90"}
VECTOR_DTYPES = ("fp16", "bf16")  # dtypes whose K/V loads must all be 16-byte


def parse_target(target) -> str:
    """``"sm_80"``, ``"sm80"``, ``"80"``, ``80`` (and the same for 90) -> ``"sm_80"`` / ``"sm_90"``."""
    name = _TARGET_SPELLINGS.get(str(target).strip().lower())
    if name is None:
        raise ValueError(f"target={target!r} is not supported; use sm_80 or sm_90")
    return name


@dataclass(frozen=True)
class KernelAudit:
    """What one compiled kernel of a variant uses. Load maps are ``{width_bits: count}``."""

    name: str
    registers: int
    spill_bytes: int  # static bytes of spill stores (STL) in the SASS
    spill_load_bytes: int  # static bytes of spill reloads (LDL)
    stack_bytes: int
    local_bytes: int
    shared_bytes: int  # shared memory the launch requests (Triton metadata)
    kv_load_bits: dict
    other_load_bits: dict
    sass_load_bits: dict  # every global load in the SASS, by width
    consistent: bool  # every PTX K/V load width is matched by SASS global loads
    num_warps: int
    num_stages: int
    compile_seconds: float


@dataclass(frozen=True)
class AuditResult:
    """The audit of one variant on one target; totals over its kernels (decode or partial+merge)."""

    variant: str
    dtype: str
    target: str
    kernels: tuple
    compile_seconds: float
    triton_version: str = ""

    @property
    def registers(self) -> int:
        return max(k.registers for k in self.kernels)

    @property
    def spill_bytes(self) -> int:
        return sum(k.spill_bytes for k in self.kernels)

    @property
    def shared_bytes(self) -> int:
        return max(k.shared_bytes for k in self.kernels)

    @property
    def kv_load_bits(self) -> dict:
        return _sum_counts(k.kv_load_bits for k in self.kernels)

    @property
    def other_load_bits(self) -> dict:
        return _sum_counts(k.other_load_bits for k in self.kernels)

    @property
    def kv_128_share(self) -> float:
        """Share of K/V loads that are 16 bytes wide (0.0 when no K/V load was found)."""
        total = sum(self.kv_load_bits.values())
        return self.kv_load_bits.get(128, 0) / total if total else 0.0

    def to_dict(self) -> dict:
        """JSON-ready dict with the keys of ``kgen inspect --json`` (widths as string keys)."""
        return {
            "variant": self.variant, "target": self.target, "dtype": self.dtype,
            "registers": self.registers, "spill_bytes": self.spill_bytes,
            "shared_bytes": self.shared_bytes,
            "kv_load_bits": _json_counts(self.kv_load_bits),
            "other_load_bits": _json_counts(self.other_load_bits),
            "kv_128_share": round(self.kv_128_share, 4),
            "passes": passes(self), "failures": failures(self),
            "compile_seconds": round(self.compile_seconds, 3), "triton_version": self.triton_version,
            "kernels": [{**asdict(k), "kv_load_bits": _json_counts(k.kv_load_bits),
                         "other_load_bits": _json_counts(k.other_load_bits),
                         "sass_load_bits": _json_counts(k.sass_load_bits),
                         "compile_seconds": round(k.compile_seconds, 3)} for k in self.kernels],
        }

    def to_json(self, indent=None) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: dict) -> "AuditResult":
        """Inverse of :meth:`to_dict` (used to pass results out of the worker process)."""
        names = {f.name for f in fields(KernelAudit)}
        kernels = tuple(
            KernelAudit(**{k: ({int(b): n for b, n in v.items()} if k.endswith("_bits") else v)
                           for k, v in kernel.items() if k in names})
            for kernel in data["kernels"])
        return cls(variant=data["variant"], dtype=data["dtype"], target=data["target"],
                   kernels=kernels, compile_seconds=data["compile_seconds"],
                   triton_version=data.get("triton_version", ""))


def _sum_counts(maps) -> dict:
    total = Counter()
    for m in maps:
        total.update(m)
    return dict(sorted(total.items(), reverse=True))


def _json_counts(counts: dict) -> dict:
    return {str(bits): n for bits, n in sorted(counts.items(), reverse=True)}


def failures(result: AuditResult, *, vector_dtypes=VECTOR_DTYPES) -> list[str]:
    """Why a variant fails the audit (empty when it passes).

    Rules: nothing spills (no STL, no local memory); K/V loads were found in the binary; the PTX
    and SASS widths agree; for ``vector_dtypes`` every K/V load is 16 bytes (128 bits).
    """
    out = []
    for k in result.kernels:
        if k.spill_bytes or k.local_bytes:
            out.append(f"{k.name} spills ({k.spill_bytes} B spill stores, {k.local_bytes} B local)")
        if not k.consistent:
            out.append(f"{k.name}: PTX K/V load widths {k.kv_load_bits} not all found in SASS "
                       f"global loads {k.sass_load_bits}")
    kv = result.kv_load_bits
    if not kv:
        out.append("no K/V load found in any kernel")
    elif result.dtype in vector_dtypes and set(kv) != {128}:
        out.append(f"{result.dtype} K/V loads are not all 16-byte: {_json_counts(kv)} (bits: count)")
    return out


def passes(result: AuditResult, *, vector_dtypes=VECTOR_DTYPES) -> bool:
    """True when :func:`failures` is empty: the tuner's pruning step (compile errors raise)."""
    return not failures(result, vector_dtypes=vector_dtypes)


# ---- the public entry points ---------------------------------------------------------------------
_CACHE: dict = {}


_WORKER = None
_LOCK, _WORKER_LOCK = threading.Lock(), threading.Lock()


def _audit_uncached(config: VariantConfig, target: str) -> AuditResult:
    """Audit here when Triton can compile in this process, else in the shared child process."""
    from kgen.audit_compile import AuditWorker, audit_here, can_compile_in_process

    global _WORKER
    if can_compile_in_process():
        return audit_here(config, target)
    with _LOCK:
        if _WORKER is None:
            _WORKER = AuditWorker()
            atexit.register(_WORKER.close)
    with _WORKER_LOCK:
        return _WORKER.audit(config, target)


def audit_variant(config: VariantConfig, target: str = "sm_90") -> AuditResult:
    """Compile ``config`` for ``target`` (``sm_80`` / ``sm_90``) without a GPU and audit it.

    Parameters
    ----------
    config : VariantConfig
        The variant; its module is rendered with :func:`kgen.render.write_source`.
    target : str
        ``sm_80`` or ``sm_90`` (``80``, ``sm80`` ... accepted).

    Returns
    -------
    AuditResult
        Registers, spill bytes, shared memory and K/V load widths, per kernel and in total. Cached
        per process by ``(config, target)``. A failed compile raises RuntimeError or Triton's
        CompilationError (the tuner prunes on it). In a ``TRITON_INTERPRET=1`` process the
        compile runs in a child process (:class:`kgen.audit_compile.AuditWorker`).
    """
    if not isinstance(config, VariantConfig):
        raise ValueError(f"config={config!r} is not a VariantConfig")
    target = parse_target(target)
    cache_key = (config, target)
    if cache_key not in _CACHE:
        _CACHE[cache_key] = _audit_uncached(config, target)
    return _CACHE[cache_key]


def audit_many(configs, targets=("sm_80", "sm_90"), *, jobs: int = 1):
    """Audit every (config, target) pair, ``jobs`` child processes at a time.

    Yields
    ------
    (VariantConfig, str, AuditResult or Exception)
        In input order (configs outer, targets inner); a failed compile gives its exception.
    """
    from kgen.audit_compile import AuditWorker

    pairs = [(c, parse_target(t)) for c in configs for t in targets]
    if jobs <= 1:
        for config, target in pairs:
            yield config, target, _try(audit_variant, config, target)
        return
    workers = [AuditWorker() for _ in range(jobs)]
    free = list(workers)
    lock = threading.Lock()

    def run(pair):
        config, target = pair
        if (config, target) in _CACHE:
            return config, target, _CACHE[(config, target)]
        with lock:
            worker = free.pop()
        try:
            result = _try(worker.audit, config, target)
        finally:
            with lock:
                free.append(worker)
        if isinstance(result, AuditResult):
            _CACHE[(config, target)] = result
        return config, target, result

    try:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            yield from pool.map(run, pairs)
    finally:
        for worker in workers:
            worker.close()


def _try(func, *args):
    try:
        return func(*args)
    except Exception as exc:  # noqa: BLE001 - a failed compile is a result of the sweep
        return exc
