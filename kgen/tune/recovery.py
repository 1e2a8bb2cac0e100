"""Recovering the trials of workers that died: fail them, queue their candidates again.

A worker's death leaves its trial RUNNING. Whoever notices fails it and queues its candidate (the
trial's full parameter set) as a new WAITING trial marked ``requeued_from``, which any worker then
measures:

* this host's dead processes (pid gone): :func:`recover_orphans` (``--resume``, and every wait);
* any host, on a database: Optuna's heartbeat check, whose callback is :func:`requeue`;
* a trial that never named its candidate for :data:`OWNERLESS_GRACE_S`: :class:`StaleWatch`.
"""

from __future__ import annotations

import os
import time
import warnings

import optuna

from kgen.tune.search import PARAM_SETS
from kgen.tune.trials import HOST, TrialState, trial_info, workers

OWNERLESS_GRACE_S = 30.0  # a running trial that never named its candidate for this long is dead


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _others_may_be_running(study: optuna.Study) -> bool:
    """True if a registered worker other than this process may still be alive: one of another
    host (unknowable here) or a live process of this host."""
    for host, pid in workers(study):
        if host != HOST:
            return True
        if pid != os.getpid() and _pid_alive(pid):
            return True
    return False


def candidate_params(trial) -> dict | None:
    """The full parameter set a trial was running (suggested, or fixed by the queue), or None."""
    params = dict(trial.params) or dict(trial.system_attrs.get("fixed_params", {}))
    return params if any(set(params) == set(names) for names in PARAM_SETS.values()) else None


def requeue(study: optuna.Study, trial) -> bool:
    """Queue a failed trial's candidate again (so it is measured); False if it had none yet.

    Also the heartbeat callback of database storages: Optuna calls it for each trial it failed
    because its worker fell silent.
    """
    params = candidate_params(trial)
    if params is None:
        return False
    study.enqueue_trial(params, user_attrs={"requeued_from": trial.number})
    return True


def fail_trial(study: optuna.Study, trial) -> bool:
    """Mark a running trial FAIL; False if another worker ended it first."""
    try:
        return bool(study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL))
    except optuna.exceptions.UpdateFinishedTrialError:
        return False


def recover_orphans(study: optuna.Study) -> int:
    """Fail RUNNING trials left by killed processes of this host and queue their params again.

    A process killed between Optuna creating a trial and the trial recording its owner leaves a
    RUNNING trial with no owner; it is failed too when no other registered worker may be alive.
    Returns the number of trials recovered. Trials of live processes or other hosts are left
    (other hosts' are recovered by heartbeat, :func:`recover_stale`).
    """
    recovered = 0
    ownerless_are_orphans = None  # decided once, when the first ownerless trial shows up
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
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
        if fail_trial(study, trial):
            requeue(study, trial)
            recovered += 1
    return recovered


class StaleWatch:
    """Finds running trials whose worker is gone, on any storage, and queues them again.

    * database storages: Optuna's heartbeat check (a trial silent for the grace period, any host),
      whose callback is :func:`requeue`;
    * this host: trials of dead processes (:func:`recover_orphans`);
    * a trial that never named its candidate for :data:`OWNERLESS_GRACE_S` (seen by this watch's
      own clock, so hosts' clocks need not agree): its worker died before the objective ran.
    """

    def __init__(self, storage=None) -> None:
        self.storage = storage
        self._ownerless_since: dict[int, float] = {}

    def __call__(self, study: optuna.Study) -> int:
        before = len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
        if self.storage is not None and self.storage.grace_s is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)
        recovered = recover_orphans(study)
        now = time.monotonic()
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        seen = set()
        for trial in running:
            if trial_info(trial):
                continue
            seen.add(trial._trial_id)
            first = self._ownerless_since.setdefault(trial._trial_id, now)
            if now - first > OWNERLESS_GRACE_S and fail_trial(study, trial):
                requeue(study, trial)
                recovered += 1
        self._ownerless_since = {k: v for k, v in self._ownerless_since.items() if k in seen}
        after = len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
        return recovered + max(0, after - before)

    def watchable(self, trial) -> bool:
        """Whether this process can tell when ``trial`` (running) is abandoned."""
        if self.storage is not None and self.storage.grace_s is not None:
            return True
        info = trial_info(trial)
        return not info or info.get("host") == HOST
