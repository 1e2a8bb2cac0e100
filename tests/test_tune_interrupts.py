"""Interrupted and damaged runs, as a user meets them: SIGTERM, Ctrl-C with workers, a stale
journal lock with a relative --db, a cut trial log, a queued candidate after the budget is met."""

import os
import signal
import subprocess
import sys
import time

import optuna
import pytest

from kgen.cli import main
from kgen.db.check import check_db
from kgen.db.store import TuningStore
from kgen.tune.search import params_of, static_prune
from kgen.tune.storage import open_storage
from kgen.tune.study import HOST, TEMPLATE_ATTR, budget_trials, trial_info
from kgen.variant import VariantConfig
from kgen.workload import Workload

TrialState = optuna.trial.TrialState
W = Workload("synthetic", "fp16", 128, 16, 4, 1, 8192)
SHAPE = ["--batch", "1", "--context", "8192", "--group-size", "4"]


def _tune(cwd, db, trials, *extra, delay_s=0.0, **popen):
    env = {**os.environ, "KGEN_SYNTHETIC_DELAY_S": str(delay_s)}
    args = [sys.executable, "-m", "kgen.cli", "tune", "--gpu", "synthetic", "--trials",
            str(trials), "--db", str(db), "--quiet", *SHAPE, *extra]
    return subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)


def _study(journal):
    return optuna.load_study(study_name=W.key, storage=open_storage(str(journal)).optuna)


def _timed(trial) -> bool:
    """Whether a running trial named a candidate that is really measured (a static prune ends
    at once, without the measurement's delay)."""
    key = trial_info(trial).get("config_key")
    return key is not None and static_prune(VariantConfig.from_key(key)) is None


def _wait_for_measuring(journal, count, proc, timeout=90):
    """Until ``count`` trials are inside their measurement (named a timed candidate, running)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            running = _study(journal).get_trials(states=(TrialState.RUNNING,))
            if len([t for t in running if _timed(t)]) >= count:
                return
        except (KeyError, FileNotFoundError):  # not created yet
            pass
        time.sleep(0.1)
    raise AssertionError("the run made no progress")


def _assert_interrupted_candidates_measured(study):
    """Every trial failed by an interrupt that had chosen a candidate was queued again, and the
    queued copy ran; returns those trials."""
    trials = study.get_trials(deepcopy=False)
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    failed = [t for t in trials if t.state == TrialState.FAIL and len(t.params) == 4]
    for trial in failed:
        again = [t for t in trials if t.user_attrs.get("requeued_from") == trial.number]
        assert len(again) == 1 and again[0].state in (TrialState.COMPLETE, TrialState.PRUNED)
    return failed


def test_sigterm_with_a_relative_db_leaves_nothing_that_blocks_resume(tmp_path):
    journal = tmp_path / "db" / "synthetic" / "journal.log"
    # relative --db, run from tmp_path; a measurement takes 5 s, so the signal lands inside one
    proc = _tune(tmp_path, "db", 40, delay_s=5.0)
    _wait_for_measuring(journal, 1, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "interrupted while tuning" in err and "trials measured and kept" in err
    assert "--resume" in err and "Traceback" not in err
    left = sorted(p.name for p in journal.parent.iterdir())
    assert "journal.log.lock" not in left, left
    resumed = _tune(tmp_path, "db", 40, "--resume")
    out, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err
    study = _study(journal)
    assert len(budget_trials(study)) >= 40
    failed = _assert_interrupted_candidates_measured(study)
    assert len(failed) == 1, [(t.number, t.state, t.params, t.user_attrs) for t in study.trials
                              if t.state == TrialState.FAIL]  # queued again and measured


def test_resume_clears_a_stale_optuna_lock_with_a_message(tmp_path):
    journal = tmp_path / "db" / "synthetic" / "journal.log"
    first = _tune(tmp_path, "db", 3)
    assert first.wait(timeout=120) == 0
    # what an interrupted Optuna symlink lock left with a relative --db: a dangling link
    os.symlink("db/synthetic/journal.log", str(journal) + ".lock")
    resumed = _tune(tmp_path, "db", 6, "--resume")
    out, err = resumed.communicate(timeout=120)  # used to spin forever without a word
    assert resumed.returncode == 0, err
    assert "removed a stale Optuna journal lock" in err and "journal.log.lock" in err
    assert not os.path.lexists(str(journal) + ".lock")
    assert len(budget_trials(_study(journal))) == 6


def test_ctrl_c_with_two_workers_stops_promptly_and_says_what_was_recorded(tmp_path):
    journal = tmp_path / "db" / "synthetic" / "journal.log"
    proc = _tune(tmp_path, "db", 60, "--workers", "2", delay_s=5.0, start_new_session=True)
    _wait_for_measuring(journal, 2, proc, timeout=120)  # both workers inside a measurement
    started = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal: the whole foreground group
    out, err = proc.communicate(timeout=60)  # used to hang in pool.join()
    took = time.monotonic() - started
    assert proc.returncode == 130, err
    assert "interrupted while tuning" in err and "trials measured and kept" in err
    left = subprocess.run(["ps", "-o", "pid,stat,args", "--no-headers", "-g", str(proc.pid)],
                          capture_output=True, text=True).stdout
    # no worker left running (an exited helper may linger as a zombie where no init reaps it)
    assert not [line for line in left.splitlines() if line.split()[1][0] != "Z"], left
    print(f"stopped {took:.1f} s after Ctrl-C")
    study = _study(journal)
    assert len(budget_trials(study)) < 60
    resumed = _tune(tmp_path, "db", 60, "--resume", "--workers", "2")
    out, err = resumed.communicate(timeout=180)
    assert resumed.returncode == 0, err
    assert len(_assert_interrupted_candidates_measured(_study(journal))) == 2
    assert all(r.problem is None for r in check_db(tmp_path / "db"))


def test_a_cut_last_trial_line_is_set_aside_before_appending(tmp_path, capsys):
    db = tmp_path / "db"
    assert main(["tune", "--gpu", "synthetic", "--trials", "4", "--db", str(db), "--quiet",
                 *SHAPE]) == 0
    log = db / "synthetic" / "trials.jsonl"
    whole = log.read_bytes()
    log.write_bytes(whole[:-40])  # killed in the middle of the last append
    kept = whole[:whole[:-40].rfind(b"\n") + 1]
    with pytest.warns(RuntimeWarning, match="cut short"):
        assert main(["tune", "--gpu", "synthetic", "--trials", "8", "--db", str(db), "--quiet",
                     "--resume", *SHAPE]) == 0
    assert log.read_bytes().startswith(kept)  # the good records are untouched
    assert TuningStore(db, "synthetic").read_trials()  # every line parses
    assert all(r.problem is None for r in check_db(db))
    aside = [p for p in log.parent.iterdir() if p.name.startswith("trials.jsonl.damaged-")]
    assert len(aside) == 1 and aside[0].read_bytes() == whole[len(kept):-40]


def test_a_queued_candidate_is_measured_when_the_budget_is_already_met(tmp_path):
    db = tmp_path / "db"
    assert main(["tune", "--gpu", "synthetic", "--trials", "6", "--db", str(db), "--quiet",
                 *SHAPE]) == 0
    journal = db / "synthetic" / "journal.log"
    study = _study(journal)
    # a process of this host died inside a trial of a candidate nobody measured
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    measured = {trial_info(t)["config_key"] for t in study.trials if trial_info(t)}
    config = next(c for c in (VariantConfig(head_dim=128, block_size=16, group_size=4, split_k=s,
                                            tile_tokens=t, num_warps=4, num_stages=2,
                                            dtype="fp16")
                              for s in (1, 2, 4, 8) for t in (32, 64))
                  if c.key not in measured)
    study.enqueue_trial(params_of(W, config))
    orphan = study.ask()
    orphan.set_user_attr("run", {"config_key": config.key, "host": HOST, "pid": dead.pid})
    assert main(["tune", "--gpu", "synthetic", "--trials", "6", "--db", str(db), "--quiet",
                 "--resume", *SHAPE]) == 0
    after = _study(journal)
    assert after.trials[orphan.number].state == TrialState.FAIL
    rerun = [t for t in after.trials if t.user_attrs.get("requeued_from") == orphan.number]
    assert len(rerun) == 1 and rerun[0].state == TrialState.COMPLETE  # not WAITING forever
    logged = [r for r in TuningStore(db, "synthetic").read_trials()
              if r["type"] == "trial" and r["phase"] == "search"]
    assert [r["trial"] for r in logged if r["config_key"] == config.key] == [rerun[0].number]


def test_a_study_measured_against_other_templates_is_refused(tmp_path, capsys):
    db = tmp_path / "db"
    assert main(["tune", "--gpu", "synthetic", "--trials", "3", "--db", str(db), "--quiet",
                 *SHAPE]) == 0
    study = _study(db / "synthetic" / "journal.log")
    study.set_user_attr(TEMPLATE_ATTR, "0123456789abcdef")
    capsys.readouterr()
    assert main(["tune", "--gpu", "synthetic", "--trials", "6", "--db", str(db), "--quiet",
                 "--resume", *SHAPE]) == 2
    err = capsys.readouterr().err
    assert "0123456789abcdef" in err and "do not apply" in err
