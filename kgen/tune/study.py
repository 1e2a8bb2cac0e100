"""One Optuna study per workload: sampler, warm start, recovery, the objective, the loop.

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
import socket
import time
import warnings
import zlib

import optuna

from kgen.paths import template_hash
from kgen.tune import interrupts
from kgen.tune.claims import NullClaims
from kgen.tune.measure import Measurement, Measurer
from kgen.tune.search import PARAM_NAMES, config_for, grid_space, params_of, search_space
from kgen.workload import Workload

TrialState = optuna.trial.TrialState
SAMPLERS = ("tpe", "random", "grid")
DONE_STATES = (TrialState.COMPLETE, TrialState.PRUNED)
# The host a worker records (fleet tests run "machines" on one host by naming them).
HOST = os.environ.get("KGEN_HOST") or socket.gethostname()
# Split-K is searched as categories: ``auto`` (index 0) performs unlike its neighbour 1, so an
# ordinal split axis misleads TPE; the other axes are ordinal (neighbours perform alike).
CATEGORICAL = ("split_k_idx",)
OWNERLESS_GRACE_S = 30.0  # a running trial that never named its candidate for this long is dead


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
    current = template_hash()
    recorded = study.user_attrs.get(TEMPLATE_ATTR)
    if recorded is None:
        study.set_user_attr(TEMPLATE_ATTR, current)
    elif recorded != current:
        raise ValueError(f"study {workload.key!r} in {storage.location} was measured against "
                         f"kernel templates {recorded}, these are {current}: its times do not "
                         f"apply; tune into a new --storage / --db, or delete that study")
    return study


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


def register_worker(study: optuna.Study, info: dict | None = None) -> None:
    """Note this process (and its provenance, for ``kgen db import``) in the study before it
    creates any trial (see :func:`recover_orphans`)."""
    study.set_user_attr(f"{WORKER_PREFIX}{HOST}:{os.getpid()}", info or True)


def workers(study: optuna.Study) -> dict[tuple[str, int], dict]:
    """(host, pid) -> what the worker registered, for every worker of the study."""
    out = {}
    for name, value in study.user_attrs.items():
        if name.startswith(WORKER_PREFIX):
            host, _, pid = name[len(WORKER_PREFIX):].rpartition(":")
            if pid.isdigit():
                out[(host, int(pid))] = value if isinstance(value, dict) else {}
    return out


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
    return params if set(params) == set(PARAM_NAMES) else None


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


def _fail(study: optuna.Study, trial) -> bool:
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
        if _fail(study, trial):
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
            if now - first > OWNERLESS_GRACE_S and _fail(study, trial):
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
                      zip(PARAM_NAMES, search_space(workload).values())}

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
        _fail(study, frozen)
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
    def stop(study_, _trial) -> None:
        interrupts.checkpoint()  # between trials: a safe place to stop
        if not needs_work(study_, trials):
            study_.stop()

    register_worker(study, info)
    ran, cap, watched = 0, trials * max_free, None
    while True:
        if needs_work(study, trials):
            if ran >= cap:
                break
            before = len(study.get_trials(deepcopy=False))
            try:
                study.optimize(objective, n_trials=cap - ran, callbacks=[stop, *callbacks],
                               catch=())
            except KeyboardInterrupt:
                requeue_interrupted(study, objective)
                raise
            ran += len(study.get_trials(deepcopy=False)) - before
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
