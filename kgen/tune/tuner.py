"""The tuning loop: workloads -> studies -> database entries.

For each workload: open (or resume) its study, queue the default variant and the winners of
neighbouring workloads, run ``trials`` trials (in this process or ``workers`` processes on the
same storage), then re-measure the winner against the default and merge the entry into the best
table. Every candidate measured is appended to the trial log with the run's provenance.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass, field
from pathlib import Path

from kgen.db.schema import entry_config, make_entry, make_provenance
from kgen.db.store import TuningStore
from kgen.tune import interrupts, ownership
from kgen.tune import study as st
from kgen.tune import workers as wk
from kgen.tune.measure import Measurer
from kgen.tune.storage import (DEFAULT_HEARTBEAT_S, TuneStorage, clear_stale_journal_lock, is_url,
                               open_storage)
from kgen.tune.progress import Progress, interrupted_message
from kgen.tune.search import default_variant
from kgen.workload import Workload, log2_distance
from kgen.variant_attention import config_from_key


@dataclass
class TuneSettings:
    """Everything a tuning run (and each of its worker processes) needs; picklable."""

    measurer: Measurer
    device: object  # kgen.device.DeviceInfo
    db_dir: Path
    trials: int = 20
    sampler: str = "tpe"
    seed: int = 0
    storage: str | None = None  # None: the journal file in the GPU folder
    resume: bool = False
    workers: int = 1
    progress: bool = False
    provenance: dict = field(default_factory=dict)
    heartbeat_s: int = DEFAULT_HEARTBEAT_S  # database storages: liveness of running trials
    run_id: str = field(default_factory=ownership.new_run_id)  # the claim on this run's studies

    def __post_init__(self) -> None:
        if self.trials < 1:
            raise ValueError(f"trials={self.trials!r} must be at least 1")
        if self.workers < 1:
            raise ValueError(f"workers={self.workers!r} must be at least 1")
        if self.sampler not in st.SAMPLERS:
            raise ValueError(f"sampler={self.sampler!r} is not one of {', '.join(st.SAMPLERS)}")
        if isinstance(self.heartbeat_s, bool) or not isinstance(self.heartbeat_s, int) \
                or self.heartbeat_s < 1:
            raise ValueError(f"heartbeat_s={self.heartbeat_s!r} must be a whole number of "
                             f"seconds, at least 1")
        self.db_dir = Path(self.db_dir)
        if not self.provenance:
            self.provenance = make_provenance(self.device, method=self.measurer.method,
                                              sampler=self.sampler, seed=self.seed)

    @functools.cached_property
    def store(self) -> TuningStore:
        """The GPU folder's store; one per settings, so the run's provenance is logged once."""
        return TuningStore(self.db_dir, self.device.name, self.provenance)

    @property
    def storage_location(self) -> str:
        return self.storage or str(self.store.journal_path)

    @property
    def shared(self) -> bool:
        """Whether others may work on the studies too (explicit storage or several workers)."""
        return self.storage is not None or self.workers > 1

    def open_storage(self) -> TuneStorage:
        return open_storage(self.storage_location, heartbeat_s=self.heartbeat_s,
                            on_stale=st.requeue)


@dataclass
class WorkloadResult:
    workload: Workload
    best: object | None  # a VariantConfig or AttentionVariantConfig
    time_ms: float | None
    default_time_ms: float | None
    trials: int
    counts: dict

    @property
    def speedup(self) -> float | None:
        if self.time_ms and self.default_time_ms:
            return self.default_time_ms / self.time_ms
        return None


class TuneInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped a run; ``message`` says what was recorded, ``results`` holds
    the workloads finished before it."""

    def __init__(self, message: str, results: list) -> None:
        super().__init__(message)
        self.message = message
        self.results = results


def _open(settings: TuneSettings, workload: Workload):
    storage = settings.open_storage()
    sampler = st.make_sampler(settings.sampler, st.worker_seed(settings.seed, settings.shared),
                              workload)
    return st.open_study(workload, storage, sampler), storage


def _run_trials(settings: TuneSettings, workload: Workload, callbacks=()) -> int:
    """Worker body: work on this workload's study until it is done (see :func:`study.optimize`)."""
    study, storage = _open(settings, workload)
    store = settings.store
    objective = st.Objective(workload, settings.measurer, storage=storage,
                             record=lambda r: store.append_trials([r]))
    info = {"provenance": settings.provenance,
            "seed": st.worker_seed(settings.seed, settings.shared)}
    return st.optimize(study, objective, settings.trials, callbacks, info=info)


def neighbour_winners(settings: TuneSettings, workload: Workload, limit: int = 2) -> list:
    """Best configs already recorded for the nearest buckets of the same shape (this GPU)."""
    table = settings.store.load_best() or {"entries": {}}
    near = []
    for key, entry in table["entries"].items():
        other = Workload.from_dict(entry["workload"])
        if key != workload.key and other.family_key == workload.family_key \
                and other.kernel == workload.kernel:
            dist = (log2_distance(other.batch, workload.batch)
                    + log2_distance(other.context, workload.context)
                    + log2_distance(other.query_len, workload.query_len))
            near.append((dist, key, entry_config(entry)))
    return [config for _, _, config in sorted(near)[:limit]]


def _notify(message: str) -> None:
    sys.stderr.write(f"kgen tune: {message}\n")
    sys.stderr.flush()


def claim_studies(settings: TuneSettings, workloads: list[Workload]) -> None:
    """Before anything is measured: claim every workload's study for this run, or refuse.

    The private journal (no ``--storage``) refuses a study with trials, or one another run has
    claimed, unless ``--resume`` is given (they may be from another run); the check and the claim
    are one step under the GPU folder's lock (:mod:`kgen.tune.ownership`), so of two runs started
    together only one tunes. An explicit ``--storage`` is shared by design, so joining a study
    that others already work on is the point: nothing is claimed there.
    """
    if not is_url(settings.storage_location):
        cleared = clear_stale_journal_lock(settings.storage_location)
        if cleared:
            _notify(cleared)
    if settings.storage is not None:
        return
    with settings.store.lock():
        studies = [(workload, _open(settings, workload)[0]) for workload in workloads]
        for workload, study in studies if not settings.resume else ():
            problem = ownership.refusal(study, settings.run_id)
            if problem:
                raise ValueError(f"study {workload.key!r} in {settings.storage_location} {problem}; "
                                 f"pass --resume to continue it (or use another --db)")
        for _, study in studies:
            ownership.claim(study, settings.run_id)


def prepare(settings: TuneSettings, workload: Workload):
    """Open the study (claimed by :func:`claim_studies`); warm-start it, or recover it when
    resuming. A study already finished (its entry written, no trials left to run) is returned
    with ``{"finished": ...}`` and is not touched."""
    study, storage = _open(settings, workload)
    with settings.store.lock():
        recovered = st.recover_orphans(study) if settings.resume else 0
        finished = ownership.final(study)
        if finished is not None and not st.needs_work(study, settings.trials):
            return study, {"finished": finished}
        done = len(st.done_trials(study))
        queued = st.warm_start(study, workload,
                               [default_variant(workload), *neighbour_winners(settings, workload)],
                               claims=storage.claims, limit=settings.trials)
    if recovered:
        _notify(f"{workload.key}: {recovered} trial(s) of interrupted runs failed and their "
                f"candidates queued again")
    return study, {"recovered": recovered, "queued": queued, "done": done}


def finished_result(settings: TuneSettings, workload: Workload, study, finished: dict) -> WorkloadResult:
    """The result of a workload an earlier run finished: its best.json entry as it stands."""
    measured = len(st.budget_trials(study))
    entry = (settings.store.load_best() or {"entries": {}})["entries"].get(workload.key)
    if entry is None:  # the entry was pruned since: say what the study recorded
        entry = {**finished, "config": config_from_key(finished["config_key"]).to_dict(),
                 "default_time_ms": None}
    _notify(f"{workload.key}: finished by an earlier run ({entry['config_key']}, {entry['time_ms']:.5g} ms); "
            f"skipped")
    return WorkloadResult(workload, entry_config(entry), entry["time_ms"],
                          entry.get("default_time_ms"), measured, st.status_counts(st.done_trials(study)))


def finalize(settings: TuneSettings, workload: Workload, study) -> WorkloadResult:
    """Re-measure the winner and the default, store both, merge the entry into the best table."""
    trials = st.done_trials(study)
    measured = len(st.budget_trials(study))
    counts = st.status_counts(trials)
    best_trial = st.best_complete(study)
    if best_trial is None:
        return WorkloadResult(workload, None, None, None, measured, counts)
    measurer, store = settings.measurer, settings.store
    winner = config_from_key(st.trial_info(best_trial)["config_key"])
    default = default_variant(workload)
    with interrupts.interruptible():
        final = {"winner": measurer.measure(winner, workload)}
        final["default"] = (final["winner"] if default == winner
                            else measurer.measure(default, workload))
    store.append_trials([{"workload_key": workload.key, "config_key": cfg.key, "status": m.status,
                          "time_ms": m.time_ms, "reason": m.reason, "study": workload.key,
                          "phase": f"final-{role}"}
                         for role, cfg, m in (("winner", winner, final["winner"]),
                                              ("default", default, final["default"]))])
    default_ms = final["default"].time_ms if final["default"].ok else None
    if final["winner"].status == "failed":  # wrong on fresh inputs: never a winner
        if default_ms is None:
            return WorkloadResult(workload, None, None, None, measured, counts)
        winner, time_ms = default, default_ms
    else:
        time_ms = final["winner"].time_ms if final["winner"].ok else best_trial.value
    if default_ms is not None and default_ms < time_ms:  # the re-measure says the default wins
        winner, time_ms = default, default_ms
    entry = make_entry(workload, winner, time_ms=time_ms, default_time_ms=default_ms,
                       provenance=settings.provenance, trials=measured,
                       study_best_ms=best_trial.value, counts=counts)
    kept = store.update_best({workload.key: entry}, keep_faster=True)["entries"][workload.key]
    ownership.mark_final(study, kept)
    if kept != entry:  # a finished entry measured faster stays
        _notify(f"{workload.key}: kept the recorded {kept['config_key']} ({kept['time_ms']:.5g} ms); this "
                f"run's {winner.key} measured {time_ms:.5g} ms (both are in {store.trials_path})")
        winner, time_ms = entry_config(kept), kept["time_ms"]
        default_ms = kept.get("default_time_ms")
    return WorkloadResult(workload, winner, time_ms, default_ms, measured, counts)


def tune(settings: TuneSettings, workloads: list[Workload]) -> list[WorkloadResult]:
    """Tune every workload in turn; returns one result per workload.

    Raises
    ------
    TuneInterrupted
        On Ctrl-C / SIGTERM (when the caller turns SIGTERM into KeyboardInterrupt): workers are
        stopped, the interrupted trials' candidates queued again, and the message says what was
        recorded.
    """
    if not workloads:
        raise ValueError("no workloads selected")
    progress = Progress(settings.progress, settings.trials * len(workloads))
    results, study, workload = [], None, workloads[0]
    claim_studies(settings, workloads)
    try:
        for index, workload in enumerate(workloads):
            study = None
            study, state = prepare(settings, workload)
            if "finished" in state:
                results.append(finished_result(settings, workload, study, state["finished"]))
                continue
            base = index * settings.trials
            label = f"{workload.key} ({index + 1}/{len(workloads)})"

            def tick(study_, _trial, base=base, label=label):
                progress.set(base + min(settings.trials, len(st.budget_trials(study_))), label)

            if settings.workers == 1:
                _run_trials(settings, workload, callbacks=[tick])
            else:
                stopped = wk.run_workers(_run_trials, (settings, workload), settings.workers,
                                         poll=lambda: tick(study, None), notify=_notify)
                if stopped and st.needs_work(study, settings.trials):
                    raise KeyboardInterrupt("the workers were stopped")  # nobody finished it
            tick(study, None)
            results.append(finalize(settings, workload, study))
            interrupts.checkpoint()
    except KeyboardInterrupt as exc:
        if isinstance(exc, TuneInterrupted):
            raise
        raise TuneInterrupted(interrupted_message(settings, workload, study, results),
                              results) from None
    finally:
        progress.close()
    return results
