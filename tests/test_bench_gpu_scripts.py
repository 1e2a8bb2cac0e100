"""The GPU benchmark scripts: syntax, and a tiny interpreter run of the kernel benchmark."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_gpu_check_script_parses():
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("bash not installed")
    result = subprocess.run([bash, "-n", str(REPO / "bench" / "gpu_check.sh")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_kernel_bench_runs_tiny_under_interpreter(tmp_path):
    out = tmp_path / "kernel_bench.json"
    cmd = [sys.executable, str(REPO / "bench" / "kernel_bench.py"), "--quick", "--cpu",
           "--dtypes", "fp16", "--groups", "8", "--shapes", "2x40", "--json", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    data = json.loads(out.read_text())
    (row,) = data["rows"]
    assert row["batch"] == 2 and row["context"] == 40 and row["group_size"] == 8
    # Both kernels were checked against SDPA before timing: a wrong kernel leaves NaN times.
    for name in ("default", "tuned"):
        assert row[f"{name}_max_err"] < 2e-2
        assert row[f"{name}_ms"] > 0
    assert data["copy_bandwidth_gbs"] > 0
    assert "| fp16 | 128 | 16 | 8 | 2 x 40 |" in result.stdout
    # the fp8-KV row of the same case and the sliding-window rows (fixed window, two contexts)
    (fp8,) = data["fp8_rows"]
    assert fp8["kv_dtype"] == "fp8_e4m3" and fp8["default_max_err"] < 2e-2
    assert fp8["bytes"] < row["bytes"] and fp8["time_vs_plain"] > 0
    assert "kvfp8e4m3" in fp8["default_variant"]
    windows = data["window_rows"]
    assert [(w["window"], w["context"]) for w in windows] == [(16, 32), (16, 64)]
    assert all(w["window_max_err"] < 2e-2 and w["window_ms"] > 0 for w in windows)
    assert all(w["window_variant"].endswith("-swa") for w in windows)
    assert "| fp16 | fp8_e4m3 | 128 | 16 | 8 | 2 x 40 |" in result.stdout
    # the paged_attention rows: prefill chunks vs SDPA, speculative and q_len 1 vs decode
    rows = data["attention_rows"]
    assert [(r["kind"], r["batch"], r["q_len"], r["context"]) for r in rows] == [
        ("prefill", 1, 16, 0), ("prefill", 1, 16, 32), ("spec", 2, 2, 40), ("spec", 2, 4, 24),
        ("decode", 2, 1, 40)]
    assert all(r["max_err"] < 2e-2 and r["ms"] > 0 and r["baseline_ms"] > 0 for r in rows)
    assert [r["baseline"] for r in rows] == ["enable_gqa", "enable_gqa", "decode x2", "decode x4",
                                             "decode x1"]
    assert all(r["variant"].startswith("paged_attention-d128-b16-g8-") for r in rows)
    assert "| spec | fp16 | 128 | 16 | 8 | 2 x (4, 24) |" in result.stdout


def test_gpu_check_runs_end_to_end_under_interpreter(tmp_path):
    """Without a GPU the check runs every step at a tiny size; each writes its result file."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("on a GPU this would run the real check")
    env = dict(os.environ, PYTHON=sys.executable, KGEN_RESULTS=str(tmp_path / "res"),
               KGEN_DB=str(tmp_path / "db"), KGEN_WHEELS=str(tmp_path / "no-wheels"))
    env.pop("OUT", None)
    result = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh")], env=env,
                            capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "failed steps: none" in result.stdout
    res = tmp_path / "res"
    for name in ("env.json", "tune.log", "kernel_bench.json", "kernel_tests.log", "gpu_tests.log",
                 "decode_steps.json", "e2e_throughput.json", "prefill_throughput.json",
                 "vllm_gpu_steps.json"):
        assert (res / name).stat().st_size > 0, name
    prefill = json.loads((res / "prefill_throughput.json").read_text())
    assert prefill["rows"] and all(r["identical"] and r["triton"]["tokens_per_s"] > 0
                                   for r in prefill["rows"])
    assert "not importable" in json.loads((res / "vllm_gpu_steps.json").read_text())["skipped"]
    steps = json.loads((res / "decode_steps.json").read_text())
    assert [r["batch"] for r in steps["rows"]] == [1] and steps["rows"][0]["eager"]["steps_per_s"] > 0
    assert "1 passed" in (res / "kernel_tests.log").read_text()
    # every file the check writes says where it came from (bench/_common.py's provenance)
    for name in ("env.json", "kernel_bench.json", "decode_steps.json", "e2e_throughput.json"):
        prov = json.loads((res / name).read_text())["provenance"]
        assert prov["command"] and prov["date"] and "dirty" in prov, name
    for name in ("tune.log", "kernel_tests.log", "gpu_tests.log"):
        assert (res / name).read_text().startswith("# Provenance: commit "), name
    gpu_log = (res / "gpu_tests.log").read_text()  # the gpu-marked tests, skipped here with why
    assert "skipped" in gpu_log and "needs a CUDA GPU" in gpu_log and "passed" not in gpu_log
    best = json.loads((tmp_path / "db" / "interpreter" / "best.json").read_text())
    assert best["entries"], "the tune step recorded no workload"


@pytest.mark.parametrize("name", ["kernel_bench", "kernel_bench_more"])
def test_committed_kernel_tables_are_what_their_json_renders(tmp_path, name):
    """The README quotes the Markdown; the JSON is the measurement: they must say the same."""
    results = REPO / "bench" / "results" / "h200"
    out = tmp_path / f"{name}.md"
    cmd = [sys.executable, str(REPO / "bench" / "kernel_bench.py"), "--from-json",
           str(results / f"{name}.json"), "--md", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert out.read_text() == (results / f"{name}.md").read_text()
    assert "| default / SDPA speedup |" in out.read_text()
