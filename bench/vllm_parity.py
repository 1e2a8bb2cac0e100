"""kgen's kernels as vLLM-CPU's attention vs vLLM's own: the figures behind the docs' vLLM section.

Runs exactly what tests/test_vllm_integration.py asserts (tests/helpers_vllm.py: a random 2-layer
Llama, GQA 2, head dim 64, fp32; vLLM-CPU 0.32 stock at block 32 and with ``KGEN_VLLM_BACKEND=1``
at blocks 16 and 32, plus a kernel with its softmax scale 1.1x off; a random Mistral with a
16-token sliding window at block 32, with a plain and, where vLLM-CPU allows, an fp8 cache; a
served workload driven step by step, with requests arriving while others decode, a shared prefix
under prefix caching and prompts chunked by a small token budget, plainly and with n-gram
speculative decoding where vLLM-CPU runs it) and records: identical greedy tokens, the largest
|logprob difference| per run, kgen's call counts and vLLM's own attention op's calls, the wall
time of each vLLM process. ``--time-venv DIR`` also times ``bash tests/vllm_venv.sh DIR`` (DIR must not
exist yet, so the whole install is timed). Usage::

    python bench/vllm_parity.py [--quick] [--time-venv /tmp/fresh-venv] [--json bench/results/vllm_parity.json]

``--quick`` is accepted for symmetry with the other scripts: the run is already the smallest that
covers the checks (about a minute here).

The vLLM environment is ``$KGEN_VLLM_PYTHON`` or ``.venv-vllm/bin/python`` (tests/vllm_venv.sh).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common

sys.path.insert(0, str(_common.REPO / "tests"))
from helpers_vllm import (FP8_SCALES, LAYERS, MAX_TOKENS, PROMPTS, SERVED, SERVED_PREFIX,  # noqa: E402
                          SWA_LAYERS,
                          SWA_PROMPTS, SWA_WINDOW, WRONG_SCALE, find_vllm_python,
                          max_logprob_diff, pick, run_stock_and_kgen)

# The rows' models: the Llama, and the sliding-window Mistral with a plain and an fp8 cache.
MODEL_NAMES = {"main": "llama", "swa": f"mistral swa{SWA_WINDOW}",
               "swa-fp8": f"mistral swa{SWA_WINDOW}, fp8_e4m3 KV "
                          f"(scales {FP8_SCALES[0]}/{FP8_SCALES[1]})"}


def time_venv(folder: Path) -> dict:
    if folder.exists():
        raise SystemExit(f"--time-venv {folder}: the folder exists; give a new one so the whole "
                         "install is timed")
    t0 = time.time()
    done = subprocess.run(["bash", str(_common.REPO / "tests" / "vllm_venv.sh"), str(folder)],
                          capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"tests/vllm_venv.sh failed:\n{done.stderr[-3000:]}")
    return {"folder": str(folder), "seconds": round(time.time() - t0, 1)}


def versions(python: str) -> dict:
    code = "import vllm, torch, triton; print(vllm.__version__, torch.__version__, triton.__version__)"
    out = subprocess.run([python, "-c", code], capture_output=True, text=True).stdout.split()
    return dict(zip(("vllm", "torch", "triton"), out))


def summarize(runs: dict) -> dict:
    stock = pick(runs["stock"], 32)
    rows = []
    cases = [("main", 16, False), ("main", 32, False), ("main", 32, True), ("swa", 32, False)]
    if any(r.get("model") == "swa-fp8" for r in runs["kgen"]["runs"]):
        cases.append(("swa-fp8", 32, False))
    for model, bs, wrong in cases:
        run, stock = pick(runs["kgen"], bs, wrong, model), pick(runs["stock"], 32, model=model)
        rows.append({"model": MODEL_NAMES[model], "block_size": bs,
                     "kernel": f"scale x{WRONG_SCALE}" if wrong else "kgen",
                     "tokens_identical": run["tokens"] == stock["tokens"],
                     "max_abs_logprob_diff": max_logprob_diff(run, stock),
                     "kgen_calls": run["calls"]["kgen_calls"],
                     "multi_token_calls": run["calls"]["kgen_multi_token_calls"],
                     "stock_calls": run["calls"]["stock_calls"], "generate_s": run["seconds"]})
    for method, served in runs["kgen"].get("served", {}).items():
        stock = runs["stock"]["served"][method]
        name = "served workload" + ("" if method == "plain" else f", {method} speculation")
        if "error" in served:
            rows.append({"model": name, "block_size": 32, "kernel": "kgen", "error": served["error"],
                         "stock_error": stock.get("error")})
            continue
        steps = served["steps"]
        rows.append({"model": name, "block_size": 32, "kernel": "kgen",
                     "tokens_identical": served["tokens"] == stock["tokens"],
                     "max_abs_logprob_diff": max_logprob_diff(served, stock),
                     "kgen_calls": sum(s["kgen_calls"] for s in steps),
                     "multi_token_calls": sum(s["kgen_multi_token_calls"] for s in steps),
                     "stock_calls": sum(s["stock_calls"] for s in steps),
                     "stock_op_calls": sum(s["stock_op_calls"] for s in steps),
                     "stock_run_stock_op_calls": sum(s["stock_op_calls"] for s in stock["steps"]),
                     "steps": len(steps), "steps_all_on_kgen": all(
                         s["kgen_calls"] == LAYERS and s["stock_op_calls"] == 0 for s in steps),
                     "generate_s": served["seconds"]})
    return {"rows": rows, "stock_generate_s": pick(runs["stock"], 32)["seconds"],
            "process_wall_s": {name: runs[name]["wall_s"] for name in ("stock", "kgen")},
            "checks": runs["kgen"]["checks"]}


def table(result: dict) -> str:
    lines = ["# kgen's kernels as vLLM-CPU 0.32's attention vs stock vLLM", "",
             f"Made by `python bench/vllm_parity.py` on {result['machine']['date']} "
             f"({result['machine']['host_cpu']}, {result['machine']['cpu_count']} cores); vLLM "
             f"{result['versions'].get('vllm')}, torch {result['versions'].get('torch')}, triton "
             f"{result['versions'].get('triton')} (kgen's kernels under TRITON_INTERPRET=1).",
             f"Model: random Llama, {LAYERS} layers, 4 heads / 2 KV heads, head dim 64, fp32; "
             f"{len(PROMPTS)} prompts of {', '.join(str(len(p)) for p in PROMPTS)} tokens, "
             f"{MAX_TOKENS} greedy tokens each. Mistral: the same shapes, {SWA_LAYERS} layers, "
             f"sliding window {SWA_WINDOW}; {len(SWA_PROMPTS)} prompts of "
             f"{', '.join(str(len(p)) for p in SWA_PROMPTS)} tokens. Reference: stock vLLM-CPU "
             "at block 32 on the same model and cache (it rejects block 16). Served workload: "
             f"{len(SERVED['prompts'])} requests of {', '.join(str(len(p)) for p in SERVED['prompts'])} "
             f"tokens sharing a {len(SERVED_PREFIX)}-token prefix, arriving at steps "
             f"{', '.join(map(str, SERVED['arrivals']))}, {SERVED['max_tokens']} tokens each, "
             f"max_num_seqs {SERVED['max_num_seqs']}, max_num_batched_tokens "
             f"{SERVED['max_num_batched_tokens']}, prefix caching on.", "",
             "| model | block | kernel | tokens identical | max abs logprob diff | kgen calls "
             "(multi-token) | stock backend calls | vLLM attention op calls |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['block_size']} | {r['kernel']} | not run: vLLM "
                         f"refused it ({r['error'][:120]}) | | | | |")
            continue
        op = r.get("stock_op_calls", "-")
        lines.append(f"| {r.get('model', 'llama')} | {r['block_size']} | {r['kernel']} | "
                     f"{'yes' if r['tokens_identical'] else 'no'}"
                     f" | {r['max_abs_logprob_diff']:.3g} | {r['kgen_calls']} ({r['multi_token_calls']})"
                     f" | {r['stock_calls']} | {op} |")
    walls = result["process_wall_s"]
    lines += ["", f"Wall time of the two vLLM processes, run side by side: stock {walls['stock']} s, "
              f"kgen {walls['kgen']} s (includes vLLM's start-up)."]
    if result.get("venv"):
        lines.append(f"`bash tests/vllm_venv.sh` from scratch: {result['venv']['seconds']} s.")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the same run (it is already small)")
    ap.add_argument("--time-venv", type=Path, help="time tests/vllm_venv.sh into this new folder "
                                                   "and use that environment")
    ap.add_argument("--json", type=Path, help="write results here (and .md beside it)")
    args = ap.parse_args(argv)
    venv = time_venv(args.time_venv) if args.time_venv else None
    if venv:
        python = str(args.time_venv / "bin" / "python")
    else:
        python, missing = find_vllm_python()
        if python is None:
            raise SystemExit(missing)
    with tempfile.TemporaryDirectory() as tmp:
        runs = run_stock_and_kgen(python, Path(tmp))
    result = {"machine": _common.machine_info(), "versions": versions(python), "venv": venv,
              **summarize(runs)}
    text = table(result)
    print(text)
    _common.write_outputs(result, text, json_path=args.json,
                          md_path=args.json.with_suffix(".md") if args.json else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
