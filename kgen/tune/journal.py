"""The journal file storage (one machine): a lock no kill can leave behind, a cut tail repaired.

Optuna's default journal lock is a symlink, created and removed around each write. A process
killed while holding it (SIGTERM during ``kgen tune``) leaves it; with a relative ``--db`` the link
points nowhere, and Optuna's waiter, which stats the link's target to age it, spins forever
without a word. :class:`FlockLock` uses ``flock`` instead, which the kernel releases when its
holder dies. A symlink lock left by an older run is removed with a message
(:func:`clear_stale_journal_lock`), and a line cut short by a kill is repaired before the next
append (:class:`RepairingJournalBackend`, :mod:`kgen.db.tail`). Local file systems only: never
on NFS (use a database there).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
import warnings

import optuna

try:  # the lock's base class is not re-exported by optuna.storages.journal
    from optuna.storages.journal._file import BaseJournalFileLock
except ImportError:  # pragma: no cover - other optuna layouts
    BaseJournalFileLock = object

from kgen.db.tail import repair_tail
from kgen.tune.claims import FileClaims

LEGACY_LOCK_SUFFIX = ".lock"  # Optuna's JournalFileSymlinkLock
FLOCK_SUFFIX = ".flock"


class FlockLock(BaseJournalFileLock):
    """A journal lock the kernel releases when its holder dies (``flock`` on ``<journal>.flock``).

    Local file systems only (as the journal itself: never on NFS; use a database there).
    """

    def __init__(self, journal_path: str) -> None:
        self.path = str(journal_path) + FLOCK_SUFFIX
        self._fd: int | None = None

    def acquire(self) -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return True

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    @contextlib.contextmanager
    def held(self):
        self.acquire()
        try:
            yield
        finally:
            self.release()


class RepairingJournalBackend(optuna.storages.journal.JournalFileBackend):
    """Optuna's journal file backend with :class:`FlockLock` and a cut last line repaired before
    appending (a half-written operation would otherwise swallow the next one)."""

    def __init__(self, path: str) -> None:
        self.flock = FlockLock(path)
        super().__init__(path, lock_obj=self.flock)

    def append_logs(self, logs) -> None:
        with self.flock.held():
            message = repair_tail(self._file_path)
            if message:
                warnings.warn(message, RuntimeWarning, stacklevel=2)
            text = "".join(json.dumps(log, separators=(",", ":"))
                           + "\n" for log in logs)
            with open(self._file_path, "ab") as handle:
                handle.write(text.encode("utf-8"))
                handle.flush()
                os.fsync(handle.fileno())


def clear_stale_journal_lock(journal_path, wait_s: float = 2.0) -> str | None:
    """Remove an Optuna symlink lock (``<journal>.lock``) that no writer holds.

    kgen's own writers never create it (they use :class:`FlockLock`); one left behind is from an
    interrupted older run. A live Optuna writer holds it for milliseconds, so a lock still there
    after ``wait_s`` is stale. Returns a message naming it (and where its link pointed) when it
    was removed, else None.
    """
    lock = str(journal_path) + LEGACY_LOCK_SUFFIX
    deadline = time.monotonic() + wait_s
    while os.path.lexists(lock):
        if time.monotonic() >= deadline:
            try:
                target = os.readlink(lock)
                dangling = not os.path.exists(os.path.join(os.path.dirname(lock), target))
                what = f" (a link to {target!r}{', which does not exist' if dangling else ''})"
            except OSError:
                what = ""
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lock)
            return f"removed a stale Optuna journal lock {lock}{what} left by an interrupted run"
        time.sleep(0.05)
    return None


def open_journal(path: str):
    """(Optuna storage, claims, absolute path) of the journal file at ``path`` (its folder is
    made). The path is made absolute: nothing below depends on the working directory."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    backend = RepairingJournalBackend(path)
    return optuna.storages.JournalStorage(backend), FileClaims(path + ".claims"), path
