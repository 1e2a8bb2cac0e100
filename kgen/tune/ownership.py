"""Which ``kgen tune`` run a study belongs to, and whether its workload is finished.

Two study user attributes, written under the GPU folder's lock (:meth:`TuningStore.lock`):

``kgen_run``
    The run that claimed the study (``<host>:<pid>:<nonce>``). A run without ``--resume`` claims
    every study it will tune before it measures anything, and only studies that have no trial
    and no claim: the check and the claim happen under one lock, so of two runs started at once
    on one ``--db`` exactly one gets the studies and the other is refused before it writes.
    ``--resume`` takes a claim over (the claiming run died, or the user says so).
``kgen_final``
    Set when a run wrote the workload's ``best.json`` entry (``config_key``, ``time_ms``,
    ``trials``). A later ``--resume`` with no more trials to run skips that workload: nothing is
    re-measured and its entry is not rewritten.

An explicit ``--storage`` is shared by design (a fleet joins one study), so it is not claimed.
"""

from __future__ import annotations

import os
import uuid

from kgen.tune.trials import HOST, done_trials

RUN_ATTR = "kgen_run"
FINAL_ATTR = "kgen_final"


def new_run_id() -> str:
    """A name for one ``kgen tune`` run, unique across processes and hosts."""
    return f"{HOST}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def refusal(study, run_id: str) -> str | None:
    """Why a run without ``--resume`` may not take ``study``, or None when it may."""
    trials = study.get_trials(deepcopy=False)
    if trials:
        return f"already has {len(done_trials(study))} finished trials ({len(trials)} in all)"
    owner = study.user_attrs.get(RUN_ATTR)
    if owner is not None and owner != run_id:
        return f"was claimed by another kgen tune run ({owner}) that is still starting or died before its first trial"
    return None


def claim(study, run_id: str) -> None:
    """Mark ``study`` as this run's (call under the GPU folder's lock, after :func:`refusal`)."""
    if study.user_attrs.get(RUN_ATTR) != run_id:
        study.set_user_attr(RUN_ATTR, run_id)


def mark_final(study, entry: dict) -> None:
    """Record that the workload's best.json entry is written (``entry``: the one kept there)."""
    study.set_user_attr(FINAL_ATTR, {"config_key": entry["config_key"], "time_ms": entry["time_ms"],
                                     "trials": entry["trials"]})


def final(study) -> dict | None:
    """What :func:`mark_final` recorded, or None when the workload was never finished."""
    value = study.user_attrs.get(FINAL_ATTR)
    return value if isinstance(value, dict) else None
