"""The whole tuning pipeline with the deterministic synthetic cost (fast, no kernels)."""

import json

import optuna
import pytest

from kgen.cli import main
from kgen.db.store import TuningStore
from kgen.device import pseudo_device
from kgen.tune.measure import Measurement, SyntheticMeasurer
from kgen.tune.search import default_variant, params_of, search_space
from kgen.tune.storage import open_storage
from kgen.tune.study import budget_trials
from kgen.tune.tuner import TuneSettings, tune
from kgen.workload import Workload

W1 = Workload("synthetic", "fp16", 128, 16, 4, 1, 8192)
W2 = Workload("synthetic", "fp16", 128, 16, 4, 2, 8192)


def _settings(tmp_path, **kw):
    kw.setdefault("trials", 60)
    return TuneSettings(measurer=SyntheticMeasurer(), device=pseudo_device("synthetic"),
                        db_dir=tmp_path, **kw)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    root = tmp_path_factory.mktemp("db")
    settings = _settings(root)
    return settings, tune(settings, [W1, W2])


def test_finds_the_known_optimum_within_the_budget(tuned):
    settings, results = tuned
    model = SyntheticMeasurer()
    for result in results:
        best_config, best_cost = model.optimum(result.workload)
        assert result.time_ms <= best_cost * 1.03, (result.best.key, best_config.key)
        ideal = model.ideal(result.workload)
        assert result.best.split_k == ideal["split_k"]  # the dominant axis exactly
        assert result.default_time_ms == pytest.approx(model.cost(default_variant(result.workload),
                                                                  result.workload))
        # the re-measured default (split-K auto) is slower than the optimum the model defines
        assert result.default_time_ms > best_cost
        assert result.speedup == pytest.approx(result.default_time_ms / result.time_ms)


def test_database_entries_and_trial_log(tuned):
    settings, results = tuned
    store = TuningStore(settings.db_dir, "synthetic")
    table = store.load_best()
    assert set(table["entries"]) == {W1.key, W2.key}
    for result in results:
        entry = table["entries"][result.workload.key]
        assert entry["config_key"] == result.best.key
        assert entry["time_ms"] == pytest.approx(result.time_ms)
        assert entry["trials"] == 60
        prov = entry["provenance"]
        assert prov["gpu"] == "synthetic" and prov["sampler"] == "tpe" and prov["seed"] == 0
        assert prov["triton"] and prov["kgen"] and prov["date"]
    records = store.read_trials()
    assert records[0]["type"] == "provenance"
    assert [r["type"] for r in records].count("provenance") == 1  # one run, described once
    trials = [r for r in records if r["type"] == "trial"]
    search = [r for r in trials if r["phase"] == "search"]
    assert {r["workload_key"] for r in search} == {W1.key, W2.key}
    pruned = [r for r in search if r["status"] == "pruned"]
    assert pruned and all(r["reason"].startswith("static prune:") for r in pruned)
    finals = [r for r in trials if r["phase"].startswith("final")]
    assert len(finals) == 4  # winner + default per workload
    # the whole log's configs are distinct per workload (duplicates are answered from the study)
    for key in (W1.key, W2.key):
        configs = [r["config_key"] for r in search if r["workload_key"] == key]
        assert len(configs) == len(set(configs))


def test_warm_start_queues_default_then_neighbour_winner(tuned):
    settings, results = tuned
    storage = open_storage(settings.storage_location).optuna
    first = optuna.load_study(study_name=W1.key, storage=storage)
    second = optuna.load_study(study_name=W2.key, storage=storage)
    assert first.trials[0].params == params_of(W1, default_variant(W1))
    assert second.trials[0].params == params_of(W2, default_variant(W2))
    # W1's winner was queued second for its neighbour W2
    assert second.trials[1].params == params_of(W2, results[0].best)


def test_same_seed_same_result(tmp_path):
    a = tune(_settings(tmp_path / "a", trials=15), [W1])[0]
    b = tune(_settings(tmp_path / "b", trials=15), [W1])[0]
    assert a.best == b.best and a.time_ms == b.time_ms


def test_existing_study_needs_resume_and_resume_adds_trials(tmp_path):
    tune(_settings(tmp_path, trials=5), [W1])
    with pytest.raises(ValueError, match="--resume"):
        tune(_settings(tmp_path, trials=5), [W1])
    result = tune(_settings(tmp_path, trials=12, resume=True), [W1])[0]
    assert result.trials == 12


def test_grid_and_random_samplers_run(tmp_path):
    for sampler in ("grid", "random"):
        result = tune(_settings(tmp_path / sampler, trials=10, sampler=sampler), [W1])[0]
        assert result.trials == 10 and result.best is not None


def test_failed_candidates_never_win(tmp_path):
    class Liar(SyntheticMeasurer):
        """Reports the fastest time for wrong kernels (status failed)."""

        def _measure(self, config, workload):
            if config.num_warps == 2:
                return Measurement("failed", reason="wrong result: max abs error 3 vs reference")
            return super()._measure(config, workload)

    settings = TuneSettings(measurer=Liar(), device=pseudo_device("synthetic"), db_dir=tmp_path,
                            trials=30)
    result = tune(settings, [W1])[0]
    assert result.best.num_warps != 2
    failed = [r for r in TuningStore(tmp_path, "synthetic").read_trials()
              if r["type"] == "trial" and r["status"] == "failed"]
    assert failed and all("wrong result" in r["reason"] for r in failed)


def test_settings_validate(tmp_path):
    with pytest.raises(ValueError, match="trials=0"):
        _settings(tmp_path, trials=0)
    with pytest.raises(ValueError, match="sampler='bayes'"):
        _settings(tmp_path, sampler="bayes")


@pytest.mark.parametrize("field, value", [("head_dim", 128.0), ("block_size", True),
                                          ("group_size", 4.0), ("batch", 2.0)])
def test_workload_fields_must_be_integers(field, value):
    fields = dict(gpu="synthetic", dtype="fp16", head_dim=128, block_size=16, group_size=4,
                  batch=1, context=512)
    with pytest.raises(ValueError, match=f"{field}={value!r}"):
        Workload(**{**fields, field: value})


def test_search_space_caps_split_by_pages():
    space = search_space(Workload("synthetic", "fp16", 128, 256, 1, 1, 512))
    assert space["split_k"] == (0, 1, 2)  # auto first; 2 pages of 256 tokens: more splits are empty


def test_cli_synthetic_end_to_end(tmp_path, capsys):
    code = main(["tune", "--gpu", "synthetic", "--trials", "6", "--db", str(tmp_path),
                 "--batch", "1,4", "--context", "1024", "--block-size", "16,32", "--quiet"])
    out = capsys.readouterr().out
    assert code == 0
    assert "synthetic-fp16-d128-b16-g1-n4-c1024" in out and "fastest block size for fp16-d128" in out
    table = json.loads((tmp_path / "synthetic" / "best.json").read_text())
    assert len(table["entries"]) == 4
    assert table["block_size_defaults"]["fp16-d128"]["block_size"] in (16, 32)
    assert main(["db", "check", "--db", str(tmp_path)]) == 0
    assert main(["db", "show", "--db", str(tmp_path), "--gpu", "synthetic"]) == 0
    shown = capsys.readouterr().out
    assert shown.count("synthetic  fp16") == 4


def test_cli_bad_list_value(tmp_path, capsys):
    assert main(["tune", "--gpu", "synthetic", "--batch", "1,x", "--db", str(tmp_path)]) == 2
    assert "--batch='1,x'" in capsys.readouterr().err
    assert main(["tune", "--gpu", "synthetic", "--batch", "3", "--db", str(tmp_path)]) == 2
    assert "--batch=3" in capsys.readouterr().err


def test_rdb_storage_url(tmp_path):
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    first = tune(_settings(tmp_path / "db", trials=6, storage=url), [W1])[0]
    assert first.trials == 6 and not (tmp_path / "db" / "synthetic" / "journal.log").exists()
    again = tune(_settings(tmp_path / "db", trials=9, storage=url, resume=True), [W1])[0]
    assert again.trials == 9
    study = optuna.load_study(study_name=W1.key, storage=url)
    assert len(budget_trials(study)) == 9


def test_runtime_import_path_stays_light():
    """kgen.dispatch and the db lookup import neither optuna nor pandas (nor torch until used)."""
    import subprocess
    import sys

    code = ("import sys, kgen.dispatch, kgen.db.lookup, kgen.db.store, kgen.db.check; "
            "bad = [m for m in ('optuna', 'pandas', 'torch', 'triton', 'filelock') if m in sys.modules]; "
            "print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_winner_wrong_on_re_measure_is_not_recorded(tmp_path):
    """The final re-measure runs the correctness check again on fresh inputs: a winner that fails
    it is never stored; the default (correct) takes its place."""
    default = default_variant(W1)

    class Flaky(SyntheticMeasurer):
        """Every candidate but the default is wrong the second time it is measured."""

        def __init__(self):
            super().__init__()
            self.seen = set()

        def _measure(self, config, workload):
            if config != default and config.key in self.seen:
                return Measurement("failed", reason="wrong result: max abs error 3 vs reference")
            self.seen.add(config.key)
            return super()._measure(config, workload)

    settings = TuneSettings(measurer=Flaky(), device=pseudo_device("synthetic"), db_dir=tmp_path,
                            trials=15)
    result = tune(settings, [W1])[0]
    finals = {r["phase"]: r for r in TuningStore(tmp_path, "synthetic").read_trials()
              if r["type"] == "trial" and r["phase"].startswith("final")}
    assert finals["final-winner"]["status"] == "failed"  # the study's winner was not the default
    assert finals["final-winner"]["config_key"] != default.key
    assert result.best == default
    entry = TuningStore(tmp_path, "synthetic").load_best()["entries"][W1.key]
    assert entry["config_key"] == default.key
    assert entry["time_ms"] == pytest.approx(SyntheticMeasurer().cost(default, W1))
