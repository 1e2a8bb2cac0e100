"""Reading and writing one GPU's folder of the tuning database.

Writes are atomic (temp file + ``os.replace``) and serialized across processes by a file lock
(``.kgen.lock`` in the GPU folder), so two tuning processes writing at once lose nothing: the
best table is re-read and merged under the lock, and trial lines are appended under it.

Reading uses the standard library only (the runtime's lookup path); the lock needs ``filelock``.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from collections import defaultdict
from pathlib import Path

from kgen.db.schema import (DbFormatError, SCHEMA_VERSION, check_best_table, check_trial_line,
                            new_best_table, provenance_id)
from kgen.db.tail import repair_tail
from kgen.workload import Workload

BEST_FILE = "best.json"
TRIALS_FILE = "trials.jsonl"
JOURNAL_FILE = "journal.log"
LOCK_FILE = ".kgen.lock"


def read_json(path: Path):
    """Parse a JSON file; a truncated or corrupted file raises DbFormatError naming it."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DbFormatError(f"{path}: not UTF-8 text ({exc.reason})") from None
    if not text.strip():
        raise DbFormatError(f"{path}: file is empty")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DbFormatError(f"{path}: corrupted or truncated JSON ({exc.msg} at line {exc.lineno}"
                            f" column {exc.colno})") from None


def load_best(path: Path) -> dict | None:
    """The validated best table at ``path``, or None if the file does not exist."""
    path = Path(path)
    if not path.exists():
        return None
    return check_best_table(read_json(path), str(path))


def read_trials(path: Path) -> list[dict]:
    """All validated lines of a trial log (``[]`` if missing); errors name file and line."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    with open(path, "rb") as handle:
        data = handle.read()
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    elif lines:
        raise DbFormatError(f"{path}:{len(lines)}: last line is truncated (no newline)")
    for number, raw in enumerate(lines, start=1):
        where = f"{path}:{number}"
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise DbFormatError(f"{where}: corrupted line (not JSON)") from None
        check_trial_line(record, where)
        out.append(record)
    return out


def atomic_write_json(path: Path, data) -> None:
    """Write JSON to ``path`` so that readers see the old or the new file, never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=1, sort_keys=True)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; the table is meant to be shared and committed
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def block_size_defaults(entries: dict) -> dict:
    """Per ``dtype-d<head_dim>`` (plus the KV dtype / feature suffixes of feature workloads, so
    plain and feature records never mix): the block size with the lowest geometric-mean best time.

    Only (group, batch, context) points tuned for every block size are compared, so that a block
    size tuned on easier workloads does not win by that; if there are none, all entries count.
    """
    by_head: dict[str, dict[int, dict[tuple, float]]] = defaultdict(lambda: defaultdict(dict))
    for entry in entries.values():
        w = Workload.from_dict(entry["workload"])
        point = (w.group_size, w.batch, w.context)
        by_head[w.head_key][w.block_size][point] = entry["time_ms"]
    out = {}
    for head_key, per_block in sorted(by_head.items()):
        common = set.intersection(*(set(points) for points in per_block.values()))
        geomeans = {}
        for block, points in per_block.items():
            use = [points[p] for p in (common or points)]
            geomeans[block] = math.exp(sum(math.log(t) for t in use) / len(use))
        best = min(geomeans, key=lambda b: (geomeans[b], b))
        out[head_key] = {"block_size": best, "workloads": len(common) if common else None,
                         "geomean_ms": {str(b): round(v, 6) for b, v in sorted(geomeans.items())}}
    return out


class TuningStore:
    """One GPU's folder ``<db_dir>/<gpu>/``: best table, trial log, Optuna journal, lock.

    Parameters
    ----------
    db_dir : path
        The database root (``tuning_db/``).
    gpu : str
        Normalized device name; the folder name.
    provenance : dict or None
        Provenance of the run writing through this store (needed to write).
    """

    def __init__(self, db_dir, gpu: str, provenance: dict | None = None) -> None:
        self.dir = Path(db_dir) / gpu
        self.gpu = gpu
        self.provenance = provenance
        self._provenance_written = False

    best_path = property(lambda self: self.dir / BEST_FILE)
    trials_path = property(lambda self: self.dir / TRIALS_FILE)
    journal_path = property(lambda self: self.dir / JOURNAL_FILE)

    def lock(self, timeout: float = 120.0):
        """An inter-process lock over this GPU folder (``with store.lock(): ...``)."""
        from filelock import FileLock

        self.dir.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.dir / LOCK_FILE), timeout=timeout)

    def _need_provenance(self) -> dict:
        if self.provenance is None:
            raise ValueError(f"writing to {self.dir} needs the provenance of the run")
        return self.provenance

    def append_trials(self, records: list[dict]) -> None:
        """Append trial records (dicts without ``type``/``provenance_id``) to the log."""
        prov = self._need_provenance()
        pid = provenance_id(prov)
        lines = []
        if not self._provenance_written:
            lines.append({"type": "provenance", "id": pid, "schema_version": SCHEMA_VERSION,
                          "provenance": prov})
        for record in records:
            line = {"type": "trial", "provenance_id": pid, **record}
            check_trial_line(line, f"{self.trials_path} (new record)")
            lines.append(line)
        payload = "".join(json.dumps(line, sort_keys=True) + "\n" for line in lines)
        with self.lock():
            repaired = repair_tail(self.trials_path)  # a kill mid-append left a half line
            if repaired:
                warnings.warn(repaired, RuntimeWarning, stacklevel=2)
            with open(self.trials_path, "ab") as handle:
                handle.write(payload.encode("utf-8"))
                handle.flush()
                os.fsync(handle.fileno())
        self._provenance_written = True

    def read_trials(self) -> list[dict]:
        return read_trials(self.trials_path)

    def load_best(self) -> dict | None:
        return load_best(self.best_path)

    def update_best(self, entries: dict[str, dict], *, keep_faster: bool = False) -> dict:
        """Merge entries (workload key -> entry) into the best table under the lock; returns it.

        ``keep_faster``: an entry already in the table that was measured the same way (same
        kernel templates, default and method) and is at least as fast stays; the new one is
        dropped (the trial log holds both measurements). Two runs finishing one workload then
        leave the faster winner, whichever writes last.
        """
        prov = self._need_provenance()
        with self.lock():
            table = self.load_best() or new_best_table(self.gpu, prov)
            if keep_faster:
                entries = {key: entry for key, entry in entries.items()
                           if not _faster_same_measure(table["entries"].get(key), entry)}
            table["entries"].update(entries)
            table["provenance"] = prov
            table["schema_version"] = SCHEMA_VERSION
            check_best_table(table, f"{self.best_path} (about to be written)")
            table["block_size_defaults"] = block_size_defaults(table["entries"])
            atomic_write_json(self.best_path, table)
        return table


    def remove_entries(self, keys) -> dict | None:
        """Drop entries (workload keys) from the best table under the lock; returns the table
        written (None when there is no table). The trial log keeps its history."""
        with self.lock():
            table = self.load_best()
            if table is None:
                return None
            for key in keys:
                table["entries"].pop(key, None)
            table["block_size_defaults"] = block_size_defaults(table["entries"])
            check_best_table(table, f"{self.best_path} (about to be written)")
            atomic_write_json(self.best_path, table)
        return table


def _faster_same_measure(old: dict | None, new: dict) -> bool:
    """Whether ``old`` (a recorded entry, or None) is at least as fast as ``new`` and measured
    comparably: same kernel templates, measuring method and default beaten."""
    if not isinstance(old, dict) or not isinstance(old.get("time_ms"), (int, float)):
        return False
    old_prov, new_prov = old.get("provenance") or {}, new.get("provenance") or {}
    same = all(old_prov.get(k) == new_prov.get(k) for k in ("template_hash", "method")) \
        and old.get("default_key") == new.get("default_key")
    return same and old["time_ms"] <= new["time_ms"]


def gpu_folders(db_dir) -> list[str]:
    """Names of the GPU folders in a database root (sorted; [] if the root does not exist)."""
    root = Path(db_dir)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))
