"""One Optuna study per workload: sampler, opening, warm start, the loop.

(The objective is :mod:`kgen.tune.objective`, what trials carry :mod:`kgen.tune.trials`, the
recovery of dead workers' trials :mod:`kgen.tune.recovery`.)

A study is named by its workload key and lives in a :mod:`storage <kgen.tune.storage>` (a journal
file by default, a database for a fleet). Any number of processes, each with any number of
workers, may optimize one study at once:

* the budget (``--trials``) counts measured candidates of the whole study; each worker checks it
  after every trial, so the study ends at most (workers - 1) trials past it (the overshoot);
* a candidate is measured once: a trial claims it first (:mod:`kgen.tune.claims`) and a trial that
  finds it claimed copies the holder's outcome (free); TPE runs with ``constant_liar`` and each
  worker of a shared study with its own seed, so workers rarely pick the same candidate at all;
* a trial whose worker died (heartbeat silent on a database; process gone on this host) is failed
  and its candidate queued again; a queued candidate is measured even when the budget is met, and
  a worker leaves a study only when nothing is queued and the trials it saw running have ended.

Pruned and failed candidates end as Optuna ``PRUNED`` trials carrying their status and reason, so
only correct, timed kernels can be the best trial. Only this package imports optuna.
"""

from __future__ import annotations

import logging
import os
import time
import zlib

import optuna

from kgen.paths import template_hash
from kgen.tune import interrupts
from kgen.tune.claims import NullClaims
from kgen.tune.objective import Objective
from kgen.tune.recovery import fail_trial, recover_orphans, requeue
from kgen.tune.search import grid_space, params_of
from kgen.tune.trials import (HOST, TrialState, budget_trials, done_trials, register_worker,
                              status_counts, trial_info, trial_outcome, workers)
from kgen.workload import Workload

# the study's vocabulary, used through this module by the tuner and the importer
__all__ = ["HOST", "TEMPLATE_ATTR", "TrialState", "Objective", "budget_trials", "done_trials",
           "trial_info", "trial_outcome", "status_counts", "workers", "requeue", "recover_orphans",
           "make_sampler", "worker_seed", "open_study", "warm_start", "needs_work", "optimize",
           "best_complete"]
SAMPLERS = ("tpe", "random", "grid")


class _InterruptedTrialFilter(logging.Filter):
    """Optuna logs a trial cut by Ctrl-C / SIGTERM as a failure (with a traceback, then "failed
    with value None"); kgen says what an interrupt recorded itself, so both records are dropped."""

    def __init__(self) -> None:
        super().__init__()
        self.interrupted: set[str] = set()

    def filter(self, record) -> bool:
        words = record.getMessage().split()
        number = words[1] if len(words) > 1 and words[0] == "Trial" else None
        info = record.exc_info
        if info and info[0] is not None and issubclass(info[0], KeyboardInterrupt):
            self.interrupted.add(number)
            return False
        if number in self.interrupted and "failed with value" in record.getMessage():
            self.interrupted.discard(number)
            return False
        return True


logging.getLogger("optuna.study._optimize").addFilter(_InterruptedTrialFilter())


def make_sampler(name: str, seed: int, workload: Workload | None = None):
    """``tpe`` (default), ``random`` or ``grid`` (the workload's whole space), seeded.

    TPE uses ``constant_liar``: trials other workers are running count as bad results, so
    concurrent workers spread out instead of suggesting the same candidate.
    """
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=8, constant_liar=True)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "grid":
        if workload is None:
            raise ValueError("the grid sampler needs the workload's search space")
        return optuna.samplers.GridSampler(grid_space(workload), seed=seed)
    raise ValueError(f"sampler={name!r} is not one of {', '.join(SAMPLERS)}")


def worker_seed(seed: int, shared: bool) -> int:
    """``seed`` for a study this process has alone; mixed with host and pid when it is shared
    (workers with one seed would draw the same startup candidates)."""
    if not shared:
        return seed
    return zlib.crc32(f"{seed}:{HOST}:{os.getpid()}".encode())


TEMPLATE_ATTR = "template_hash"


def open_study(workload: Workload, storage, sampler) -> optuna.Study:
    """Create or load the workload's study in ``storage`` (a :class:`TuneStorage`).

    Raises ValueError when the study's trials were measured against other kernel templates:
    their times do not describe the kernels this kgen builds.
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=workload.key, storage=storage.optuna, sampler=sampler,
                                direction="minimize", load_if_exists=True)
    current = template_hash(workload.kernel)
    recorded = study.user_attrs.get(TEMPLATE_ATTR)
    if recorded is None:
        study.set_user_attr(TEMPLATE_ATTR, current)
    elif recorded != current:
        raise ValueError(f"study {workload.key!r} in {storage.location} was measured against "
                         f"kernel templates {recorded}, these are {current}: its times do not "
                         f"apply; tune into a new --storage / --db, or delete that study")
    return study


def warm_start(study: optuna.Study, workload: Workload, configs: list, claims=None,
               limit: int | None = None) -> int:
    """Queue ``configs`` (the default first, then neighbours' winners) on an empty study: once
    per study however many workers start together, at most ``limit`` of them."""
    if study.get_trials(deepcopy=False):
        return 0
    if not (claims or NullClaims()).once(study, "warm-start"):
        return 0
    queued = []
    for config in configs:
        params = params_of(workload, config)
        if params is not None and params not in queued:
            queued.append(params)
    queued = queued[:limit] if limit is not None else queued
    for params in queued:
        study.enqueue_trial(params)
    return len(queued)


def _waiting(study: optuna.Study) -> list:
    return study.get_trials(deepcopy=False, states=(TrialState.WAITING,))


def needs_work(study: optuna.Study, trials: int) -> bool:
    """Budget not met, or a candidate queued (queued ones are measured regardless)."""
    return len(budget_trials(study)) < trials or bool(_waiting(study))


def requeue_interrupted(study: optuna.Study, objective: Objective) -> bool:
    """After an interrupt inside a trial: fail it (if Optuna has not) and queue its candidate."""
    trial, objective.current = objective.current, None
    if trial is None:
        return False
    frozen = study._storage.get_trial(trial._trial_id)
    if frozen.state == TrialState.RUNNING:
        fail_trial(study, frozen)
        frozen = study._storage.get_trial(trial._trial_id)
    return frozen.state == TrialState.FAIL and requeue(study, frozen)


def optimize(study: optuna.Study, objective: Objective, trials: int, callbacks=(),
             max_free: int = 50, info: dict | None = None, poll_s: float = 0.5) -> int:
    """Work on the study until it is done; returns how many trials this call ran.

    Done means: ``trials`` candidates measured (:func:`budget_trials`, all workers together),
    nothing queued, and every trial that was running when this worker ran out of work has ended
    or been recovered (its candidate queued again and measured here). Free trials (static
    prunes, copies) do not count, but at most ``max_free`` per budget trial are run, so a space
    that is all pruned or exhausted still ends. An interrupt (Ctrl-C, SIGTERM) queues the
    interrupted trial's candidate again before it propagates.
    """
    ran, cap, watched = 0, trials * max_free, None

    def stop(study_, _trial) -> None:
        nonlocal ran
        ran += 1
        interrupts.checkpoint()  # between trials: a safe place to stop
        if not needs_work(study_, trials):
            study_.stop()

    register_worker(study, info)
    while True:
        if needs_work(study, trials):
            if ran >= cap:
                break
            try:
                study.optimize(objective, n_trials=cap - ran, callbacks=[stop, *callbacks],
                               catch=())
            except KeyboardInterrupt:
                requeue_interrupted(study, objective)
                raise
            continue
        if objective.stale(study):
            continue  # candidates of dead workers were queued: measure them
        running = {t._trial_id for t in study.get_trials(deepcopy=False,
                                                           states=(TrialState.RUNNING,))
                   if objective.stale.watchable(t)}
        watched = running if watched is None else watched & running
        if not watched:
            break
        with interrupts.interruptible():
            time.sleep(poll_s)
    return ran


def best_complete(study: optuna.Study):
    """The best COMPLETE trial, or None when every trial was pruned or failed."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return min(complete, key=lambda t: (t.value, t.number)) if complete else None
