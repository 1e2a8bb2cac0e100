"""Static audit of a variant without a GPU: compile for sm_80 / sm_90 and read the binary.

How it works
------------
1. The variant's rendered module is imported with ``TRITON_INTERPRET`` off, so its kernels are
   real ``JITFunction`` objects (:mod:`kgen.audit.capture`).
2. Its launcher is called on small random CPU tensors of a representative workload with each
   kernel global replaced by a recorder; every launch's ``(args, kwargs)`` is captured.
3. Each launch is specialized the way Triton's JIT would (:func:`kgen.audit.capture.specialize`)
   and compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``.
4. ``cuobjdump --dump-resource-usage --dump-sass`` (bundled with Triton) gives registers, stack,
   local memory, spill stores (``STL``) and global loads by width; Triton's metadata gives the
   shared memory the launch requests.

K/V loads are told apart from other loads by pointer provenance in the PTX
(:func:`kgen.audit.asm.ptx_loads`): a load is a K/V load when its address derives from the
``key_cache`` / ``value_cache`` argument. Block-table, query and workspace loads are "other" loads.
The PTX widths are cross-checked against the SASS (``consistent``): every K/V width counted in the
PTX must appear at least as often among the SASS global loads (``LDG.E.128``,
``LDGSTS.E.BYPASS.128``, ...), so a load ptxas split or narrowed fails the audit.
"""

from __future__ import annotations

import atexit
import threading
from concurrent.futures import ThreadPoolExecutor

from kgen.audit.compile import audit_here, can_compile_in_process
from kgen.audit.result import AuditResult, parse_target
from kgen.audit.worker import AuditWorker
from kgen.variant_attention import CONFIG_TYPES

_CACHE: dict = {}


_WORKER = None
_LOCK, _WORKER_LOCK = threading.Lock(), threading.Lock()


def _audit_uncached(config, target: str) -> AuditResult:
    """Audit here when Triton can compile in this process, else in the shared child process."""
    global _WORKER
    if can_compile_in_process():
        return audit_here(config, target)
    with _LOCK:
        if _WORKER is None:
            _WORKER = AuditWorker()
            atexit.register(_WORKER.close)
    with _WORKER_LOCK:
        return _WORKER.audit(config, target)


def audit_variant(config, target: str = "sm_90") -> AuditResult:
    """Compile ``config`` for ``target`` (``sm_80`` / ``sm_90``) without a GPU and audit it.

    Parameters
    ----------
    config : VariantConfig or AttentionVariantConfig
        The variant (either family); its module is rendered with
        :func:`kgen.render.write_source`.
    target : str
        ``sm_80`` or ``sm_90`` (``80``, ``sm80`` ... accepted).

    Returns
    -------
    AuditResult
        Registers, spill bytes, shared memory, K/V load widths and tensor-core instructions, per
        kernel and in total. Cached
        per process by ``(config, target)``. A failed compile raises RuntimeError or Triton's
        CompilationError (the tuner prunes on it). In a ``TRITON_INTERPRET=1`` process the
        compile runs in a child process (:class:`kgen.audit.worker.AuditWorker`).
    """
    if not isinstance(config, CONFIG_TYPES):
        raise ValueError(f"config={config!r} is not a VariantConfig or an AttentionVariantConfig")
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
