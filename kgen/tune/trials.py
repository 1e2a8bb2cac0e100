"""What kgen records on Optuna trials and studies, and how it reads them back.

A trial's ``run`` user attribute names its candidate and worker (``config_key``, ``host``,
``pid``); ``outcome`` holds how it ended (``status`` ok / pruned / failed, ``reason``, ``cached``
for a copy of another trial's measurement, ``static`` for a static prune). Each worker registers
itself in the study (``worker:<host>:<pid>``) with its provenance.
"""

from __future__ import annotations

import os
import socket

import optuna

TrialState = optuna.trial.TrialState
DONE_STATES = (TrialState.COMPLETE, TrialState.PRUNED)
# The host a worker records (fleet tests run "machines" on one host by naming them).
HOST = os.environ.get("KGEN_HOST") or socket.gethostname()


def done_trials(study: optuna.Study) -> list:
    return study.get_trials(deepcopy=False, states=DONE_STATES)


def trial_info(trial) -> dict:
    """``{"config_key", "host", "pid"}`` of a trial (empty before it suggested its params)."""
    return trial.user_attrs.get("run", {})


def trial_outcome(trial) -> dict:
    """``{"status": ok|pruned|failed, "reason", "cached", "static"}`` of a finished trial."""
    return trial.user_attrs.get("outcome", {"status": "ok", "reason": None, "cached": False,
                                            "static": False})


def status_counts(trials) -> dict[str, int]:
    """How many of ``trials`` ended ok / pruned / failed (every key present, zero or not)."""
    counts = {"ok": 0, "pruned": 0, "failed": 0}
    for trial in trials:
        status = trial_outcome(trial)["status"]
        counts[status] = counts.get(status, 0) + 1
    return counts


def budget_trials(study: optuna.Study) -> list:
    """The done trials that count toward ``--trials``: candidates really built and measured (or
    failed / pruned by the audit), not free ones (static prune, repeats answered from the study)."""
    return [t for t in done_trials(study)
            if not trial_outcome(t)["cached"] and not trial_outcome(t).get("static")]


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
