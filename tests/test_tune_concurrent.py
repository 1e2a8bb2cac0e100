"""Several processes on one study lose no trial; a killed run resumes with --resume."""

import os
import signal
import subprocess
import sys
import time

import optuna

from kgen.cli import main
from kgen.db.check import check_db
from kgen.db.store import TuningStore
from kgen.tune.search import PARAM_NAMES
from kgen.tune.storage import open_storage
from kgen.tune.study import budget_trials, trial_info, trial_outcome
from kgen.workload import Workload

W = Workload("synthetic", "fp16", 128, 16, 4, 1, 8192)

# A tuning process with a slow synthetic measurer (so processes overlap, or die mid-trial).
SCRIPT = """
import sys
from kgen.device import pseudo_device
from kgen.tune.measure import SyntheticMeasurer
from kgen.tune.tuner import TuneSettings, tune
from kgen.workload import Workload
db, trials, delay = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
settings = TuneSettings(measurer=SyntheticMeasurer(delay_s=delay), device=pseudo_device("synthetic"),
                        db_dir=db, trials=trials, resume=True)
result = tune(settings, [Workload.from_key(sys.argv[4])])[0]
print("done", result.trials, result.best.key)
"""


def _spawn(tmp_path, trials, delay):
    script = tmp_path / "tune_worker.py"
    script.write_text(SCRIPT)
    return subprocess.Popen([sys.executable, str(script), str(tmp_path / "db"), str(trials),
                             str(delay), W.key], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _study(tmp_path):
    store = TuningStore(tmp_path / "db", "synthetic")
    return optuna.load_study(study_name=W.key, storage=open_storage(str(store.journal_path)).optuna)


def _assert_log_matches_study(tmp_path, study, orphans=frozenset()):
    """Every trial measured by any process is in the trial log exactly once, and vice versa
    (a trial whose process was killed after logging it but before telling Optuna is an orphan:
    failed in the study, possibly logged)."""
    records = TuningStore(tmp_path / "db", "synthetic").read_trials()
    logged = [r["trial"] for r in records if r["type"] == "trial" and r["phase"] == "search"]
    assert len(logged) == len(set(logged))
    measured = {t.number for t in study.get_trials(deepcopy=False)
                if t.state.is_finished() and t.state != optuna.trial.TrialState.FAIL
                and not trial_outcome(t)["cached"]}
    assert measured <= set(logged) <= measured | set(orphans)
    # no candidate measured twice by concurrent workers (they used to draw the same ones)
    keys = [trial_info(t)["config_key"] for t in budget_trials(study)]
    assert len(keys) == len(set(keys))


def test_two_processes_on_one_study_lose_no_trial(tmp_path):
    procs = [_spawn(tmp_path, 30, 0.02) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    for proc, (out, err) in zip(procs, outs):
        assert proc.returncode == 0, err
        assert out.startswith("done")
    study = _study(tmp_path)
    done = budget_trials(study)
    assert 30 <= len(done) <= 31  # the budget is shared; the last racing trial may overshoot
    pids = {trial_info(t)["pid"] for t in done}
    assert len(pids) == 2  # both processes did work on the one study
    _assert_log_matches_study(tmp_path, study)
    assert all(r.problem is None for r in check_db(tmp_path / "db"))
    best = TuningStore(tmp_path / "db", "synthetic").load_best()["entries"][W.key]
    assert best["trials"] >= 30


def test_resume_after_a_killed_run(tmp_path):
    proc = _spawn(tmp_path, 40, 0.2)
    deadline = time.time() + 60
    while time.time() < deadline:
        time.sleep(0.2)
        try:
            complete = _study(tmp_path).get_trials(states=(optuna.trial.TrialState.COMPLETE,))
        except (FileNotFoundError, KeyError):  # journal or study not created yet
            continue
        if len(complete) >= 4:
            break
    assert proc.poll() is None, "the tuning process ended before it could be killed"
    time.sleep(0.1)  # land inside a trial's measurement
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = _study(tmp_path)
    running = [t for t in before.trials if t.state == optuna.trial.TrialState.RUNNING]
    assert len(budget_trials(before)) < 40
    assert not (tmp_path / "db" / "synthetic" / "best.json").exists()  # killed before finishing

    # without --resume the half-done study is refused; with it, the run completes
    args = ["tune", "--gpu", "synthetic", "--trials", "40", "--db", str(tmp_path / "db"),
            "--batch", "1", "--context", "8192", "--group-size", "4", "--quiet"]
    assert main(args) == 2
    assert main(args + ["--resume"]) == 0
    after = _study(tmp_path)
    states = [t.state for t in after.trials]
    assert states.count(optuna.trial.TrialState.RUNNING) == 0
    assert states.count(optuna.trial.TrialState.FAIL) == len(running)  # orphans marked failed
    assert len(budget_trials(after)) == 40
    for orphan in running:
        # killed after choosing a variant: that variant was queued again and measured; killed
        # between Optuna creating the trial and its first suggestion: nothing to queue
        if set(orphan.params) == set(PARAM_NAMES):
            assert any(t.params == orphan.params and t.state != optuna.trial.TrialState.FAIL
                       for t in after.trials)
    _assert_log_matches_study(tmp_path, after, orphans={t.number for t in running})
    entry = TuningStore(tmp_path / "db", "synthetic").load_best()["entries"][W.key]
    assert entry["trials"] == 40


def test_cli_workers(tmp_path, capsys):
    code = main(["tune", "--gpu", "synthetic", "--trials", "12", "--workers", "2", "--quiet",
                 "--db", str(tmp_path / "db"), "--batch", "1", "--context", "8192",
                 "--group-size", "4"])
    assert code == 0, capsys.readouterr().err
    study = _study(tmp_path)
    assert 12 <= len(budget_trials(study)) <= 13
    _assert_log_matches_study(tmp_path, study)
