"""Where the Optuna studies live: a journal file (one machine) or a relational database (a fleet).

:func:`open_storage` turns ``--storage`` (or the default journal path) into a :class:`TuneStorage`:
the Optuna storage plus the :mod:`claims <kgen.tune.claims>` that keep concurrent workers from
measuring one candidate twice.

* A **journal file** (:mod:`kgen.tune.journal`) is written under an ``flock`` the kernel releases
  when its holder dies, so no interruption leaves a lock that blocks the next run; a line cut
  short by a kill is repaired before the next append.
* A **database URL** (``postgresql://``, ``mysql://``, ``sqlite:///``) opens Optuna's
  ``RDBStorage`` with heartbeats, so the running trials of a killed member (on any machine) are
  failed after the grace period and their candidates queued again. Optuna creates its tables on
  first use; fleet members start together, so on PostgreSQL the creation runs under an advisory
  lock (elsewhere it is retried) instead of racing into ``IntegrityError ... studydirection``.
  Bad URLs end in one :class:`StorageError` line naming the URL (password hidden) and the problem.
"""

from __future__ import annotations

import contextlib
import inspect
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import optuna

from kgen.tune import DEFAULT_HEARTBEAT_S
from kgen.tune.claims import RdbClaims
from kgen.tune.journal import clear_stale_journal_lock, open_journal

__all__ = ["StorageError", "TuneStorage", "open_storage", "check_existing", "describe", "is_url",
           "clear_stale_journal_lock", "DEFAULT_HEARTBEAT_S"]
_SCHEMA_LOCK_ID = 0x6B67656E  # "kgen": the advisory lock serializing table creation


class StorageError(ValueError):
    """A ``--storage`` that cannot be used; the message names the URL and what is wrong."""


def is_url(location: str) -> bool:
    return "://" in str(location)


def describe(location: str) -> str:
    """The location for messages: a URL with its password replaced by ``***``."""
    location = str(location)
    if not is_url(location):
        return location
    try:
        import sqlalchemy

        return sqlalchemy.engine.make_url(location).render_as_string(hide_password=True)
    except Exception:  # not parseable: show it as given, minus anything after a password colon
        head, sep, rest = location.partition("://")
        if "@" in rest and ":" in rest.split("@", 1)[0]:
            user = rest.split("@", 1)[0].split(":", 1)[0]
            return f"{head}{sep}{user}:***@{rest.split('@', 1)[1]}"
        return location


@dataclass
class TuneStorage:
    """An opened storage: ``optuna`` goes to ``optuna.create_study``; ``claims`` guards
    candidates; ``grace_s`` is how long a silent running trial may stay before it counts as
    abandoned (None: no heartbeats, liveness is known only for this host's processes)."""

    optuna: object
    claims: object
    location: str
    grace_s: float | None = None


# ---- relational database -----------------------------------------------------------------------
def _first_line(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None) or exc
    text = str(orig).strip().splitlines()
    return text[0] if text else type(orig).__name__


def _with_installed_driver(parsed):
    """``postgresql://`` names no driver and SQLAlchemy picks one by its version (psycopg2 before
    2.1, psycopg after): use whichever of the two is installed."""
    import importlib.util

    if parsed.drivername != "postgresql":
        return parsed
    for module, driver in (("psycopg", "postgresql+psycopg"), ("psycopg2", "postgresql+psycopg2")):
        if importlib.util.find_spec(module) is not None:
            return parsed.set(drivername=driver)
    return parsed


def _check_url(url: str):
    """The parsed URL (its driver made explicit), or a StorageError saying what is wrong."""
    import sqlalchemy

    shown = describe(url)
    try:
        parsed = _with_installed_driver(sqlalchemy.engine.make_url(url))
    except Exception:
        raise StorageError(f"--storage {shown!r} is not a database URL (expected e.g. "
                           f"postgresql://user@host/db, sqlite:///path/to/file.db, or a journal "
                           f"file path)") from None
    try:
        parsed.get_dialect()
    except Exception:
        raise StorageError(f"--storage {shown!r}: unknown database kind {parsed.drivername!r} "
                           f"(use postgresql://, mysql:// or sqlite:///)") from None
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        database = parsed.database or ""
        if database in ("", ":memory:"):
            raise StorageError(f"--storage {shown!r}: an in-memory SQLite database cannot be "
                               f"shared; give a file, e.g. sqlite:///tune.db")
        folder = Path(database).expanduser().absolute().parent
        if not folder.is_dir():
            raise StorageError(f"--storage {shown!r}: the folder {folder} of the SQLite file "
                               f"does not exist")
    return parsed


@contextlib.contextmanager
def _schema_lock(parsed):
    """Serialize Optuna's table creation among processes starting together (PostgreSQL)."""
    if parsed.get_backend_name() != "postgresql":
        yield
        return
    import sqlalchemy

    engine = sqlalchemy.create_engine(parsed, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": _SCHEMA_LOCK_ID})
            conn.commit()
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"),
                             {"k": _SCHEMA_LOCK_ID})
                conn.commit()
    finally:
        engine.dispose()


# optuna >= 4.9 names it heartbeat_stale_trial_callback (the old name warns)
_STALE_CALLBACK = ("heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in
                   inspect.signature(optuna.storages.RDBStorage).parameters
                   else "failed_trial_callback")


def _open_journal(path: str) -> TuneStorage:
    try:
        storage, claims, path = open_journal(path)
    except OSError as exc:
        raise StorageError(f"journal {path}: {exc.strerror or exc}") from None
    return TuneStorage(storage, claims, path)


def _open_rdb(url: str, heartbeat_s: int, on_stale) -> TuneStorage:
    import sqlalchemy.exc as sa_exc

    shown = describe(url)
    parsed = _check_url(url)
    last = None
    for attempt in range(8):
        try:
            with _schema_lock(parsed), warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                storage = optuna.storages.RDBStorage(
                    parsed.render_as_string(hide_password=False), engine_kwargs={"pool_pre_ping": True},
                    heartbeat_interval=heartbeat_s, grace_period=3 * heartbeat_s,
                    **{_STALE_CALLBACK: on_stale})
                claims = RdbClaims(storage.engine)
            return TuneStorage(storage, claims, shown, grace_s=3 * heartbeat_s)
        except (ImportError, ModuleNotFoundError) as exc:
            cause = exc.__cause__ or exc
            hint = (" (pip install 'kgen[postgres]')" if parsed.get_backend_name() == "postgresql"
                    else "")
            raise StorageError(f"--storage {shown!r}: its database driver is not installed: "
                               f"{cause}{hint}") from None
        except (sa_exc.IntegrityError, sa_exc.ProgrammingError, sa_exc.InternalError) as exc:
            last = exc  # another process created the same table or type first: try again
        except sa_exc.OperationalError as exc:
            if "already exists" not in str(exc) and "locked" not in str(exc):
                raise StorageError(f"--storage {shown!r}: cannot open the database: "
                                   f"{_first_line(exc)}") from None
            last = exc
        except sa_exc.SQLAlchemyError as exc:
            raise StorageError(f"--storage {shown!r}: {_first_line(exc)}") from None
        time.sleep(random.uniform(0.05, 0.3) * (attempt + 1))
    raise StorageError(f"--storage {shown!r}: could not create Optuna's tables: "
                       f"{_first_line(last)}")


def check_existing(location) -> None:
    """Refuse, creating nothing, a ``location`` that holds no study storage yet (``kgen db
    import`` reads one and must never make one): a journal path that is not a file, an SQLite
    URL whose file does not exist (connecting would create it), or a database without Optuna's
    ``studies`` table (opening it would create the tables)."""
    location = str(location)
    if not is_url(location):
        if not Path(location).is_file():
            raise StorageError(f"--storage {location!r} is neither a database URL (those contain '://') nor an "
                               f"existing journal file; nothing was created")
        return
    import sqlalchemy

    shown, parsed = describe(location), _check_url(location)
    if parsed.get_backend_name() == "sqlite" and not Path(parsed.database).expanduser().is_file():
        raise StorageError(f"--storage {shown!r}: the SQLite file {parsed.database} does not exist; nothing "
                           f"was created")
    engine = sqlalchemy.create_engine(parsed, poolclass=sqlalchemy.pool.NullPool)
    try:
        has_studies = sqlalchemy.inspect(engine).has_table("studies")
    except ImportError as exc:
        raise StorageError(f"--storage {shown!r}: its database driver is not installed: {exc}") from None
    except sqlalchemy.exc.SQLAlchemyError as exc:
        raise StorageError(f"--storage {shown!r}: cannot open the database: {_first_line(exc)}") from None
    finally:
        engine.dispose()
    if not has_studies:
        raise StorageError(f"--storage {shown!r} holds no Optuna study storage (no 'studies' table); "
                           f"nothing was created")


# ---- the door ----------------------------------------------------------------------------------
def open_storage(location, *, heartbeat_s: int = DEFAULT_HEARTBEAT_S,
                 on_stale=None) -> TuneStorage:
    """Open ``location``: a database URL (contains ``://``) or a journal file path.

    Parameters
    ----------
    location : str or path
    heartbeat_s : int
        Database storages only: seconds between a running trial's heartbeats; a trial silent
        for three of them is failed (and ``on_stale(study, trial)`` called) by any member.
    on_stale : callable or None
        Called with each trial failed for a stale heartbeat (kgen queues its candidate again).

    Raises
    ------
    StorageError
        One line naming the location and what is wrong with it.
    """
    location = str(location)
    if is_url(location):
        if heartbeat_s is None or int(heartbeat_s) < 1:
            raise ValueError(f"heartbeat_s={heartbeat_s!r} must be a whole number of seconds >= 1")
        return _open_rdb(location, int(heartbeat_s), on_stale)
    return _open_journal(location)
