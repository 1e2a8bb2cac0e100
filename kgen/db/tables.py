"""The best tables a lookup reads: layered folders, cached while unchanged, stale entries held
back. Standard library only (the runtime's dispatch path).

A database may be several folders (:func:`kgen.paths.db_layers`): the user's records (``$KGEN_DB``
or the user data folder) over the records kgen ships. Per GPU the layers' entries are merged, the
upper layer winning per workload key. Each file is read once and kept while its size and mtime
stay the same (one ``stat`` per layer and call), so a running process sees what a tuning run
writes. A corrupted, truncated or future-schema file is skipped with one warning.

Only *current* entries are served (:func:`kgen.db.stale.not_current`); the others are kept aside
with the reason, which the lookup logs once when it would have used them. The block size
preference is recomputed from the served entries, so stale times do not choose it either.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from kgen.db.schema import DbFormatError
from kgen.db.stale import entry_family, not_current
from kgen.db.store import BEST_FILE, block_size_defaults, gpu_folders, load_best
from kgen.paths import db_layers, template_hash

log = logging.getLogger("kgen.db")
_logged: set = set()


def log_once(level: int, message: str) -> None:
    """Log ``message`` at ``level`` the first time it is seen in this process."""
    if message not in _logged:
        _logged.add(message)
        log.log(level, message)


def _stamp(path: Path):
    try:
        st = path.stat()
        return (st.st_size, st.st_mtime_ns)
    except OSError:
        return None


@dataclass
class GpuTable:
    """One GPU's merged table: served ``entries``, ``held`` back ones with the reason in
    ``stale`` (key -> reason), the file each came from (``paths``) and the
    ``block_size_defaults`` of the served ones."""

    entries: dict = field(default_factory=dict)
    held: dict = field(default_factory=dict)
    stale: dict = field(default_factory=dict)
    paths: dict = field(default_factory=dict)
    block_size_defaults: dict = field(default_factory=dict)


class LayeredTables:
    """The best tables of a database (one folder or several layers), per GPU.

    Parameters
    ----------
    db_dir : path or None
        Database folder; None (or the default folder) means the default layers.
    """

    def __init__(self, db_dir=None) -> None:
        self.layers = db_layers(db_dir)
        self.root = self.layers[0]
        # per family: templates do not change under a running process
        self.template_hashes = {family: template_hash(family) for family in ("decode", "attention")}
        self._cache: dict[str, tuple[tuple, GpuTable | None]] = {}
        self.errors: dict[str, str] = {}

    def gpus(self) -> list[str]:
        return sorted({name for layer in self.layers for name in gpu_folders(layer)})

    def _load(self, gpu: str, path: Path) -> dict | None:
        try:
            return load_best(path)
        except (DbFormatError, OSError) as exc:
            self.errors[gpu] = str(exc)
            message = f"tuning database file unusable, falling back: {exc}"
            if message not in _logged:
                warnings.warn(message, RuntimeWarning, stacklevel=4)
            log_once(logging.WARNING, message)
            return None

    def get(self, gpu: str) -> GpuTable | None:
        """The GPU's merged table, or None when no layer has a usable file for it."""
        paths = [layer / gpu / BEST_FILE for layer in self.layers]
        stamps = tuple(_stamp(p) for p in paths)
        cached = self._cache.get(gpu)
        if cached is not None and cached[0] == stamps:
            return cached[1]
        self.errors.pop(gpu, None)
        merged = None
        for path, stamp in reversed(list(zip(paths, stamps))):  # the lowest layer first
            table = self._load(gpu, path) if stamp is not None else None
            if table is None:
                continue
            merged = merged or GpuTable()
            for key, entry in table["entries"].items():
                reason = not_current(entry, self.template_hashes.get(entry_family(entry)))
                merged.paths[key] = str(path)
                for part in (merged.entries, merged.held, merged.stale):
                    part.pop(key, None)
                if reason is None:
                    merged.entries[key] = entry
                else:
                    merged.held[key], merged.stale[key] = entry, reason
        if merged is not None:
            merged.block_size_defaults = block_size_defaults(merged.entries)
        self._cache[gpu] = (stamps, merged)
        return merged
