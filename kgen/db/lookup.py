"""Which tuned config to use for a (GPU, workload), with logged fallbacks.

Order tried (the first that gives a config wins):

1. ``exact``      -- the workload's own entry, tuned under this triton version;
2. ``nearest``    -- the nearest tuned (batch, context) bucket in log2 distance with the same
                     dtype/head dim/block size/group size/KV dtype/features, inside the tuned
                     range on both axes (a plain record never serves a feature workload);
3. ``other-triton`` -- 1 or 2 among entries of the same GPU tuned under another triton version;
4. ``family``     -- 1 or 2 on another GPU of the same family (h200 for h100 ...);
5. ``heuristic``  -- :func:`kgen.space.default_config`.

Only entries measured against the current kernel templates (or vindicated by a re-measure under
them, :mod:`kgen.db.stale`) take part; one that would have been used otherwise is logged once with
why it was not. Each fallback is logged once (logger ``kgen.db``) with what was used and why. A
corrupted, truncated or future-schema file is skipped with a warning, never a crash. The default
database reads the user's records over the shipped ones (:mod:`kgen.db.tables`). Standard library
only.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass

from kgen.db.schema import _package_version, entry_config
from kgen.db.store import BEST_FILE
from kgen.db.tables import LayeredTables, _logged, log_once  # noqa: F401 (re-exported)
from kgen.device import family_or_none, normalize_gpu_name
from kgen.shape import AttentionShape
from kgen.families import default_variant
from kgen.workload import Workload, head_key, log2_distance


@functools.lru_cache(maxsize=1)
def triton_version() -> str | None:
    return _package_version("triton")


@dataclass(frozen=True)
class LookupResult:
    """What a lookup chose: ``config``, and ``source``/``reason`` saying why."""

    config: object  # a VariantConfig or an AttentionVariantConfig
    source: str  # exact | nearest | other-triton | family | heuristic
    reason: str
    workload: Workload
    entry_key: str | None = None
    path: str | None = None
    entry: dict | None = None


class DbReader:
    """Reads a database's best tables (:class:`kgen.db.tables.LayeredTables`) and answers lookups.

    Parameters
    ----------
    db_dir : path or None
        Database folder; None means the default database (the user's records over the
        shipped ones, :func:`kgen.paths.db_layers`).
    """

    def __init__(self, db_dir=None) -> None:
        self.tables = LayeredTables(db_dir)
        self.db_dir = self.tables.root
        self.errors = self.tables.errors

    def table(self, gpu: str):
        """The GPU's merged table (:class:`kgen.db.tables.GpuTable`), or None if it has none."""
        return self.tables.get(gpu)

    def preferred_block_size(self, gpu: str, shape: AttentionShape) -> int | None:
        """The block size recorded as fastest by current entries for ``shape``'s dtype, head dim,
        KV dtype and features on ``gpu`` (records of another KV dtype or feature set never
        count), or None if not tuned."""
        table = self.table(normalize_gpu_name(gpu))
        if not table:
            return None
        rec = table.block_size_defaults.get(head_key(shape))
        return int(rec["block_size"]) if rec else None

    def family_gpus(self, gpu: str) -> list[str]:
        family = family_or_none(gpu)
        if family is None:
            return []
        return [name for name in self.tables.gpus()
                if name != gpu and family_or_none(name) == family]

    # ---- the lookup -----------------------------------------------------------------------
    def lookup(self, gpu: str, shape: AttentionShape, *, num_seqs: int | None,
               max_context: int | None, max_query_len: int = 1,
               kernel: str | None = None) -> LookupResult:
        """The config to use for one step of a layer of ``shape`` (its block size set) on ``gpu``
        (see the module docstring).

        ``num_seqs`` / ``max_context`` of None mean "the middle of the tuned range" (used by
        ``kgen emit --gpu`` when no step size is given). ``max_query_len`` is the most query
        tokens of one sequence in the step (1: decode). ``kernel`` restricts the records to one
        family (``decode`` / ``attention``); None takes either (for a decode step the faster of
        the two families' records of its bucket). Only records of the shape's KV dtype and
        feature set are used.
        """
        gpu = normalize_gpu_name(gpu)
        if num_seqs is None or max_context is None:
            num_seqs, max_context = self._middle(gpu, shape, num_seqs, max_context)
        asked = Workload.for_step(gpu, shape, num_seqs=num_seqs, max_context=max_context,
                                  max_query_len=max_query_len, kernel=kernel)
        here = triton_version()
        table = self.table(gpu)
        candidates = _matching(table, asked.shape, kernel)
        held = self._held_back(table, asked, candidates, kernel)
        same = [c for c in candidates if c[1]["provenance"].get("triton") == here]
        found = _choose(same, asked)
        if found:
            source = "exact" if _bucket(found) == _bucket(asked) else "nearest"
            return self._result(found, asked, gpu, source)
        found = _choose([c for c in candidates if c not in same], asked)
        if found:
            return self._result(found, asked, gpu, "other-triton", here=here)
        for other in self.family_gpus(gpu):
            other_table = self.table(other)
            matching = _matching(other_table, asked.shape, kernel)
            held = held or self._held_back(other_table, asked, matching, kernel)
            found = _choose(matching, asked)
            if found:
                return self._result(found, asked, other, "family")
        config = default_variant(asked)
        why = (f"its best table is unusable: {self.errors[gpu]}" if table is None and gpu in self.errors
               else "no database for this GPU" if table is None else
               f"no current tuned entry in range ({held} held back: measured against other "
               f"kernel templates or another default)" if held else "no tuned entry in range")
        reason = f"{asked.key}: {why} ({self.db_dir / gpu}); using the heuristic default {config.key}"
        log_once(logging.INFO, f"kgen.db lookup: {reason}")
        return LookupResult(config=config, source="heuristic", reason=reason, workload=asked)

    def _held_back(self, table, asked: Workload, current: list, kernel: str | None) -> str | None:
        """The stale entry a lookup would have chosen among all of ``table``'s entries, logged
        once with why it is not served; None when a current one would have been chosen anyway."""
        if table is None or not table.stale:
            return None
        held = GpuTableView(table.held)
        stale = _matching(held, asked.shape, kernel)
        found = _choose(current + stale, asked)
        if found is None or found[0] not in table.stale:
            return None
        key = found[0]
        log_once(logging.WARNING, f"kgen.db lookup: {asked.key}: entry {key} "
                                  f"({table.paths[key]}) is not served: {table.stale[key]}")
        return key

    def _middle(self, gpu: str, shape: AttentionShape, num_seqs, max_context) -> tuple[int, int]:
        """Fill a missing batch / context with the middle (log2) of the tuned buckets of the
        shape on this GPU or its family (1 and 4096 when nothing is tuned)."""
        entries = _matching(self.table(gpu), shape)
        for other in self.family_gpus(gpu) if not entries else ():
            entries = entries or _matching(self.table(other), shape)
        if num_seqs is None:
            num_seqs = _middle([e["workload"]["batch"] for _, e in entries]) if entries else 1
        if max_context is None:
            max_context = _middle([e["workload"]["context"] for _, e in entries]) if entries else 4096
        return num_seqs, max_context

    def _result(self, found, asked: Workload, gpu: str, source: str, here=None) -> LookupResult:
        key, entry = found
        config = entry_config(entry)
        path = self.table(gpu).paths.get(key, str(self.db_dir / gpu / BEST_FILE))
        reason = {
            "exact": f"{asked.key}: exact entry",
            "nearest": f"{asked.key}: nearest tuned bucket {key}",
            "other-triton": f"{asked.key}: entry {key} was tuned under triton "
                            f"{entry['provenance'].get('triton')}, this is triton {here}",
            "family": f"{asked.key}: no entry for {asked.gpu}; using {key} from the same family",
        }[source] + f" -> {config.key} ({path})"
        level = logging.WARNING if source in ("other-triton", "family") else logging.INFO
        if source != "exact":
            log_once(level, f"kgen.db lookup fallback ({source}): {reason}")
        return LookupResult(config=config, source=source, reason=reason, workload=asked,
                            entry_key=key, path=path, entry=entry)


@dataclass
class GpuTableView:
    """A bare ``entries`` dict seen as a table (what :func:`_matching` reads)."""

    entries: dict


def _matching(table, shape: AttentionShape, kernel: str | None = None) -> list[tuple[str, dict]]:
    """Served entries of ``table`` (a GpuTable) of this :attr:`Workload.shape` (dtype, head dim,
    block size, group size, KV dtype, features), of family ``kernel`` (None: either)."""
    if not table:
        return []
    found = []
    for key, entry in table.entries.items():
        w = Workload.from_dict(entry["workload"])
        if w.shape == shape and kernel in (None, w.kernel):
            found.append((key, entry))
    return found


def _bucket(item) -> tuple:
    """(batch, context, query length) of a candidate ``(key, entry)`` or of a Workload."""
    w = item.to_dict() if isinstance(item, Workload) else item[1]["workload"]
    return w["batch"], w["context"], w.get("query_len", 1)


def _choose(candidates, asked: Workload):
    """The candidate nearest in log2 (batch, context, query length) if ``asked`` is inside the
    tuned range on each axis. Decode steps (query length 1) are served only by decode records,
    longer queries only by records of longer queries: a decode kernel cannot run a prefill."""
    candidates = [c for c in candidates if (c[1]["workload"].get("query_len", 1) == 1) == asked.decode]
    if not candidates:
        return None
    for axis in ("batch", "context", "query_len"):
        values = [c[1]["workload"].get(axis, 1) for c in candidates]
        if not min(values) <= getattr(asked, axis) <= max(values):
            return None

    def distance(item):  # nearest bucket; in one bucket the faster record (either family)
        w = item[1]["workload"]
        return (log2_distance(w["batch"], asked.batch) + log2_distance(w["context"], asked.context)
                + log2_distance(w.get("query_len", 1), asked.query_len),
                -w["context"], -w["batch"], item[1]["time_ms"], item[0])

    return min(candidates, key=distance)


def _middle(values: list[int]) -> int:
    """The power of two in the log2 middle of ``values``."""
    return 2 ** round((math.log2(min(values)) + math.log2(max(values))) / 2)


# ---- module-level convenience (one reader per database root) ----------------------------------
@functools.lru_cache(maxsize=8)
def _reader(db_dir: str | None) -> DbReader:
    return DbReader(db_dir)


def lookup(gpu: str, shape: AttentionShape, *, db_dir=None, num_seqs: int | None = None,
           max_context: int | None = None, max_query_len: int = 1,
           kernel: str | None = None) -> LookupResult:
    """:meth:`DbReader.lookup` through a cached reader of ``db_dir``."""
    return _reader(None if db_dir is None else str(db_dir)).lookup(
        gpu, shape, num_seqs=num_seqs, max_context=max_context, max_query_len=max_query_len,
        kernel=kernel)
