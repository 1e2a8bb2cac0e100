"""Smoke test of bench/e2e_throughput.py: a --quick run writes its table and JSON."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import e2e_throughput  # noqa: E402


def test_quick_run_writes_json_and_markdown(tmp_path, capsys):
    out_json, out_md = tmp_path / "e2e.json", tmp_path / "e2e.md"
    assert e2e_throughput.main(["--quick", "--device", "cpu", "--backend", "torch",
                                "--json", str(out_json), "--md", str(out_md)]) == 0
    result = json.loads(out_json.read_text())
    assert result["machine"]["device"] == "cpu" and result["machine"]["transformers"]
    assert set(result["workloads"]) == {"issue_b", "mixed"}
    for name, row in result["workloads"].items():
        assert row["identical_requests"] == row["requests"], name  # same tokens as HF generate
        assert row["ours_tokens_per_s"] > 0 and row["hf_tokens_per_s"] > 0
        assert row["ratio_ours_over_hf"] == row["hf_s"] / row["ours_s"]
        stats = row["memory_stats"]
        assert stats["peak_blocks_in_use"] > 0 and 0 < stats["mean_utilization"] <= 1
        assert stats["backend"] == "torch"
    assert result["workloads"]["mixed"]["generated_tokens"] > result["workloads"]["mixed"]["requests"]
    table = out_md.read_text()
    assert "| issue_b |" in table and "| mixed |" in table
    assert table.strip() in capsys.readouterr().out
