"""Worker processes of ``kgen tune --workers K``, and how interrupts reach them.

Each worker is a fresh (spawned) process running the same body on the same storage; a signal
stops it at a safe point (:mod:`kgen.tune.interrupts`). On Ctrl-C or SIGTERM the parent tells
every live worker to stop (SIGTERM), waits a bounded time for them to queue their interrupted
candidate again and exit, and kills what is left; it never blocks on a pool that waits for tasks
which will not finish. A worker stopped on its own (a signal sent to it alone) is reported and
its trial recovered by the others; one that fails with an error fails the run.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import time

from kgen.tune import interrupts

STOP_TIMEOUT_S = 20.0


def _worker_main(target, args) -> None:
    interrupts.install()
    try:
        target(*args)
    except KeyboardInterrupt:
        sys.exit(130)


def stop_workers(procs, timeout_s: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM every live worker, wait up to ``timeout_s`` for all, SIGKILL the rest."""
    for proc in procs:
        if proc.is_alive():
            try:
                os.kill(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + timeout_s
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
    for proc in procs:
        if proc.is_alive():
            proc.kill()
            proc.join()


def run_workers(target, args: tuple, count: int, poll=None, notify=None) -> int:
    """Run ``target(*args)`` in ``count`` spawned processes until all end; returns how many were
    stopped by a signal sent to them alone (interrupted or killed).

    Parameters
    ----------
    target : callable
        A module-level function (it is pickled by name).
    args : tuple
        Picklable arguments.
    count : int
        Number of processes.
    poll : callable or None
        Called about twice a second while they run (progress).
    notify : callable or None
        ``notify(message)`` for a worker that died by a signal.

    Raises
    ------
    KeyboardInterrupt
        After stopping the workers, when this process was interrupted.
    RuntimeError
        When a worker ended with an error (its traceback is on stderr).
    """
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_worker_main, args=(target, args), name=f"kgen-tune-worker-{i}")
             for i in range(count)]
    try:
        for proc in procs:
            proc.start()
        while any(proc.is_alive() for proc in procs):
            with interrupts.interruptible():
                multiprocessing.connection.wait([p.sentinel for p in procs if p.is_alive()], 0.5)
            if poll is not None:
                poll()
    except KeyboardInterrupt:
        stop_workers(procs)  # (a second signal does not cut this short: kgen.tune.interrupts)
        raise
    failed = [p for p in procs if p.exitcode not in (0, 130) and p.exitcode > 0]
    stopped = 0
    for proc in procs:
        if proc.exitcode != 130 and proc.exitcode >= 0:
            continue
        stopped += 1
        if notify is not None:
            how = ("was interrupted" if proc.exitcode == 130
                   else f"was killed by {signal.Signals(-proc.exitcode).name}")
            notify(f"worker {proc.name} (pid {proc.pid}) {how}; its unfinished trial was "
                   f"queued again for the other workers (or the next --resume)")
    if failed:
        raise RuntimeError(", ".join(f"worker {p.name} exited with code {p.exitcode}"
                                     for p in failed) + " (its error is above)")
    return stopped
