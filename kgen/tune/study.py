"""One Optuna study per workload: storage, sampler, warm start, resume, the objective.

Storage is an Optuna journal file by default (``tuning_db/<gpu>/journal.log``), so a killed run
resumes where it stopped; an RDB URL (``sqlite:///x.db``, ``postgresql://...``) lets several
processes or machines work on one study. A study is named by its workload key.

A trial suggests the searched parameters, builds the variant and measures it; pruned and failed
candidates end as Optuna ``PRUNED`` trials carrying their status and reason, so only correct,
timed kernels can be the best trial. Only this module (and :mod:`kgen.tune.tuner`) import optuna.
"""

from __future__ import annotations

import os
import socket

import optuna

from kgen.tune.measure import Measurement, Measurer
from kgen.tune.search import PARAM_NAMES, config_for, grid_space, params_of, search_space
from kgen.workload import Workload

SAMPLERS = ("tpe", "random", "grid")
DONE_STATES = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
HOST = socket.gethostname()
# Split-K is searched as categories: ``auto`` (index 0) performs unlike its neighbour 1, so an
# ordinal split axis misleads TPE; the other axes are ordinal (neighbours perform alike).
CATEGORICAL = ("split_k_idx",)


def open_storage(location: str):
    """An Optuna storage: an RDB URL (contains ``://``) as is, else a journal file at the path."""
    location = str(location)
    if "://" in location:
        return location
    os.makedirs(os.path.dirname(os.path.abspath(location)), exist_ok=True)
    try:  # optuna >= 4.0
        from optuna.storages.journal import JournalFileBackend as _Backend
    except ImportError:  # optuna 3.6 .. 3.x
        from optuna.storages import JournalFileStorage as _Backend
    return optuna.storages.JournalStorage(_Backend(location))


def make_sampler(name: str, seed: int, workload: Workload | None = None):
    """``tpe`` (default), ``random`` or ``grid`` (the workload's whole space), seeded."""
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=8)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "grid":
        if workload is None:
            raise ValueError("the grid sampler needs the workload's search space")
        return optuna.samplers.GridSampler(grid_space(workload), seed=seed)
    raise ValueError(f"sampler={name!r} is not one of {', '.join(SAMPLERS)}")


def open_study(workload: Workload, storage, sampler) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(study_name=workload.key, storage=storage, sampler=sampler,
                               direction="minimize", load_if_exists=True)


def done_trials(study: optuna.Study) -> list:
    return study.get_trials(deepcopy=False, states=DONE_STATES)


def trial_info(trial) -> dict:
    """``{"config_key", "host", "pid"}`` of a trial (empty before it suggested its params)."""
    return trial.user_attrs.get("run", {})


def trial_outcome(trial) -> dict:
    """``{"status": ok|pruned|failed, "reason", "cached", "static"}`` of a finished trial."""
    return trial.user_attrs.get("outcome", {"status": "ok", "reason": None, "cached": False,
                                            "static": False})


def budget_trials(study: optuna.Study) -> list:
    """The done trials that count toward ``--trials``: candidates really built and measured (or
    failed / pruned by the audit), not free ones (static prune, repeats answered from the study)."""
    return [t for t in done_trials(study)
            if not trial_outcome(t)["cached"] and not trial_outcome(t).get("static")]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


WORKER_PREFIX = "worker:"  # study user attribute ``worker:<host>:<pid>`` per optimizing process


def register_worker(study: optuna.Study) -> None:
    """Note this process in the study before it creates any trial (see :func:`recover_orphans`)."""
    study.set_user_attr(f"{WORKER_PREFIX}{HOST}:{os.getpid()}", True)


def _others_may_be_running(study: optuna.Study) -> bool:
    """True if a registered worker other than this process may still be alive: one of another
    host (unknowable here) or a live process of this host."""
    for name in study.user_attrs:
        if not name.startswith(WORKER_PREFIX):
            continue
        host, _, pid = name[len(WORKER_PREFIX):].rpartition(":")
        if host != HOST or not pid.isdigit():
            return True
        if int(pid) != os.getpid() and _pid_alive(int(pid)):
            return True
    return False


def recover_orphans(study: optuna.Study) -> int:
    """Fail RUNNING trials left by killed processes of this host and queue their params again.

    A process killed between Optuna creating a trial and the trial recording its owner leaves a
    RUNNING trial with no owner; it is failed too when no other registered worker may be alive.
    Returns the number of trials recovered. Trials of live processes or other hosts are left.
    """
    recovered = 0
    ownerless_are_orphans = None  # decided once, when the first ownerless trial shows up
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        attrs = trial_info(trial)
        if not attrs:
            if ownerless_are_orphans is None:
                ownerless_are_orphans = not _others_may_be_running(study)
            if not ownerless_are_orphans:
                continue
        elif attrs.get("host") != HOST or not isinstance(attrs.get("pid"), int):
            continue
        elif attrs["pid"] == os.getpid() or _pid_alive(attrs["pid"]):
            continue
        study._storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
        if set(trial.params) == set(PARAM_NAMES):
            study.enqueue_trial(dict(trial.params))
        recovered += 1
    return recovered


def warm_start(study: optuna.Study, workload: Workload, configs: list) -> int:
    """Queue ``configs`` (the default first, then neighbours' winners) on an empty study."""
    if study.get_trials(deepcopy=False):
        return 0
    queued = []
    for config in configs:
        params = params_of(workload, config)
        if params is not None and params not in queued:
            queued.append(params)
            study.enqueue_trial(params)
    return len(queued)


class Objective:
    """The Optuna objective of one workload: suggest, build, measure, record.

    Parameters
    ----------
    workload : Workload
    measurer : Measurer
    record : callable or None
        ``record(dict)`` called with a trial-log record for every candidate measured here.
    """

    def __init__(self, workload: Workload, measurer: Measurer, record=None) -> None:
        self.workload = workload
        self.measurer = measurer
        self.record = record
        self.sizes = {name: len(values) for name, values in
                      zip(PARAM_NAMES, search_space(workload).values())}

    def _known(self, study: optuna.Study, config_key: str):
        """An earlier trial's outcome for the same variant (any process), or None."""
        for trial in done_trials(study):
            if trial_info(trial).get("config_key") == config_key:
                outcome = trial_outcome(trial)
                value = trial.value if outcome["status"] == "ok" else None
                return Measurement(outcome["status"], time_ms=value, reason=outcome.get("reason"))
        return None

    def __call__(self, trial: optuna.Trial) -> float:
        params = {name: (trial.suggest_categorical(name, list(range(size))) if name in CATEGORICAL
                         else trial.suggest_int(name, 0, size - 1))
                  for name, size in self.sizes.items()}
        config = config_for(self.workload, params)
        # one attribute per journal write: who runs which variant (for orphan recovery) ...
        trial.set_user_attr("run", {"config_key": config.key, "host": HOST, "pid": os.getpid()})
        result = self._known(trial.study, config.key)
        cached = result is not None
        if result is None:
            try:
                result = self.measurer.measure(config, self.workload)
            except Exception as exc:  # a crashing candidate is a failed record, not a crash
                result = Measurement("failed", reason=f"{type(exc).__name__}: {exc}"[:500])
        # ... and the outcome (status/reason for pruned and failed candidates)
        trial.set_user_attr("outcome", {"status": result.status, "reason": result.reason,
                                        "cached": cached,
                                        "static": bool(result.extra.get("static"))})
        if self.record is not None and not cached:
            self.record({"workload_key": self.workload.key, "config_key": config.key,
                         "status": result.status, "time_ms": result.time_ms,
                         "reason": result.reason, "study": self.workload.key,
                         "trial": trial.number, "phase": "search", "host": HOST,
                         "pid": os.getpid(),
                         **({"extra": result.extra} if result.extra else {})})
        if result.ok:
            return result.time_ms
        raise optuna.TrialPruned(f"{result.status}: {result.reason}")


def optimize(study: optuna.Study, objective: Objective, trials: int, callbacks=(),
             max_free: int = 50) -> int:
    """Run until ``trials`` candidates were measured (:func:`budget_trials`); returns how many
    trials this call ran. Several processes may share one study: the total stops near ``trials``.

    Free trials (static prunes, repeats) do not count, but at most ``max_free`` per budget trial
    are run, so a space that is all pruned or exhausted still ends.
    """
    if trials - len(budget_trials(study)) <= 0:
        return 0

    def stop(study_, _trial) -> None:
        if len(budget_trials(study_)) >= trials:
            study_.stop()

    register_worker(study)
    before = len(study.get_trials(deepcopy=False))
    study.optimize(objective, n_trials=trials * max_free, callbacks=[stop, *callbacks], catch=())
    return len(study.get_trials(deepcopy=False)) - before


def best_complete(study: optuna.Study):
    """The best COMPLETE trial, or None when every trial was pruned or failed."""
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    return min(complete, key=lambda t: (t.value, t.number)) if complete else None
