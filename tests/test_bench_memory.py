"""The memory study: its simulators on hand-checkable cases, and a --quick run writing its outputs."""

import json
import sys
from pathlib import Path

from hypothesis import given, settings, strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import memory_sim  # noqa: E402
import memory_study  # noqa: E402


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 12), st.integers(0, 30)), max_size=40))
def test_first_fit_never_overlaps_and_merges_holes(ops):
    size = 32
    heap, owner, live = memory_sim.FirstFit(size), [None] * size, []
    for is_alloc, n, k in ops:
        if is_alloc or not live:
            start = heap.alloc(n)
            runs = [s for s in range(size - n + 1) if all(o is None for o in owner[s:s + n])]
            assert start == (runs[0] if runs else None)  # the first hole that fits
            if start is not None:
                owner[start:start + n] = [start] * n
                live.append((start, n))
        else:
            start, n = live.pop(k % len(live))
            heap.free(start, n)
            owner[start:start + n] = [None] * n
        assert sum(heap.sizes) == owner.count(None)
        assert all(a + s < b for a, s, b in zip(heap.starts, heap.sizes, heap.starts[1:]))  # merged
    for start, n in live:
        heap.free(start, n)
    assert (heap.starts, heap.sizes) == ([0], [size])


def test_single_request_utilization_by_hand():
    req = [(0.0, 3, 4)]  # input 3, output 4: stores 3, 4, 5, 6 tokens over 4 steps (F = 6)
    assert memory_sim.run_contiguous(req, "oracle")["utilization"] == 18 / 24
    assert memory_sim.run_contiguous(req, "pow2")["utilization"] == 18 / 32
    assert memory_sim.run_contiguous(req, "max")["utilization"] == 18 / (4 * 2048)
    paged = memory_sim.run_paged(req, 8)  # one 8-slot block throughout
    assert paged["utilization"] == 18 / 32 and paged["steps"] == 4 and paged["preemptions"] == 0
    assert memory_sim.run_paged(req, 2)["utilization"] == 18 / (2 + 2 + 3 + 3) / 2


def test_policies_rank_like_the_paper_and_breakdown_sums_to_one():
    reqs = memory_sim.make_requests("alpaca", 300, seed=5)
    res = {c: memory_sim.run_contiguous(reqs, c, budget=4096) for c in memory_sim.CONTIGUOUS}
    res["paged"] = memory_sim.run_paged(reqs, 16, budget=4096)
    u = {k: r["utilization"] for k, r in res.items()}
    assert u["max"] < u["pow2"] < u["oracle"] < u["paged"] <= 1.0
    for r in res.values():
        assert r["memory_bound_steps"] > 0
        parts = r["token_states"] + r["reservation"] + r["internal_frag"] + r["external_frag"]
        assert abs(parts - 1.0) < 1e-9
    assert res["oracle"]["internal_frag"] == 0.0
    assert res["paged"]["requests_per_step"] > res["oracle"]["requests_per_step"]


def test_sharing_savings_are_zero_without_sharing_and_grow_with_n():
    reqs = memory_sim.make_requests("alpaca", 20, seed=2)
    assert memory_study.sharing_saving(reqs, "alpaca", "parallel", 1, seed=0) == 0.0
    assert memory_study.sharing_saving(reqs, "alpaca", "beam", 1, seed=0) == 0.0
    beam = [memory_study.sharing_saving(reqs, "alpaca", "beam", n, seed=0) for n in (2, 6)]
    par = memory_study.sharing_saving(reqs, "alpaca", "parallel", 4, seed=0)
    assert 0.0 < par < beam[0] < beam[1] < 1.0


def test_quick_run_writes_json_table_and_plot(tmp_path):
    out = tmp_path / "memory_study.json"
    assert memory_study.main(["--quick", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert {r["workload"] for r in data["rows"]} == {"sharegpt", "alpaca"}
    assert len(data["rows"]) == 2 * (len(memory_sim.CONTIGUOUS) + len(memory_sim.BLOCK_SIZES))
    for r in data["rows"]:
        assert 0.0 < r["utilization"] <= 1.0 and (r["block_size"] is None) == r["policy"].startswith("contig")
    assert len(data["sharing"]) == 12 and "machine" in data
    assert "paged" in out.with_suffix(".md").read_text() and out.with_suffix(".png").stat().st_size > 0


def test_quick_run_without_matplotlib_keeps_json_and_table(tmp_path, monkeypatch, capsys):
    """Only the base package installed: the numbers are written, the plot is skipped, said so."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    out = tmp_path / "memory_study.json"
    assert memory_study.main(["--quick", "--json", str(out)]) == 0
    assert len(json.loads(out.read_text())["sharing"]) == 12
    assert "| sharegpt | paged | 16 |" in out.with_suffix(".md").read_text()
    assert not out.with_suffix(".png").exists()
    assert "matplotlib is not installed: no plot written" in capsys.readouterr().out
