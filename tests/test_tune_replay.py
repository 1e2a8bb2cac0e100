"""The replay measurer and the offline score: trials until within 3% of a table's best."""

import pytest

from kgen.tune.measure import ReplayMeasurer, SyntheticMeasurer
from kgen.tune.replay import replay_scores, score, synthetic_table
from kgen.tune.search import all_candidates, static_prune
from kgen.workload import Workload
from kgen.variant import VariantConfig

W = Workload("h100", "fp16", 128, 64, 1, 1, 512)  # 8 pages: small split-K axis


def test_replay_measurer_reads_the_table():
    config = VariantConfig(head_dim=128, block_size=64)
    table = {W.key: {config.key: 0.25}}
    replay = ReplayMeasurer(table, device="h100")
    assert replay.measure(config, W).time_ms == 0.25
    missing = replay.measure(config.replace(num_warps=8), W)
    assert missing.status == "failed" and "not in the replay table" in missing.reason
    assert replay.best(W) == (config.key, 0.25)
    with pytest.raises(ValueError, match="table"):
        ReplayMeasurer({})


def test_replay_table_from_a_trial_log_takes_medians():
    a, b = VariantConfig(head_dim=128, block_size=64), VariantConfig(head_dim=128, block_size=64,
                                                                    num_warps=8)
    records = [{"type": "trial", "workload_key": W.key, "config_key": a.key, "status": "ok",
                "time_ms": t} for t in (3.0, 1.0, 2.0)]
    records += [{"type": "trial", "workload_key": W.key, "config_key": b.key, "status": "failed",
                 "time_ms": None, "reason": "wrong"},
                {"type": "provenance", "id": "x"}]
    replay = ReplayMeasurer.from_trials(records)
    assert replay.table == {W.key: {a.key: 2.0}}


def test_synthetic_table_has_every_valid_candidate():
    table = synthetic_table([W])
    valid = [c for c in all_candidates(W) if static_prune(c) is None
             and not (c.tile_tokens == 16 and c.num_warps == 16)]
    assert set(table[W.key]) == {c.key for c in valid}
    best_key = min(table[W.key], key=table[W.key].get)
    assert best_key == SyntheticMeasurer().optimum(W)[0].key


def test_grid_always_reaches_the_target_within_the_grid():
    table = synthetic_table([W])
    target = min(table[W.key].values()) * 1.03
    size = len(all_candidates(W))
    result = score(ReplayMeasurer(table), W, target_ms=target, sampler="grid", seed=1,
                   budget=10_000)
    assert result.trials is not None and result.trials <= size
    assert result.best_ms <= target
    assert result.measured <= len(table[W.key])  # never more measurements than valid configs


def test_tpe_scores_on_the_synthetic_table():
    scores = replay_scores(synthetic_table([W]), samplers=("tpe", "random"), seeds=(0,), budget=120)
    by = {s.sampler: s for s in scores}
    assert by["tpe"].trials is not None and by["tpe"].best_ms <= by["tpe"].target_ms
    for s in scores:
        assert s.trials is None or s.measured <= s.trials <= 120
