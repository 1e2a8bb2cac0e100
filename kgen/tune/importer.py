"""``kgen db import``: a shared study storage -> the usual records (``best.json``, ``trials.jsonl``).

A fleet tunes into one database; each member's own ``--db`` holds only what it measured. Import
reads every study of a GPU (study name = workload key ``<gpu>-...``) and writes, per workload:

* one ``trials.jsonl`` line per measured trial (copies and static prunes are not measurements),
  under the provenance of the worker that measured it (every worker registers its provenance in
  the study), each worker's provenance line once; a trial already imported is not written again;
* the ``best.json`` entry of the study's best trial: its variant and time, the time of the
  default variant measured in the same study (the warm start queues it first), the trial count,
  and a provenance that is the best trial's worker's plus ``hosts`` (every host that measured),
  ``triton_versions``, ``driver_versions`` and ``imported_from`` (the URL, password hidden).

Times are the study's own (no re-measure: the importing machine need not have the GPU). Studies
with trials still running or queued are imported as they are, and reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import optuna

from kgen.db.schema import make_entry, provenance_id
from kgen.db.store import TuningStore
from kgen.device import normalize_gpu_name
from kgen.tune import study as st
from kgen.tune.search import default_variant
from kgen.tune.storage import check_existing, describe, open_storage
from kgen.variant_attention import config_from_key
from kgen.workload import Workload


@dataclass
class ImportReport:
    """What an import wrote: workload key -> entry written; notes on what was left."""

    entries: dict = field(default_factory=dict)
    trial_lines: int = 0
    notes: list = field(default_factory=list)


def _study_names(storage, gpu: str) -> list[str]:
    names = []
    for summary in optuna.study.get_all_study_summaries(storage.optuna, include_best_trial=False):
        try:
            workload = Workload.from_key(summary.study_name)
        except ValueError:
            continue
        if workload.gpu == gpu:
            names.append(summary.study_name)
    return sorted(names)


def _worker_provenance(workers: dict, trial, fallback: dict | None) -> dict | None:
    """The provenance the trial's worker registered; ``workers`` is :func:`st.workers` of the
    study (read once per study: one round trip on a database)."""
    info = st.trial_info(trial)
    registered = workers.get((info.get("host"), info.get("pid")), {})
    return registered.get("provenance") or fallback


def _already_logged(store: TuningStore) -> set:
    return {(r.get("study"), r.get("trial"), r.get("provenance_id"))
            for r in store.read_trials() if r.get("type") == "trial"}


def import_study(storage, name: str, gpu: str, db_dir, report: ImportReport,
                 logged: set | None = None) -> None:
    """Import one study. ``logged`` is :func:`_already_logged` of the GPU's ``trials.jsonl``
    (None: read it here); the trials written are added to it."""
    study = optuna.load_study(study_name=name, storage=storage.optuna)
    workload = Workload.from_key(name)
    measured = st.budget_trials(study)
    # read after the trials: a worker registers before it creates any trial
    workers = st.workers(study)
    open_count = len(study.get_trials(deepcopy=False, states=(st.TrialState.RUNNING,
                                                                st.TrialState.WAITING)))
    if open_count:
        report.notes.append(f"{name}: {open_count} trial(s) still running or queued; "
                            f"import again when the study is done")
    provs = {}
    for trial in measured:
        prov = _worker_provenance(workers, trial, None)
        if prov is None:
            report.notes.append(f"{name}: trial {trial.number} has no registered worker "
                                f"provenance; skipped")
            continue
        provs.setdefault(provenance_id(prov), (prov, []))[1].append(trial)
    if logged is None:
        logged = _already_logged(TuningStore(db_dir, gpu))
    for pid, (prov, trials) in provs.items():
        lines = []
        for trial in trials:
            if (name, trial.number, pid) in logged:
                continue
            info, outcome = st.trial_info(trial), st.trial_outcome(trial)
            lines.append({"workload_key": name, "config_key": info["config_key"],
                          "status": outcome["status"],
                          "time_ms": trial.value if outcome["status"] == "ok" else None,
                          "reason": outcome.get("reason"), "study": name, "trial": trial.number,
                          "phase": "search", "host": info.get("host"), "pid": info.get("pid"),
                          "source": "import"})
        if lines:
            TuningStore(db_dir, gpu, prov).append_trials(lines)
            report.trial_lines += len(lines)
            logged.update((name, line["trial"], pid) for line in lines)
    best = st.best_complete(study)
    if best is None:
        report.notes.append(f"{name}: no valid candidate measured; no entry written")
        return
    # the best trial is read later: a worker that joined a live study since needs a fresh read
    best_prov = (_worker_provenance(workers, best, None)
                 or _worker_provenance(st.workers(study), best, None))
    if best_prov is None:
        report.notes.append(f"{name}: the best trial has no registered provenance; no entry")
        return
    default_key = default_variant(workload).key
    default_ms = next((t.value for t in measured if t.state == st.TrialState.COMPLETE
                       and st.trial_info(t).get("config_key") == default_key), None)
    every = [p for p, _ in provs.values()]
    prov = {**best_prov,
            "hosts": sorted({st.trial_info(t).get("host") for t in measured} - {None}),
            "triton_versions": sorted({str(p.get("triton")) for p in every}),
            "driver_versions": sorted({str(p.get("driver_version")) for p in every}),
            "imported_from": describe(storage.location)}
    counts = st.status_counts(st.done_trials(study))
    config = config_from_key(st.trial_info(best)["config_key"])
    entry = make_entry(workload, config, time_ms=best.value, default_time_ms=default_ms,
                       provenance=prov, trials=len(measured), study_best_ms=best.value,
                       counts=counts)
    kept = TuningStore(db_dir, gpu, prov).update_best({name: entry}, keep_faster=True)["entries"][name]
    if kept != entry:
        report.notes.append(f"{name}: kept the recorded {kept['config_key']} ({kept['time_ms']:.5g} ms), "
                            f"faster than the study's best {entry['config_key']} ({entry['time_ms']:.5g} ms)")
    report.entries[name] = kept


def import_storage(location: str, gpu: str, db_dir) -> ImportReport:
    """Import every study of ``gpu`` in ``location`` into the database folder ``db_dir``."""
    gpu = normalize_gpu_name(gpu)
    check_existing(location)  # before opening: opening a journal or SQLite path would create it
    storage = open_storage(location)
    names = _study_names(storage, gpu)
    if not names:
        raise LookupError(f"no study of gpu={gpu!r} in {describe(location)} (study names are "
                          f"workload keys such as {gpu}-fp16-d128-b16-g1-n1-c4096)")
    report = ImportReport()
    logged = _already_logged(TuningStore(db_dir, gpu))  # read once for every study
    for name in names:
        import_study(storage, name, gpu, db_dir, report, logged)
    return report
