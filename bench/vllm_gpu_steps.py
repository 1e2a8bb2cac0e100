"""vLLM on a GPU with kgen's ``CUSTOM`` backend against its stock ``TRITON_ATTN``: decode steps per
second at batch 1, 8 and 64, with full CUDA graphs and without (piecewise graphs only).

A small random Llama (written with transformers into a temporary folder) is served by
``vllm.LLM`` once per (backend, graph mode): ``batch`` requests of ``--prompt`` tokens decode
``--tokens`` greedy tokens each, and the decode phase's steps per second are taken from the wall
time of the engine's steps after the prefill. Both backends must produce the same tokens
(reported, not asserted: bf16 near-ties may part).

It needs vLLM with CUDA in the running Python; elsewhere (the CPU, or a GPU machine without
vLLM) it writes a result that says it was not run and why, so ``bench/gpu_check.sh`` can call it
unconditionally. Unmeasured until a GPU machine with vLLM runs it.

Usage::

    python bench/vllm_gpu_steps.py --json bench/results/h200/vllm_gpu_steps.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

MODES = {"full graphs": {"cudagraph_mode": "FULL_AND_PIECEWISE"},
         "piecewise graphs": {"cudagraph_mode": "PIECEWISE"}}


def _unavailable() -> str | None:
    try:
        import torch
        import vllm  # noqa: F401
    except Exception as exc:  # not installed here: say so
        return f"vLLM is not importable here ({type(exc).__name__}: {exc})"
    if not torch.cuda.is_available():
        return "no CUDA device"
    return None


def _steps_per_s(llm, batch: int, prompt: int, tokens: int) -> dict:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    engine = llm.llm_engine
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True, detokenize=False)
    for i in range(batch):
        engine.add_request(str(i), TokensPrompt(prompt_token_ids=[(7 * i + j) % 1000 + 1
                                                                  for j in range(prompt)]), params)
    engine.step()  # the prefill
    start, steps, out = time.perf_counter(), 0, {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                out[int(o.request_id)] = list(o.outputs[0].token_ids)
        steps += 1
    elapsed = time.perf_counter() - start
    return {"steps_per_s": steps / elapsed, "steps": steps, "tokens": [out[i] for i in sorted(out)]}


def run(args) -> dict:
    from helpers_checkpoint import make_llama  # tests/ helper: a random checkpoint
    from vllm import LLM

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        make_llama(Path(tmp), hidden=1024, heads=16, kv_heads=4, head_dim=64, layers=4,
                   vocab=1024, seed=0)
        for mode, compilation in MODES.items():
            for backend in ("TRITON_ATTN", "CUSTOM"):
                llm = LLM(model=tmp, dtype="bfloat16", attention_backend=backend,
                          skip_tokenizer_init=True, max_model_len=args.prompt + args.tokens + 16,
                          max_num_seqs=max(args.batches), compilation_config=compilation,
                          enable_prefix_caching=False, gpu_memory_utilization=0.5)
                for batch in args.batches:
                    rows.append({"mode": mode, "backend": backend, "batch": batch,
                                 **_steps_per_s(llm, batch, args.prompt, args.tokens)})
                del llm
    return {"rows": rows}


def table(result: dict) -> str:
    if "skipped" in result:
        return f"vLLM GPU steps: not run: {result['skipped']}"
    lines = ["| graphs | batch | TRITON_ATTN steps/s | CUSTOM (kgen) steps/s | kgen / stock | same tokens |",
             "|---|---|---|---|---|---|"]
    by = {(r["mode"], r["backend"], r["batch"]): r for r in result["rows"]}
    for mode in MODES:
        for batch in sorted({r["batch"] for r in result["rows"]}):
            stock, kgen = by[(mode, "TRITON_ATTN", batch)], by[(mode, "CUSTOM", batch)]
            lines.append(f"| {mode} | {batch} | {stock['steps_per_s']:.1f} | {kgen['steps_per_s']:.1f}"
                         f" | {kgen['steps_per_s'] / stock['steps_per_s']:.2f}x | "
                         f"{kgen['tokens'] == stock['tokens']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=64)
    _common.add_output_args(ap)
    args = ap.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    sys.path.insert(0, str(_common.REPO / "tests"))
    why = _unavailable()
    result = {"machine": _common.machine_info(), **({"skipped": why} if why else run(args))}
    _common.publish(result, table(result), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
