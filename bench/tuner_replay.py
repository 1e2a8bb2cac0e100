"""Score the tuner offline: trials until within 3% of a measured table's best.

For each workload of a (config -> time) table, an in-memory Optuna study with a replay measurer
runs each sampler (TPE, random search, grid) for several seeds, and records the first trial whose
best-so-far time is within ``--tol`` of the table's best (``trials``), and how many distinct
variants had been measured by then (``measured``; pruned candidates and repeats are free).

Tables:

* default: a synthetic table, every valid variant of a few workloads timed by the synthetic cost
  model (``kgen.tune.measure.SyntheticMeasurer``), whose 3% region is one or two variants;
* ``--trials-log tuning_db/<gpu>/trials.jsonl``: the variants measured on a real GPU (medians).
  Variants missing from such a log count as failed, so the table should come from a grid run over
  the whole space (``kgen tune --sampler grid --trials 100000``) to be a fair test.

Usage: python bench/tuner_replay.py [--quick] [--json PATH] [--md PATH] [--trials-log FILE]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import _common  # noqa: F401  (puts the checkout on sys.path)

from kgen.db.store import read_trials
from kgen.tune.measure import ReplayMeasurer
from kgen.tune.replay import replay_scores, synthetic_table
from kgen.workload import Workload

WORKLOADS = (  # (gpu, dtype, head_dim, block, group, batch, context)
    ("synthetic", "fp16", 128, 16, 1, 1, 32768),
    ("synthetic", "fp16", 128, 16, 8, 64, 4096),
    ("synthetic", "bf16", 64, 32, 4, 8, 8192),
    ("synthetic", "fp16", 256, 16, 2, 256, 1024),
)


def summarize(scores, budget: int) -> list[dict]:
    """Per sampler: how often the target was reached, median/mean trials and measurements."""
    rows = []
    for sampler in dict.fromkeys(s.sampler for s in scores):
        mine = [s for s in scores if s.sampler == sampler]
        # a run that never got there counts as budget + 1 for the median (reported as '>budget')
        trials = sorted(s.trials if s.trials is not None else budget + 1 for s in mine)
        measured = sorted(s.measured if s.measured is not None else budget + 1 for s in mine)
        reached = [s for s in mine if s.trials is not None]
        rows.append({
            "sampler": sampler, "runs": len(mine), "reached": len(reached),
            "median_trials": statistics.median(trials), "median_measured": statistics.median(measured),
            "mean_trials_when_reached": (statistics.mean(s.trials for s in reached) if reached else None),
            "p90_trials": trials[min(len(trials) - 1, int(0.9 * len(trials)))],
        })
    return rows


def _fmt(value, budget):
    if value is None:
        return "-"
    return f">{budget}" if value > budget else f"{value:g}"


def markdown(rows, meta) -> str:
    budget = meta["budget"]
    lines = [f"# Tuner replay: trials until within {meta['tol'] * 100:g}% of the table's best",
             "", f"Table: {meta['table']} ({meta['workloads']} workloads, {meta['variants']} "
             f"timed variants); seeds {meta['seeds']}; budget {budget} trials per run; "
             f"{meta['date']}, optuna {meta['optuna']}.", *([meta["note"]] if meta.get("note") else []),
             "",
             "| sampler | reached | median trials | median measured | p90 trials | mean trials (reached) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        mean = f"{r['mean_trials_when_reached']:.1f}" if r["mean_trials_when_reached"] else "-"
        lines.append(f"| {r['sampler']} | {r['reached']}/{r['runs']} | "
                     f"{_fmt(r['median_trials'], budget)} | {_fmt(r['median_measured'], budget)} | "
                     f"{_fmt(r['p90_trials'], budget)} | {mean} |")
    lines += ["", "`trials`: Optuna trials until the best time so far is within the tolerance "
              "(statically pruned candidates and repeated suggestions count as trials); "
              "`measured`: distinct variants timed by then (what a GPU run pays for)."]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 workloads, 3 seeds, budget 150")
    parser.add_argument("--seeds", type=int, default=10, help="seeds per sampler (default 10)")
    parser.add_argument("--budget", type=int, default=300, help="trials per run (default 300)")
    parser.add_argument("--tol", type=float, default=0.03, help="tolerance (default 0.03)")
    parser.add_argument("--trials-log", default=None, help="a trials.jsonl of a real GPU run")
    parser.add_argument("--note", default="", help="a line about the table, added to the output")
    _common.add_output_args(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.budget = min(args.seeds, 3), min(args.budget, 150)
    if args.trials_log:
        table = ReplayMeasurer.from_trials(read_trials(args.trials_log)).table
        name = args.trials_log
    else:
        workloads = [Workload(*w) for w in WORKLOADS[: 2 if args.quick else None]]
        table = synthetic_table(workloads)
        name = "synthetic cost model (every valid variant)"
    start = time.time()
    scores = replay_scores(table, seeds=range(args.seeds), budget=args.budget, tol=args.tol)
    rows = summarize(scores, args.budget)
    import optuna

    machine = _common.machine_info()
    meta = {"table": name, "workloads": len(table), "variants": sum(map(len, table.values())),
            "seeds": args.seeds, "budget": args.budget, "tol": args.tol,
            "optuna": optuna.__version__, "date": machine["date"],
            "seconds": round(time.time() - start, 1), "note": args.note}
    result = {"meta": meta, "machine": machine, "summary": rows,
              "runs": [s.__dict__ for s in scores]}
    _common.publish(result, markdown(rows, meta), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
