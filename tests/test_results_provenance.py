"""Every committed results file says where it came from; every bench script's output will too.

A results JSON holds ``provenance: {commit, dirty, date, machine, command}`` (bench/_common.py
writes it for every script); files made before that were filled in from git history and say
``"backfilled": true`` with a note. A results Markdown ends with the same provenance as one line.
Results made from the kernel templates (audits, kernel benchmarks) hold their ``template_hash``;
whether the docs may quote them as current is tests/test_docs_numbers.py's check.
"""

import datetime as dt
import importlib.util
import json
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
sys.path.insert(0, str(REPO / "bench"))
import _common  # noqa: E402

RESULT_FILES = sorted(RESULTS.rglob("*.json"))
KEYS = {"commit", "dirty", "date", "machine", "command"}
HEX40 = re.compile(r"[0-9a-f]{40}")


def _git(*args):
    done = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else None


@pytest.mark.parametrize("path", RESULT_FILES, ids=lambda p: str(p.relative_to(RESULTS)))
def test_every_results_json_has_provenance(path):
    prov = json.loads(path.read_text()).get("provenance")
    assert isinstance(prov, dict) and KEYS <= set(prov), f"{path}: provenance {prov!r} lacks {KEYS}"
    assert HEX40.fullmatch(prov["commit"] or ""), f"{path}: commit {prov['commit']!r}"
    assert prov["dirty"] in (True, False, None)
    dt.datetime.fromisoformat(prov["date"])
    assert prov["machine"], path
    if prov.get("backfilled"):
        assert prov.get("note") and HEX40.fullmatch(prov.get("added_in") or ""), path
    else:
        assert prov["command"], f"{path}: a new run records its command"


@pytest.mark.parametrize("path", [p for p in RESULT_FILES if p.with_suffix(".md").exists()],
                         ids=lambda p: str(p.relative_to(RESULTS)))
def test_every_results_markdown_ends_with_its_provenance_line(path):
    md = path.with_suffix(".md")
    prov = json.loads(path.read_text())["provenance"]
    assert md.read_text().rstrip("\n").endswith(_common.provenance_line(prov)), md


def test_backfilled_commits_are_in_the_history():
    if _git("rev-parse", "--is-shallow-repository") != "false":
        pytest.skip("needs the full git history")
    for path in RESULT_FILES:
        prov = json.loads(path.read_text())["provenance"]
        if prov.get("backfilled"):
            for commit in (prov["commit"], prov["added_in"]):
                assert _git("cat-file", "-t", commit) == "commit", (path, commit)


def test_a_new_run_records_this_checkout(tmp_path):
    result = {"rows": [1]}
    _common.write_outputs(result, "| a |\n|---|", json_path=tmp_path / "r.json", md_path=tmp_path / "r.md",
                          quiet=True)
    prov = json.loads((tmp_path / "r.json").read_text())["provenance"]
    assert KEYS <= set(prov) and not prov.get("backfilled")
    head = _git("rev-parse", "HEAD")
    if head:
        assert prov["commit"] == head and isinstance(prov["dirty"], bool)
    assert "test_results_provenance" in prov["command"] or "pytest" in prov["command"]
    assert (tmp_path / "r.md").read_text() == "| a |\n|---|\n\n" + _common.provenance_line(prov) + "\n"
    # a table re-rendered from an old JSON keeps that JSON's provenance, not today's
    old = {"provenance": {**prov, "commit": "0" * 40, "date": "2020-01-01T00:00:00+00:00"}}
    _common.write_outputs(old, "| b |", md_path=tmp_path / "old.md", quiet=True, new_run=False)
    assert "commit 000000000000" in (tmp_path / "old.md").read_text()


def test_micro_benchmark_json_gets_provenance():
    spec = importlib.util.spec_from_file_location("bench_micro_conftest", REPO / "bench" / "micro" / "conftest.py")
    micro = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(micro)
    out = {}
    config = types.SimpleNamespace(invocation_params=types.SimpleNamespace(args=("bench/micro", "--benchmark-only")))
    micro.pytest_benchmark_update_json(config, [], out)
    assert out["provenance"]["command"] == "pytest bench/micro --benchmark-only"
    assert KEYS <= set(out["provenance"])


@pytest.mark.parametrize("name", ["audit_sweep.json", "audit_sweep_features.json", "audit_split_plan.json",
                                  "h200/audit_vs_driver.json", "h200/kernel_bench.json"])
def test_kernel_results_record_their_template_hash(name):
    made_with = json.loads((RESULTS / name).read_text()).get("template_hash")
    assert re.fullmatch(r"[0-9a-f]{16}", made_with or ""), name
