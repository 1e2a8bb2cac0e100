"""Ctrl-C and SIGTERM in ``kgen tune``: stop at a safe point, never inside Optuna's bookkeeping.

Python raises KeyboardInterrupt between any two bytecodes. Raised while Optuna records a trial's
end (``study.tell``) it leaves the trial half-told and Optuna's own clean-up fails on top of it
(an ``UnboundLocalError`` traceback instead of an orderly stop). So once :func:`install` ran, a
signal only marks the run as interrupted; KeyboardInterrupt is raised at once only inside an
:func:`interruptible` section (a measurement, a wait), and otherwise at the next
:func:`checkpoint` (a trial's start, between trials, between workloads). Further signals are
ignored, so the clean-up after the first is not cut short by a second (Ctrl-C pressed twice, or a
terminal's Ctrl-C and the parent's SIGTERM reaching a worker together).

A checkpoint raises only once per signal: the clean-up after it (queueing the cut candidate
again, stopping workers) runs through later checkpoints undisturbed.

Without :func:`install` (kgen used as a library) nothing changes: Python's default applies and
the sections and checkpoints are no-ops.
"""

from __future__ import annotations

import contextlib
import signal


class _State:
    installed = False
    pending: str | None = None
    raised = False
    depth = 0


_state = _State()


def _handler(signum, _frame) -> None:
    # Later signals are dropped here rather than by switching to SIG_IGN: a signal already
    # delivered when the disposition changes would surface as "OSError: Signal N ignored due to
    # race condition" in whatever code runs next.
    if _state.pending is not None:
        return
    _state.pending = signal.Signals(signum).name
    if _state.depth > 0:
        _state.raised = True
        raise KeyboardInterrupt(_state.pending)


def install() -> tuple:
    """Route SIGINT and SIGTERM of this (main-thread) process through the safe points; returns
    the handlers it replaced (for :func:`uninstall`)."""
    _state.installed, _state.pending, _state.raised, _state.depth = True, None, False, 0
    return (signal.signal(signal.SIGINT, _handler), signal.signal(signal.SIGTERM, _handler))


def uninstall(previous: tuple) -> None:
    """Put back the handlers :func:`install` replaced."""
    _state.installed, _state.pending, _state.raised, _state.depth = False, None, False, 0
    signal.signal(signal.SIGINT, previous[0])
    signal.signal(signal.SIGTERM, previous[1])


def checkpoint() -> None:
    """Raise KeyboardInterrupt here if a signal arrived and has not been raised yet."""
    if _state.pending is not None and not _state.raised:
        _state.raised = True
        raise KeyboardInterrupt(_state.pending)


@contextlib.contextmanager
def interruptible():
    """A section a signal may cut at once (a measurement, a sleep)."""
    checkpoint()
    _state.depth += 1
    try:
        yield
    finally:
        _state.depth -= 1
