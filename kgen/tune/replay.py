"""Offline scoring of the tuner: trials until within a tolerance of a recorded table's best.

Given a table of measured (config -> time) per workload, a study is run with a
:class:`~kgen.tune.measure.ReplayMeasurer` in memory, and the score is the number of trials (and
of distinct configs measured) until the best time found is within ``tol`` (3%) of the table's best.
"""

from __future__ import annotations

from dataclasses import dataclass

import optuna

from kgen.tune import study as st
from kgen.tune.measure import Measurer, ReplayMeasurer, SyntheticMeasurer
from kgen.tune.search import all_candidates, default_variant, static_prune
from kgen.workload import Workload


@dataclass(frozen=True)
class ReplayScore:
    """``trials`` / ``measured``: 1-based count when the target was reached (None: never)."""

    workload: str
    sampler: str
    seed: int
    trials: int | None
    measured: int | None
    best_ms: float | None
    target_ms: float
    budget: int


def synthetic_table(workloads: list[Workload], seed: int = 0) -> dict[str, dict[str, float]]:
    """A full replay table from the synthetic cost model (every valid candidate timed)."""
    model = SyntheticMeasurer(seed=seed)
    table = {}
    for workload in workloads:
        rows = {}
        for config in all_candidates(workload):
            if static_prune(config) is None:
                result = model.measure(config, workload)
                if result.ok:
                    rows[config.key] = result.time_ms
        table[workload.key] = rows
    return table


def score(measurer: Measurer, workload: Workload, *, target_ms: float, sampler: str, seed: int,
          budget: int, warm_start: bool = False) -> ReplayScore:
    """Run one in-memory study of ``budget`` trials and find when it came within ``target_ms``."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize",
                                sampler=st.make_sampler(sampler, seed, workload))
    if warm_start:
        st.warm_start(study, workload, [default_variant(workload)])
    objective = st.Objective(workload, measurer)
    trials_at = measured_at = None
    best = None
    measured = 0

    def watch(study_, trial) -> None:
        nonlocal trials_at, measured_at, best, measured
        outcome = st.trial_outcome(trial)
        if not outcome["cached"] and outcome["status"] in ("ok", "failed"):
            measured += 1
        if trial.state == optuna.trial.TrialState.COMPLETE and (best is None or trial.value < best):
            best = trial.value
        if trials_at is None and best is not None and best <= target_ms:
            trials_at, measured_at = trial.number + 1, measured
            study_.stop()

    limit = budget
    if sampler == "grid":  # the grid sampler stops by itself once the grid is exhausted
        limit = min(budget, len(all_candidates(workload)))
    study.optimize(objective, n_trials=limit, callbacks=[watch])
    return ReplayScore(workload=workload.key, sampler=sampler, seed=seed, trials=trials_at,
                       measured=measured_at, best_ms=best, target_ms=target_ms, budget=budget)


def replay_scores(table: dict[str, dict[str, float]], *, samplers=st.SAMPLERS, seeds=(0, 1, 2),
                  budget: int = 200, tol: float = 0.03, device: str = "replay") -> list[ReplayScore]:
    """Scores of each sampler and seed on each workload of ``table``."""
    measurer = ReplayMeasurer(table, device=device)
    out = []
    for key in table:
        workload = Workload.from_key(key)
        target = measurer.best(workload)[1] * (1 + tol)
        for sampler in samplers:
            for seed in seeds:
                out.append(score(measurer, workload, target_ms=target, sampler=sampler,
                                 seed=seed, budget=budget))
    return out
