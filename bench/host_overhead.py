"""Where a decode step's time goes on the host: per phase, per sequence, by batch size.

A 1-layer random Llama small enough that its arithmetic is negligible (hidden 64, vocab 128)
runs decode-only steps in :class:`runtime.engine.Engine` on the CPU with the default backend.
What is left is host work: the scheduler, building the batch (block tables, slots, lengths), the
backend's per-step preparation, the model's Python (one layer), sampling and bookkeeping. Each
phase is timed by wrapping the engine's own functions; the rest of ``Engine.step`` is "other".

For each batch size the table gives microseconds per step and per sequence-step, and a
least-squares line over the batch sizes splits the step into a fixed part (us per step) and a part
linear in the batch (us per sequence). Figures are wall-clock on whatever else the machine runs:
the JSON records the load average before and after.

Examples::

    python bench/host_overhead.py --json bench/results/host_overhead.json \
        --md bench/results/host_overhead.md
    python bench/host_overhead.py --quick                                  # smoke run
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
from decode_steps import random_model  # noqa: E402

TINY = dict(hidden_size=64, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=1,
            intermediate_size=128, vocab_size=128, max_position_embeddings=4096, dtype="fp32")
PHASES = ("schedule", "batch", "prepare", "model", "sample", "free", "other")


def _timer(totals: dict, name: str, fn):
    def timed(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[name] += time.perf_counter() - t
    return timed


def run_batch(loaded, batch: int, prompt: int, warmup: int, steps: int, threads: int) -> dict:
    """``steps`` decode-only steps of ``batch`` sequences on ``threads`` torch threads (warm-up
    included; the caller's count is restored); seconds per phase and per step."""
    import torch

    from runtime.threads import torch_threads

    with torch_threads(threads), torch.inference_mode():
        return _timed_steps(loaded, batch, prompt, warmup, steps)


def _timed_steps(loaded, batch: int, prompt: int, warmup: int, steps: int) -> dict:
    import torch

    import runtime.engine as engine_mod
    from runtime.engine import Engine
    from runtime.sampling import SamplingParams

    block = 16
    need = batch * -(-(prompt + warmup + steps + 2) // block)
    engine = Engine(loaded, num_blocks=int(need / 0.98) + 8, block_size=block, max_num_seqs=batch,
                    max_num_batched_tokens=max(batch * prompt, 64), enable_prefix_caching=False)
    gen = torch.Generator().manual_seed(batch)
    for _ in range(batch):
        ids = torch.randint(1, loaded.config.vocab_size, (prompt,), generator=gen).tolist()
        engine.add_request(ids, SamplingParams(max_tokens=warmup + steps + 1, ignore_eos=True))
    while engine.num_forward_tokens < batch * prompt:
        engine.step()
    for _ in range(warmup):
        engine.step()
    totals = dict.fromkeys(PHASES, 0.0)
    engine.scheduler.schedule = _timer(totals, "schedule", engine.scheduler.schedule)
    engine.scheduler.free_finished = _timer(totals, "free", engine.scheduler.free_finished)
    engine.backend.prepare = _timer(totals, "prepare", engine.backend.prepare)
    engine.model.forward = _timer(totals, "model", engine.model.forward)
    engine._sample_all = _timer(totals, "sample", engine._sample_all)
    original_build = engine_mod.build_batch
    engine_mod.build_batch = _timer(totals, "batch", original_build)
    try:
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        elapsed = time.perf_counter() - start
    finally:
        engine_mod.build_batch = original_build
    totals["other"] = elapsed - sum(v for k, v in totals.items() if k != "other")
    return dict(batch=batch, us_per_step=1e6 * elapsed / steps,
                us_per_seq_step=1e6 * elapsed / steps / batch,
                phases_us_per_step={k: 1e6 * v / steps for k, v in totals.items()},
                backend=engine.backend.name)


def fit(rows: list[dict], key=lambda r: r["us_per_step"]) -> dict:
    """Least-squares ``us_per_step = fixed + per_seq * batch`` over the rows."""
    xs, ys = [r["batch"] for r in rows], [key(r) for r in rows]
    n, mx, my = len(xs), sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    return {"fixed_us": my - slope * mx, "per_seq_us": slope, "points": n}


def table(result: dict) -> str:
    lines = [f"{result['machine']['host_cpu']}, {result['threads']} thread(s), backend "
             f"{result['rows'][0]['backend']}; random Llama, 1 layer, hidden 64, fp32; prompt "
             f"{result['prompt']}, {result['steps']} timed decode steps per batch", "",
             "| batch | us/step | us/seq-step | " + " | ".join(PHASES) + " |",
             "|---" * (3 + len(PHASES)) + "|"]
    for r in result["rows"]:
        ph = r["phases_us_per_step"]
        lines.append(f"| {r['batch']} | {r['us_per_step']:.0f} | {r['us_per_seq_step']:.1f} | "
                     + " | ".join(f"{ph[p]:.0f}" for p in PHASES) + " |")
    lines += ["", "Fit, us per step = fixed + per-sequence x batch:", "",
              "| part | fixed us | per-sequence us |", "|---|---|---|"]
    for name, f in result["fit"].items():
        lines.append(f"| {name} | {f['fixed_us']:.0f} | {f['per_seq_us']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="batches 1,4 and a few steps (smoke run)")
    ap.add_argument("--batches", default=None, help="batch sizes (default 1,8,32,64,128)")
    ap.add_argument("--prompt", type=int, default=20, help="prompt tokens per sequence")
    ap.add_argument("--steps", type=int, default=None, help="timed decode steps per batch (default 200)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    _common.add_output_args(ap)
    args = ap.parse_args(argv)
    batches = [int(b) for b in (args.batches or ("1,4" if args.quick else "1,8,32,64,128")).split(",")]
    steps = args.steps or (5 if args.quick else 200)
    for name, value in (("--prompt", args.prompt), ("--steps", steps), ("--threads", args.threads)):
        if value < 1:
            ap.error(f"{name}={value} must be >= 1")
    if any(b < 1 for b in batches):
        ap.error(f"--batches={args.batches!r}: every batch size must be >= 1")
    loaded = random_model(TINY, device="cpu")
    result = dict(machine=_common.machine_info(), model=TINY, prompt=args.prompt, steps=steps,
                  threads=args.threads, loadavg_start=list(os.getloadavg()), rows=[])
    for b in batches:
        row = run_batch(loaded, b, args.prompt, warmup=3, steps=steps, threads=args.threads)
        result["rows"].append(row)
        print(f"batch {b}: {row['us_per_step']:.0f} us/step, {row['us_per_seq_step']:.1f} us/seq-step",
              flush=True)
    result["loadavg_end"] = list(os.getloadavg())
    result["fit"] = {"step": fit(result["rows"])}
    for p in PHASES:
        result["fit"][p] = fit(result["rows"], key=lambda r, p=p: r["phases_us_per_step"][p])
    _common.publish(result, table(result), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
