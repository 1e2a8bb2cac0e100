"""torch's intra-op thread count while ``generate()`` runs: a fixed, documented default.

torch picks its thread count at start-up from ``OMP_NUM_THREADS`` or the machine's cores, and
any library may change it later, so a generate() that left it alone would run with whatever the
process happened to hold.

Default: ``OMP_NUM_THREADS`` when the environment sets it (the operator's choice), else the
number of CPUs this process may run on (``os.sched_getaffinity``, which honours ``taskset`` and
cpusets): on an idle machine every core helps (the projections are ~55% of the time and scale
with threads). The previous count is restored when generate() returns.

The hazard is OpenMP's default of spinning while it waits: with other work on the same cores, a
thread that is switched out stalls every barrier its partners spin at. On the shared 2-core
machine (load average 4.5) the mixed benchmark ran at 165 tok/s with 2 spinning threads, 426
with 1 thread and 435 with 2 threads under ``OMP_WAIT_POLICY=PASSIVE``; ``import runtime`` sets
that policy when it comes before torch (:mod:`runtime`), and :func:`wait_policy` reports it.
"""

from __future__ import annotations

import contextlib
import os

import torch


def wait_policy() -> str:
    """OpenMP's wait policy as :mod:`runtime` found or set it on import: ``"passive"``, or
    ``"active"`` (spin, then sleep: also when torch was imported first without the variable)."""
    import runtime

    return runtime.OMP_WAIT_POLICY


def default_num_threads() -> int:
    """``OMP_NUM_THREADS`` if set to a positive int, else the CPUs available to this process."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return max(1, os.cpu_count() or 1)


@contextlib.contextmanager
def torch_threads(num_threads: int | None = None):
    """Run the body with ``num_threads`` torch intra-op threads (None: :func:`default_num_threads`)
    and restore the previous count after; yields the count used."""
    if num_threads is None:
        num_threads = default_num_threads()
    if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
        raise ValueError(f"num_threads={num_threads!r} must be a positive int or None")
    before = torch.get_num_threads()
    if num_threads != before:
        torch.set_num_threads(num_threads)
    try:
        yield num_threads
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
