"""The tuning loop: workloads -> studies -> database entries.

For each workload: open (or resume) its study, queue the default variant and the winners of
neighbouring workloads, run ``trials`` trials (in this process or ``workers`` processes on the
same storage), then re-measure the winner against the default and merge the entry into the best
table. Every candidate measured is appended to the trial log with the run's provenance.
"""

from __future__ import annotations

import functools
import multiprocessing
from dataclasses import dataclass, field
from pathlib import Path

from kgen.db.schema import make_entry, make_provenance
from kgen.db.store import TuningStore
from kgen.tune import study as st
from kgen.tune.measure import Measurer
from kgen.tune.search import default_variant
from kgen.workload import Workload, log2_distance
from kgen.variant import VariantConfig


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

    def __post_init__(self) -> None:
        if self.trials < 1:
            raise ValueError(f"trials={self.trials!r} must be at least 1")
        if self.workers < 1:
            raise ValueError(f"workers={self.workers!r} must be at least 1")
        if self.sampler not in st.SAMPLERS:
            raise ValueError(f"sampler={self.sampler!r} is not one of {', '.join(st.SAMPLERS)}")
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


@dataclass
class WorkloadResult:
    workload: Workload
    best: VariantConfig | None
    time_ms: float | None
    default_time_ms: float | None
    trials: int
    counts: dict

    @property
    def speedup(self) -> float | None:
        if self.time_ms and self.default_time_ms:
            return self.default_time_ms / self.time_ms
        return None


def _open(settings: TuneSettings, workload: Workload):
    storage = st.open_storage(settings.storage_location)
    sampler = st.make_sampler(settings.sampler, settings.seed, workload)
    return st.open_study(workload, storage, sampler)


def _run_trials(settings: TuneSettings, workload: Workload, callbacks=()) -> int:
    """Worker body: run this workload's remaining trials against the shared storage."""
    study = _open(settings, workload)
    store = settings.store
    objective = st.Objective(workload, settings.measurer, record=lambda r: store.append_trials([r]))
    return st.optimize(study, objective, settings.trials, callbacks)


def neighbour_winners(settings: TuneSettings, workload: Workload, limit: int = 2) -> list:
    """Best configs already recorded for the nearest buckets of the same shape (this GPU)."""
    table = settings.store.load_best() or {"entries": {}}
    near = []
    for key, entry in table["entries"].items():
        other = Workload.from_dict(entry["workload"])
        if key != workload.key and other.family_key == workload.family_key:
            dist = log2_distance(other.batch, workload.batch) + log2_distance(other.context,
                                                                             workload.context)
            near.append((dist, key, VariantConfig.from_dict(entry["config"])))
    return [config for _, _, config in sorted(near)[:limit]]


def prepare(settings: TuneSettings, workload: Workload):
    """Open the study; refuse to mix with old trials unless resuming; warm-start or recover."""
    study = _open(settings, workload)
    with settings.store.lock():
        done = len(st.done_trials(study))
        if done and not settings.resume:
            raise ValueError(f"study {workload.key!r} in {settings.storage_location} already has "
                             f"{done} trials; pass --resume to continue it (or use another --db)")
        recovered = st.recover_orphans(study) if settings.resume else 0
        queued = st.warm_start(study, workload,
                               [default_variant(workload), *neighbour_winners(settings, workload)])
    return study, {"recovered": recovered, "queued": queued}


def finalize(settings: TuneSettings, workload: Workload, study) -> WorkloadResult:
    """Re-measure the winner and the default, store both, merge the entry into the best table."""
    trials = st.done_trials(study)
    measured = len(st.budget_trials(study))
    counts = {"ok": 0, "pruned": 0, "failed": 0}
    for trial in trials:
        status = st.trial_outcome(trial)["status"]
        counts[status] = counts.get(status, 0) + 1
    best_trial = st.best_complete(study)
    if best_trial is None:
        return WorkloadResult(workload, None, None, None, measured, counts)
    measurer, store = settings.measurer, settings.store
    winner = VariantConfig.from_key(st.trial_info(best_trial)["config_key"])
    default = default_variant(workload)
    final = {"winner": measurer.measure(winner, workload)}
    final["default"] = final["winner"] if default == winner else measurer.measure(default, workload)
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
    store.update_best({workload.key: entry})
    return WorkloadResult(workload, winner, time_ms, default_ms, measured, counts)


class _Progress:
    """A tqdm bar over all trials of all workloads (a no-op when disabled)."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="trial", dynamic_ncols=True)

    def set(self, done: int, label: str) -> None:
        if self.bar is not None:
            self.bar.set_description(label)
            self.bar.update(max(0, done - self.bar.n))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def tune(settings: TuneSettings, workloads: list[Workload]) -> list[WorkloadResult]:
    """Tune every workload in turn; returns one result per workload."""
    if not workloads:
        raise ValueError("no workloads selected")
    progress = _Progress(settings.progress, settings.trials * len(workloads))
    results, pool = [], None
    if settings.workers > 1:
        pool = multiprocessing.get_context("spawn").Pool(settings.workers)
    try:
        for index, workload in enumerate(workloads):
            study, _ = prepare(settings, workload)
            base = index * settings.trials
            label = f"{workload.key} ({index + 1}/{len(workloads)})"

            def tick(study_, _trial, base=base, label=label):
                progress.set(base + min(settings.trials, len(st.budget_trials(study_))), label)

            if pool is None:
                _run_trials(settings, workload, callbacks=[tick])
            else:
                pending = pool.starmap_async(_run_trials, [(settings, workload)] * settings.workers)
                while not pending.ready():
                    pending.wait(0.5)
                    tick(study, None)
                pending.get()
            tick(study, None)
            results.append(finalize(settings, workload, study))
    finally:
        if pool is not None:
            pool.close()
            pool.join()
        progress.close()
    return results
