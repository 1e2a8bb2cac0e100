"""Runs on one ``--db``: one claim per study, the faster finished entry stays, --resume skips
finished workloads.

Before: two runs started together both passed the "already has trials" guard (it counted only
finished trials, and took no claim), tuned the one study and each wrote its winner, the later
replacing a faster entry with a slower one; ``--resume`` re-measured finished workloads and
rewrote their entries (noise flipped winners).
"""

import json
import subprocess
import sys
import time

import optuna

from kgen.cli import main
from kgen.db.store import TuningStore
from kgen.device import pseudo_device
from kgen.tune.measure import SyntheticMeasurer
from kgen.tune.storage import open_storage
from kgen.tune.tuner import TuneSettings, tune
from kgen.workload import Workload

W = Workload("synthetic", "fp16", 128, 16, 4, 1, 8192)
SHAPE = ["--batch", "1", "--context", "8192", "--group-size", "4", "--quiet"]


def _cli(db, *extra, seed=0, delay=0.0):
    cmd = [sys.executable, "-m", "kgen.cli", "tune", "--gpu", "synthetic", "--db", str(db),
           "--seed", str(seed), *SHAPE, *extra]
    env = {**__import__("os").environ, "KGEN_SYNTHETIC_DELAY_S": str(delay)}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _lines(db, phase_prefix=""):
    return [r for r in TuningStore(db, "synthetic").read_trials()
            if r["type"] == "trial" and r.get("phase", "").startswith(phase_prefix)]


def test_two_runs_started_together_one_tunes_the_other_is_refused_before_writing(tmp_path):
    db = tmp_path / "db"
    procs = [_cli(db, "--trials", "10", seed=seed, delay=0.05) for seed in (1, 2)]
    outs = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], outs
    refused = next(err for p, (_, err) in zip(procs, outs) if p.returncode == 2)
    assert "pass --resume" in refused and W.key in refused
    winner_seed = next(seed for p, seed in zip(procs, (1, 2)) if p.returncode == 0)
    runs = {r["provenance"]["seed"] for r in TuningStore(db, "synthetic").read_trials()
            if r["type"] == "provenance"}
    assert runs == {winner_seed}  # the refused run wrote no trial line
    assert len(_lines(db, "final-winner")) == 1


def test_a_run_that_has_started_but_finished_no_trial_holds_its_study(tmp_path):
    """The old guard counted finished trials only: a run in its first (slow) trial let a second
    run in. Now the study is claimed before anything is measured."""
    db = tmp_path / "db"
    first = _cli(db, "--trials", "3", delay=1.5)
    journal = db / "synthetic" / "journal.log"
    deadline = time.time() + 60
    while time.time() < deadline:
        time.sleep(0.1)
        try:
            study = optuna.load_study(study_name=W.key, storage=open_storage(str(journal)).optuna)
        except (FileNotFoundError, KeyError):
            continue
        if study.get_trials(states=(optuna.trial.TrialState.RUNNING,)):
            break
    assert not [t for t in study.trials if t.state.is_finished()]  # inside its first trial
    try:
        assert main(["tune", "--gpu", "synthetic", "--db", str(db), "--trials", "3", *SHAPE]) == 2
    finally:
        first.communicate(timeout=120)
    assert first.returncode == 0


class _Slower(SyntheticMeasurer):
    """The same cost model, every time tripled (a busier GPU, a noisy re-measure)."""

    def cost(self, config, workload):
        return 3 * super().cost(config, workload)


def _settings(db, measurer, **kw):
    return TuneSettings(measurer=measurer, device=pseudo_device("synthetic"), db_dir=db, **kw)


def test_a_finished_entry_is_not_replaced_by_a_slower_measurement(tmp_path, capsys):
    first = tune(_settings(tmp_path, SyntheticMeasurer(), trials=6), [W])[0]
    store = TuningStore(tmp_path, "synthetic")
    recorded = store.load_best()["entries"][W.key]
    # more trials on the same study, measured 3x slower: its winner's re-measure is slower
    second = tune(_settings(tmp_path, _Slower(), trials=10, resume=True), [W])[0]
    entry = store.load_best()["entries"][W.key]
    assert entry == recorded and second.time_ms == first.time_ms == entry["time_ms"]
    winners = [r["time_ms"] for r in _lines(tmp_path, "final-winner")]
    assert len(winners) == 2 and min(winners) == entry["time_ms"] < max(winners)  # both logged
    assert "kept the recorded" in capsys.readouterr().err


def test_resume_skips_finished_workloads(tmp_path, capsys):
    w2 = Workload("synthetic", "fp16", 128, 16, 4, 2, 8192)
    tune(_settings(tmp_path, SyntheticMeasurer(), trials=5), [W])
    best = (tmp_path / "synthetic" / "best.json").read_bytes()
    logged = len(_lines(tmp_path))
    # a noisier measurer would flip the winner if the finished workload were re-measured
    results = tune(_settings(tmp_path, _Slower(seed=7), trials=5, resume=True), [W, w2])
    assert len(_lines(tmp_path, "final")) == 4  # W's two final lines, then w2's: W not re-measured
    assert [r for r in _lines(tmp_path)[:logged]] == _lines(tmp_path)[:logged]
    table = json.loads((tmp_path / "synthetic" / "best.json").read_text())
    assert table["entries"][W.key] == json.loads(best)["entries"][W.key]  # not rewritten
    assert w2.key in table["entries"]
    assert results[0].time_ms == table["entries"][W.key]["time_ms"] and results[0].trials == 5
    assert f"{W.key}: finished by an earlier run" in capsys.readouterr().err
