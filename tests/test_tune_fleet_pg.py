"""A fleet on a real PostgreSQL server: several `kgen tune --storage postgresql://...` processes.

Needs the server of ``tests/postgres.sh`` (``$KGEN_TEST_PG_URL``); fails, never skips silently,
without it (see tests/helpers_pg.py).
"""

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest

from helpers_pg import pg_url  # noqa: F401 (fixture)
from kgen.cli import main
from kgen.db.check import check_db
from kgen.db.store import TuningStore
from kgen.tune.measure import SyntheticMeasurer
from kgen.tune.search import static_prune
from kgen.tune.storage import open_storage
from kgen.tune.study import budget_trials, trial_info, trial_outcome
from kgen.variant import VariantConfig
from kgen.workload import Workload

TrialState = optuna.trial.TrialState
TRIALS = 80
A = Workload("synthetic", "fp16", 128, 16, 4, 1, 8192)
B = Workload("synthetic", "fp16", 128, 16, 4, 4, 8192)
KGEN = [sys.executable, "-m", "kgen.cli"]


def _member(url, host, batches, db, log, delay_s=0.05):
    """One fleet member ("machine" ``host``): its own process group, so it can die whole."""
    env = {**os.environ, "KGEN_HOST": host, "KGEN_SYNTHETIC_DELAY_S": str(delay_s)}
    args = [*KGEN, "tune", "--gpu", "synthetic", "--storage", url, "--trials", str(TRIALS),
            "--workers", "2", "--heartbeat", "1", "--quiet", "--group-size", "4",
            "--context", "8192", "--batch", batches, "--db", str(db)]
    return subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _study(url, workload):
    return optuna.load_study(study_name=workload.key, storage=open_storage(url).optuna)


def _wait_until(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except KeyError:  # the study does not exist yet
            pass
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def _search_records(db: Path):
    store = TuningStore(db, "synthetic")
    return [r for r in store.read_trials() if r["type"] == "trial" and r["phase"] == "search"]


def test_fleet_three_members_one_killed(pg_url, tmp_path):  # noqa: F811
    started = time.monotonic()
    logs = [open(tmp_path / f"member{i}.log", "w") for i in range(3)]
    # started together on an empty database (the table-creation race); overlapping workloads:
    # m1 and m2 start on B, m0 on A; m1 dies in B, m0 and m2 finish both
    plan = [("m0", "1,4"), ("m1", "4,1"), ("m2", "4,1")]
    # m1 is a slow machine (its trials take 0.5 s), so the kill lands inside its trials
    procs = [_member(pg_url, host, batches, tmp_path / f"db{i}", logs[i],
                     delay_s=0.5 if host == "m1" else 0.05)
             for i, (host, batches) in enumerate(plan)]
    storage = open_storage(pg_url).optuna

    def m1_mid_trial():
        trials = optuna.load_study(study_name=B.key, storage=storage).get_trials(deepcopy=False)
        done = [t for t in trials if t.state == TrialState.COMPLETE
                and trial_info(t).get("host") == "m1"]
        running = [t for t in trials if t.state == TrialState.RUNNING
                   and trial_info(t).get("host") == "m1"  # inside a timed measurement:
                   and static_prune(VariantConfig.from_key(trial_info(t)["config_key"])) is None]
        return len(done) >= 3 and len(running) == 2

    _wait_until(m1_mid_trial, 120, "member m1 to run trials of B")
    os.killpg(procs[1].pid, signal.SIGKILL)  # the whole machine: parent and both workers
    procs[1].wait()
    killed_at = time.monotonic() - started
    for i in (0, 2):
        assert procs[i].wait(timeout=240) == 0, (tmp_path / f"member{i}.log").read_text()
    ended_at = time.monotonic() - started
    for log in logs:
        log.close()
    for i in (0, 2):  # nobody crashed on the empty database
        assert "Traceback" not in (tmp_path / f"member{i}.log").read_text()

    model = SyntheticMeasurer()
    logged = [r for i in range(3) for r in _search_records(tmp_path / f"db{i}")]
    for workload in (A, B):
        study = _study(pg_url, workload)
        trials = study.get_trials(deepcopy=False)
        states = Counter(t.state for t in trials)
        assert states[TrialState.RUNNING] == 0 and states[TrialState.WAITING] == 0, states
        measured = budget_trials(study)
        failed = [t for t in trials if t.state == TrialState.FAIL]
        requeued = [t for t in trials if "requeued_from" in t.user_attrs]
        # the budget, plus at most one racing trial per other live worker, plus re-queued ones
        assert TRIALS <= len(measured) <= TRIALS + 5 + len(requeued)
        # no candidate measured twice in the study
        keys = [trial_info(t)["config_key"] for t in measured]
        assert len(keys) == len(set(keys)), Counter(keys).most_common(3)
        # every trial of the killed member that had chosen its candidate was re-queued, and the
        # candidate measured (or answered) by a survivor
        for trial in failed:
            assert trial_info(trial).get("host") == "m1"
            if trial.params:
                again = [t for t in trials if t.user_attrs.get("requeued_from") == trial.number]
                assert len(again) == 1 and again[0].state in (TrialState.COMPLETE,
                                                             TrialState.PRUNED)
        if workload == B:
            assert any(t.params for t in failed), "the kill did not land inside a trial"
        # no lost trial: each measured trial is in its member's trial log, and each logged search
        # record is a measured trial or the killed member's unfinished one
        logged_here = {(r["host"], r["trial"]) for r in logged if r["workload_key"] == workload.key}
        ran = [t for t in trials if t.state.is_finished() and t.state != TrialState.FAIL
               and not trial_outcome(t)["cached"]]  # measured, or pruned by the static rules
        assert {(trial_info(t)["host"], t.number) for t in ran} <= logged_here
        numbers = {t.number for t in ran} | {t.number for t in failed}
        assert {n for _, n in logged_here} <= numbers
        # the fleet found the synthetic optimum
        best_config, best_ms = model.optimum(workload)
        assert study.best_value == pytest.approx(best_ms)
        assert trial_info(study.best_trial)["config_key"] == best_config.key

    # the records collected from the study equal its best, with provenance of who measured
    out = tmp_path / "imported"
    assert main(["db", "import", "--storage", pg_url, "--gpu", "synthetic", "--db", str(out)]) == 0
    table = TuningStore(out, "synthetic").load_best()
    assert set(table["entries"]) == {A.key, B.key}
    for workload in (A, B):
        study = _study(pg_url, workload)
        entry = table["entries"][workload.key]
        assert entry["config_key"] == trial_info(study.best_trial)["config_key"]
        assert entry["time_ms"] == study.best_value
        assert entry["trials"] == len(budget_trials(study))
        prov = entry["provenance"]
        assert set(prov["hosts"]) == {trial_info(t)["host"] for t in budget_trials(study)}
        assert prov["template_hash"] and prov["triton_versions"] and prov["driver_versions"]
        assert "m1" in table["entries"][B.key]["provenance"]["hosts"]
    lines = [r for r in TuningStore(out, "synthetic").read_trials() if r["type"] == "trial"]
    assert len(lines) == sum(len(budget_trials(_study(pg_url, w))) for w in (A, B))
    assert all(r.problem is None for r in check_db(out))
    # importing again adds nothing
    assert main(["db", "import", "--storage", pg_url, "--gpu", "synthetic", "--db", str(out)]) == 0
    assert len([r for r in TuningStore(out, "synthetic").read_trials()
                if r["type"] == "trial"]) == len(lines)
    print(f"fleet test: m1 killed at {killed_at:.1f} s, survivors done at {ended_at:.1f} s, "
          f"checks done at {time.monotonic() - started:.1f} s")


RACE = """
import sys, time
import optuna
from kgen.tune.search import static_prune
from kgen.tune.storage import open_storage
url, start_at = sys.argv[1], float(sys.argv[2])
time.sleep(max(0.0, start_at - time.time()))
storage = open_storage(url)  # Optuna creates its tables here, all processes at once
optuna.create_study(study_name="race", storage=storage.optuna, load_if_exists=True)
print("ok")
"""


def test_members_starting_together_on_an_empty_database_all_start(pg_url, tmp_path):  # noqa: F811
    # the race seen by hand: Optuna's CREATE TYPE / CREATE TABLE from several processes at once
    # crashed some with IntegrityError; the schema is now created under an advisory lock
    script = tmp_path / "race.py"
    script.write_text(RACE)
    start_at = time.time() + 4.0  # after every interpreter has imported optuna
    procs = [subprocess.Popen([sys.executable, str(script), pg_url, str(start_at)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0 and out.strip() == "ok", err
    assert len(optuna.get_all_study_names(open_storage(pg_url).optuna)) == 1


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # trials asked by hand
def test_claims_on_postgresql(pg_url):  # noqa: F811
    storage = open_storage(pg_url)
    study = optuna.create_study(study_name="claims", storage=storage.optuna)
    first, second = study.ask(), study.ask()
    claims = storage.claims
    assert claims.claim(study, first._trial_id, "variant-a") is None
    assert claims.claim(study, second._trial_id, "variant-a") == first._trial_id
    study.tell(first, state=TrialState.FAIL)
    assert claims.claim(study, second._trial_id, "variant-a") is None
    assert claims.once(study, "warm-start") and not claims.once(study, "warm-start")
