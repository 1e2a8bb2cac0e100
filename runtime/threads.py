"""torch's intra-op thread count while ``generate()`` runs: a fixed, documented default.

torch picks its thread count at start-up from ``OMP_NUM_THREADS`` or the machine's cores, and
any library may change it later, so a generate() that left it alone would run with whatever the
process happened to hold.

Default: ``OMP_NUM_THREADS`` when the environment sets it (the operator's choice), else the
number of CPUs this process may run on (``os.sched_getaffinity``, which honours ``taskset`` and
cpusets): on a quiet machine every core helps (``bench/results/cpu_kernels.md``, its threads
table on 16 of the mixed requests, and ``bench/results/e2e_throughput.md``, 1 and 2 threads on all
64). The previous count is restored when generate() returns. An explicit
``num_threads`` above the CPUs this process may run on is refused (the extra threads can only
wait for a core). The native decode kernel and elementwise ops run on the same OpenMP threads
(:mod:`runtime.native_build`).

The hazard is OpenMP's default of spinning while it waits, on cores that other processes also
use: a partner thread that is switched out stalls every barrier the others spin at. On the
shared 2-core machine, runs with 2 threads took several times longer than with 1 while another
test suite was running. Starting Python with ``OMP_WAIT_POLICY=PASSIVE`` (threads sleep instead
of spinning) avoids that collapse but costs speed on a quiet machine (620 tok/s instead of 772 in
the same file), and ``num_threads=1`` avoids it too. The policy can only be chosen before torch
loads OpenMP, so it is left to the environment; :func:`wait_policy` reports it.
"""

from __future__ import annotations

import contextlib
import os

import torch


def wait_policy() -> str:
    """``OMP_WAIT_POLICY`` from the environment, lower case; ``"default"`` when unset (spin, then
    sleep)."""
    return os.environ.get("OMP_WAIT_POLICY", "default").lower()


def usable_cpus() -> int:
    """The CPUs this process may run on (``os.sched_getaffinity``; ``os.cpu_count`` elsewhere)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return max(1, os.cpu_count() or 1)


def default_num_threads() -> int:
    """``OMP_NUM_THREADS`` if set to a positive int, else the CPUs available to this process."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return usable_cpus()


@contextlib.contextmanager
def torch_threads(num_threads: int | None = None):
    """Run the body with ``num_threads`` torch intra-op threads (None: :func:`default_num_threads`)
    and restore the previous count after; yields the count used."""
    if num_threads is None:
        num_threads = default_num_threads()
    elif isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
        raise ValueError(f"num_threads={num_threads!r} must be a positive int or None")
    elif num_threads > usable_cpus():  # more threads than CPUs only wait on each other (see above)
        raise ValueError(f"num_threads={num_threads} exceeds the {usable_cpus()} CPUs this process may run on "
                         f"(os.sched_getaffinity); give at most {usable_cpus()}, or None for that")
    before = torch.get_num_threads()
    if num_threads != before:
        torch.set_num_threads(num_threads)
    try:
        yield num_threads
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
