"""bench/host_overhead.py: its phases add up to the step, its fit is least squares, and a --quick
run writes a table and JSON with provenance."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import host_overhead  # noqa: E402


def test_fit_recovers_a_line_and_its_least_squares_slope():
    rows = [{"batch": b, "us_per_step": 300.0 + 12.5 * b} for b in (1, 8, 32, 64)]
    f = host_overhead.fit(rows)
    assert f["fixed_us"] == pytest.approx(300.0) and f["per_seq_us"] == pytest.approx(12.5)
    noisy = [{"batch": 1, "us_per_step": 10.0}, {"batch": 2, "us_per_step": 14.0}, {"batch": 3, "us_per_step": 15.0}]
    f = host_overhead.fit(noisy)  # slope = cov/var = (-1*-3 + 0 + 1*2) / 2
    assert f["per_seq_us"] == pytest.approx(2.5) and f["fixed_us"] == pytest.approx(13.0 - 2.5 * 2)


def test_quick_run_times_every_phase_and_writes_its_results(tmp_path):
    import torch

    out = tmp_path / "h.json"
    before = torch.get_num_threads()
    assert host_overhead.main(["--quick", "--json", str(out), "--md", str(tmp_path / "h.md")]) == 0
    res = json.loads(out.read_text())
    assert [r["batch"] for r in res["rows"]] == [1, 4] and res["provenance"]["commit"]
    for r in res["rows"]:
        ph = r["phases_us_per_step"]
        assert set(ph) == set(host_overhead.PHASES)
        assert sum(ph.values()) == pytest.approx(r["us_per_step"], rel=1e-6)
        assert min(ph[p] for p in ("schedule", "batch", "model", "sample")) > 0
        assert r["us_per_seq_step"] == pytest.approx(r["us_per_step"] / r["batch"])
    assert "| batch | us/step |" in (tmp_path / "h.md").read_text()
    assert torch.get_num_threads() == before  # the run's thread count does not leak


def test_bad_batches_are_refused_naming_the_value(capsys):
    with pytest.raises(SystemExit):
        host_overhead.main(["--batches", "4,0"])
    assert "--batches='4,0'" in capsys.readouterr().err
