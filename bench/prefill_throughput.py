"""The runtime's prefill throughput: kgen's kernels (``triton``) against the per-sequence SDPA
prefill (``torch``), on the same random model and prompts.

A random-weight Llama (``decode_steps.random_model``, built on the device) runs in
:class:`runtime.engine.Engine`. For each (batch, prompt length) the script admits ``batch``
prompts, runs the step(s) that prefill them (with ``triton`` one kgen launch per layer for every
row; with ``torch`` one causal SDPA call per sequence per layer) and reports prompt tokens per
second, the steps it took, and whether both backends sampled the same first tokens. A prompt
longer than ``--budget`` tokens is chunked over several steps (the scheduler's
``max_num_batched_tokens``), so chunked prefill over the cache is measured too.

On the CPU the kernels run under the Triton interpreter and the figures only show the script
works; the GPU rows are written by ``bench/gpu_check.sh`` (unmeasured until a GPU run).

Examples::

    python bench/prefill_throughput.py --json bench/results/h200/prefill_throughput.json   # GPU
    python bench/prefill_throughput.py --quick --json /tmp/p.json                          # CPU
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
from decode_steps import PRESETS, random_model  # noqa: E402
from kgen.paths import template_hash  # noqa: E402


def prefill(loaded, backend: str, *, batch: int, prompt: int, budget: int, sync) -> dict:
    """Time the steps that prefill ``batch`` prompts of ``prompt`` tokens; their first tokens."""
    import torch

    from runtime.engine import Engine
    from runtime.sampling import SamplingParams

    block = 16
    engine = Engine(loaded, num_blocks=batch * (-(-(prompt + 2) // block)) + 16, block_size=block,
                    max_num_seqs=batch, max_num_batched_tokens=max(budget, batch), backend=backend,
                    enable_prefix_caching=False, cuda_graphs=False)
    gen = torch.Generator().manual_seed(prompt + batch)
    for _ in range(batch):
        ids = torch.randint(1, loaded.config.vocab_size, (prompt,), generator=gen).tolist()
        engine.add_request(ids, SamplingParams(max_tokens=1, ignore_eos=True))
    sync()
    start, steps = time.perf_counter(), 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
    sync()
    elapsed = time.perf_counter() - start
    tokens = [d.completions[0][0] for d in sorted(engine.pop_finished(), key=lambda d: d.request_id)]
    return dict(tokens_per_s=batch * prompt / elapsed, seconds=elapsed, steps=steps, tokens=tokens)


def table(result: dict) -> str:
    p = result["preset"]
    lines = [f"Device: {result['device']}; model: random Llama, {p['num_hidden_layers']} layers, "
             f"hidden {p['hidden_size']}, {p['num_attention_heads']} heads, "
             f"{p['num_key_value_heads']} KV heads, {p['dtype']}; step budget {result['budget']} "
             "tokens", "",
             "| batch | prompt | kgen (triton) tok/s | SDPA (torch) tok/s | kgen / SDPA | steps | "
             "same first tokens |", "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['batch']} | {r['prompt']} | {r['triton']['tokens_per_s']:.0f} | "
                     f"{r['torch']['tokens_per_s']:.0f} | {r['ratio']:.2f}x | "
                     f"{r['triton']['steps']} | {r['identical']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (the CPU smoke run)")
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None,
                    help="model shape (default: llama8b on a GPU, tiny on the CPU)")
    ap.add_argument("--cases", default=None,
                    help="batch x prompt list, e.g. 1x2048,8x512 (default: GPU 1x2048,1x8192,"
                         "8x512,32x512; CPU 2x24)")
    ap.add_argument("--budget", type=int, default=None,
                    help="max_num_batched_tokens (default 8192; 16 on the CPU, so prompts chunk)")
    ap.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is present")
    _common.add_output_args(ap)
    args = ap.parse_args(argv)
    cuda, device, sync = _common.torch_device(args.cpu)
    small = args.quick or not cuda
    preset = args.preset or ("tiny" if small else "llama8b")
    cases = args.cases or ("2x24" if small else "1x2048,1x8192,8x512,32x512")
    try:
        pairs = [tuple(int(x) for x in case.split("x")) for case in cases.split(",")]
    except ValueError:
        ap.error(f"--cases={cases!r}: give BATCHxPROMPT items, e.g. 8x512")
    budget = args.budget or (16 if small else 8192)
    loaded = random_model(PRESETS[preset], device=device)
    result = dict(machine=_common.machine_info(), template_hash=template_hash("attention"),
                  device=device, preset_name=preset, preset=PRESETS[preset], budget=budget, rows=[])
    for batch, prompt in pairs:
        row = dict(batch=batch, prompt=prompt)
        for backend in ("triton", "torch"):
            row[backend] = prefill(loaded, backend, batch=batch, prompt=prompt, budget=budget,
                                   sync=sync)
        row["ratio"] = row["triton"]["tokens_per_s"] / row["torch"]["tokens_per_s"]
        row["identical"] = row["triton"]["tokens"] == row["torch"]["tokens"]
        result["rows"].append(row)
        print(f"batch {batch} x {prompt}: kgen {row['triton']['tokens_per_s']:.0f} tok/s, SDPA "
              f"{row['torch']['tokens_per_s']:.0f} tok/s", flush=True)
    _common.publish(result, table(result), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
