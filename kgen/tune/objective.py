"""The Optuna objective of one workload: suggest a candidate, claim it, measure it, record it."""

from __future__ import annotations

import os
import time

import optuna

from kgen.tune import interrupts
from kgen.tune.claims import NullClaims
from kgen.tune.measure import Measurement, Measurer
from kgen.tune.recovery import StaleWatch
from kgen.tune.search import config_for, param_names, search_space
from kgen.tune.trials import DONE_STATES, HOST, TrialState, done_trials, trial_info, trial_outcome
from kgen.workload import Workload

# Split-K is searched as categories: ``auto`` (index 0) performs unlike its neighbour 1, so an
# ordinal split axis misleads TPE; the other axes are ordinal (neighbours perform alike).
CATEGORICAL = ("split_k_idx",)


class Objective:
    """The Optuna objective of one workload: suggest, claim, build, measure, record.

    Parameters
    ----------
    workload : Workload
    measurer : Measurer
    record : callable or None
        ``record(dict)`` called with a trial-log record for every candidate measured here.
    storage : TuneStorage or None
        Where the study lives: its claims (None: nothing shared, nothing to claim).
    poll_s : float
        How often a trial waiting for another worker's measurement of its candidate looks again.
    """

    def __init__(self, workload: Workload, measurer: Measurer, record=None, storage=None,
                 poll_s: float = 0.25) -> None:
        self.workload = workload
        self.measurer = measurer
        self.record = record
        self.claims = storage.claims if storage is not None else NullClaims()
        self.stale = StaleWatch(storage)
        self.poll_s = poll_s
        self.current = None  # the trial being run (for requeue on interrupt)
        self.sizes = {name: len(values) for name, values in
                      zip(param_names(workload), search_space(workload).values())}

    def _known(self, study: optuna.Study, config_key: str):
        """An earlier trial's outcome for the same variant (any process), or None."""
        for trial in done_trials(study):
            if trial_info(trial).get("config_key") == config_key:
                return self._copy(trial)
        return None

    @staticmethod
    def _copy(trial) -> tuple[Measurement, int]:
        outcome = trial_outcome(trial)
        value = trial.value if outcome["status"] == "ok" else None
        extra = {"static": True} if outcome.get("static") else {}
        return (Measurement(outcome["status"], time_ms=value, reason=outcome.get("reason"),
                            extra=extra), trial.number)

    def _claim(self, trial: optuna.Trial, config_key: str):
        """None when this trial is to measure ``config_key``; else (outcome, trial number) copied
        from the trial that measured it (waiting while that one runs)."""
        study = trial.study
        while True:
            holder = self.claims.claim(study, trial._trial_id, config_key)
            if holder is None:
                return None
            held = study._storage.get_trial(holder)
            if held.state in DONE_STATES:
                return self._copy(held)
            if held.state == TrialState.RUNNING:
                with interrupts.interruptible():
                    time.sleep(self.poll_s)
                self.stale(study)  # a silent holder is failed, and its claim passes to us

    def __call__(self, trial: optuna.Trial) -> float:
        self.current = trial
        interrupts.checkpoint()
        params = {name: (trial.suggest_categorical(name, list(range(size))) if name in CATEGORICAL
                         else trial.suggest_int(name, 0, size - 1))
                  for name, size in self.sizes.items()}
        config = config_for(self.workload, params)
        # one attribute per journal write: who runs which variant (for orphan recovery) ...
        trial.set_user_attr("run", {"config_key": config.key, "host": HOST, "pid": os.getpid()})
        copied = self._known(trial.study, config.key) or self._claim(trial, config.key)
        if copied is None:
            try:
                with interrupts.interruptible():
                    result = self.measurer.measure(config, self.workload)
            except Exception as exc:  # a crashing candidate is a failed record, not a crash
                result = Measurement("failed", reason=f"{type(exc).__name__}: {exc}"[:500])
        else:
            result = copied[0]
        # ... and the outcome (status/reason for pruned and failed candidates)
        trial.set_user_attr("outcome", {"status": result.status, "reason": result.reason,
                                        "cached": copied is not None,
                                        "static": bool(result.extra.get("static")),
                                        **({"copy_of": copied[1]} if copied else {})})
        if self.record is not None and copied is None:
            self.record({"workload_key": self.workload.key, "config_key": config.key,
                         "status": result.status, "time_ms": result.time_ms,
                         "reason": result.reason, "study": self.workload.key,
                         "trial": trial.number, "phase": "search", "host": HOST,
                         "pid": os.getpid(),
                         **({"extra": result.extra} if result.extra else {})})
        self.current = None
        if result.ok:
            return result.time_ms
        raise optuna.TrialPruned(f"{result.status}: {result.reason}")
