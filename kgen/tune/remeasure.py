"""``kgen db remeasure``: re-time records measured against other templates, on their GPU.

For each record of the GPU that lookup holds back (:func:`kgen.db.stale.not_current`), the
record's variant and the current default variant are measured with the tuning measurer (the same
audit, correctness check and timing as ``kgen tune``'s final re-measure) under the current
templates. The verdict goes into the entry as ``remeasure``; lookup serves the record again only
if it beat the default there. The entry is written to the database's writable folder (over a
shipped record of the same workload), and both times are appended to its trial log
(``phase`` ``remeasure-record`` / ``remeasure-default``).
"""

from __future__ import annotations

import datetime as _dt

from kgen.db.schema import entry_config, software_versions
from kgen.db.store import TuningStore
from kgen.db.tables import LayeredTables
from kgen.device import normalize_gpu_name
from kgen.paths import template_hash
from kgen.tune.measure import Measurer
from kgen.tune.search import default_variant
from kgen.tune.study import HOST
from kgen.workload import Workload


def remeasure_entry(entry: dict, measurer: Measurer) -> tuple[dict, list[dict]]:
    """The ``remeasure`` block for one entry and the trial-log records of its two timings."""
    workload = Workload.from_dict(entry["workload"])
    config = entry_config(entry)
    default = default_variant(workload)
    record = measurer.measure(config, workload)
    base = record if default == config else measurer.measure(default, workload)
    beats = record.ok and (default == config or not base.ok or record.time_ms <= base.time_ms)
    block = {"template_hash": template_hash(workload.kernel), **software_versions(),
             "time_ms": record.time_ms, "status": record.status, "reason": record.reason,
             "default_config_key": default.key, "default_time_ms": base.time_ms,
             "beats_default": bool(beats), "method": measurer.method, "host": HOST,
             "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    lines = [{"workload_key": workload.key, "config_key": cfg.key, "status": m.status,
              "time_ms": m.time_ms, "reason": m.reason, "study": workload.key,
              "phase": f"remeasure-{role}"}
             for role, cfg, m in (("record", config, record), ("default", default, base))]
    return block, lines


def remeasure_stale(db_dir, gpu: str, measurer: Measurer, provenance: dict,
                    keys=None) -> dict[str, dict]:
    """Re-measure the held-back records of ``gpu`` (all, or those in ``keys``).

    Returns workload key -> the entry written (with its ``remeasure`` block).
    """
    gpu = normalize_gpu_name(gpu)
    tables = LayeredTables(db_dir)
    table = tables.get(gpu)
    held = dict(table.held) if table else {}
    if keys is not None:
        unknown = sorted(set(keys) - set(held))
        if unknown:
            raise LookupError(f"not a held-back record of {gpu}: {', '.join(unknown)}")
        held = {key: held[key] for key in keys}
    store = TuningStore(tables.root, gpu, provenance)
    written = {}
    for key, entry in sorted(held.items()):
        block, lines = remeasure_entry(entry, measurer)
        store.append_trials(lines)
        written[key] = {**entry, "remeasure": block}
    if written:
        store.update_best(written)
    return written
