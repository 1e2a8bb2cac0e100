"""Validate every file of a tuning database (``kgen db check``), find and drop stale records
(``kgen db prune --stale``). Standard library only."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from kgen.db.schema import DbFormatError
from kgen.db.stale import stale_reasons
from kgen.db.store import (BEST_FILE, JOURNAL_FILE, TRIALS_FILE, TuningStore, gpu_folders,
                           load_best, read_trials)


@dataclass(frozen=True)
class FileReport:
    """One file's verdict: ``problem`` is None when it is valid; ``summary`` says what it holds."""

    path: str
    problem: str | None
    summary: str = ""


def check_journal(path: Path) -> str:
    """A light check of an Optuna journal: every line a JSON object ending with a newline."""
    data = Path(path).read_bytes()
    if data and not data.endswith(b"\n"):
        raise DbFormatError(f"{path}: last line is truncated (no newline)")
    lines = data.splitlines()
    for number, line in enumerate(lines, start=1):
        try:
            if not isinstance(json.loads(line), dict):
                raise ValueError
        except ValueError:
            raise DbFormatError(f"{path}:{number}: corrupted journal line (not a JSON object)") from None
    return f"{len(lines)} journal operations"


def require_db_dir(db_dir, what: str = "tuning database folder") -> Path:
    """``db_dir`` as a Path when it is a folder; else FileNotFoundError (missing) or ValueError
    (a file), naming ``what`` (where the path came from, e.g. ``$KGEN_DB``) and the path."""
    root = Path(db_dir)
    if root.is_dir():
        return root
    if root.exists():
        raise ValueError(f"{what} {root} is a file, not a folder")
    raise FileNotFoundError(f"{what} {root} does not exist")


def check_db(db_dir, what: str = "tuning database folder") -> list[FileReport]:
    """Check every GPU folder of ``db_dir``; one report per file found. ``what`` names the
    folder in the error when it is missing or a file (:func:`require_db_dir`)."""
    root = require_db_dir(db_dir, what)
    reports = []
    for gpu in gpu_folders(root):
        folder = root / gpu
        best = folder / BEST_FILE
        if best.exists():
            try:
                table = load_best(best)
                if table.get("gpu") != gpu:
                    raise DbFormatError(f"{best}: gpu={table.get('gpu')!r} but the folder is {gpu!r}")
                stale = [k for k in table["entries"] if not k.startswith(f"{gpu}-")]
                if stale:
                    raise DbFormatError(f"{best}: entries of another GPU: {', '.join(stale[:3])}")
                reports.append(FileReport(str(best), None, f"{len(table['entries'])} entries"))
            except (DbFormatError, OSError) as exc:
                reports.append(FileReport(str(best), str(exc)))
        else:
            reports.append(FileReport(str(best), f"{best}: missing (no compiled best table)"))
        trials = folder / TRIALS_FILE
        if trials.exists():
            try:
                records = read_trials(trials)
                kinds = sum(1 for r in records if r["type"] == "trial")
                reports.append(FileReport(str(trials), None, f"{kinds} trial records"))
            except (DbFormatError, OSError) as exc:
                reports.append(FileReport(str(trials), str(exc)))
        journal = folder / JOURNAL_FILE
        if journal.exists():
            try:
                reports.append(FileReport(str(journal), None, check_journal(journal)))
            except (DbFormatError, OSError) as exc:
                reports.append(FileReport(str(journal), str(exc)))
    return reports


@dataclass(frozen=True)
class StaleRecord:
    """A best-table entry that no longer describes this kgen's kernels (:mod:`kgen.db.stale`)."""

    path: str
    gpu: str
    key: str
    reasons: tuple


def stale_records(db_dir, gpu: str | None = None) -> list[StaleRecord]:
    """Every stale entry of the database folder ``db_dir`` (of one GPU, or all)."""
    root = Path(db_dir)
    out = []
    for name in [gpu] if gpu else gpu_folders(root):
        path = root / name / BEST_FILE
        try:
            table = load_best(path)
        except (DbFormatError, OSError):
            continue  # reported by check_db
        for key, entry in sorted((table or {"entries": {}})["entries"].items()):
            reasons = stale_reasons(entry)
            if reasons:
                out.append(StaleRecord(str(path), name, key, tuple(reasons)))
    return out


def prune_stale(db_dir, gpu: str | None = None, what: str = "tuning database folder") -> list[StaleRecord]:
    """Drop the stale entries of ``db_dir`` (of one GPU, or all); returns what was dropped. A
    missing folder, or a file, is an error as in :func:`check_db`."""
    dropped = stale_records(require_db_dir(db_dir, what), gpu)
    by_gpu: dict[str, list[str]] = {}
    for record in dropped:
        by_gpu.setdefault(record.gpu, []).append(record.key)
    for name, keys in by_gpu.items():
        TuningStore(db_dir, name).remove_entries(keys)
    return dropped
