"""``kgen tune --gpu NAME``: tune the variants per workload into the tuning database."""

from __future__ import annotations

import argparse
import os
import sys

from kgen.device import resolve_gpu
from kgen.dtypes import normalize_dtype, normalize_kv_dtype
from kgen.features import normalize_features
from kgen.paths import default_db_dir
from kgen.space import target_prune_reason
from kgen.tune.measure import SyntheticMeasurer
from kgen.tune import DEFAULT_HEARTBEAT_S, interrupts
from kgen.tune.measure_kernel import GpuMeasurer, InterpreterMeasurer
from kgen.tune.search import default_variant
from kgen.workload import (DEFAULT_BATCHES, DEFAULT_CONTEXTS, KERNELS, expand_workloads,
                           parse_int_list)


def _csv(values) -> str:
    return ",".join(map(str, values))


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "tune", help="tune kernel variants per workload with Optuna into tuning_db/",
        description="Search split-K, tile tokens, num_warps and num_stages (and, for the "
                    "attention family, the query tile) per workload (dtype x KV dtype x features "
                    "x head dim x block size x group size x batch bucket x context bucket x query "
                    "length bucket) and record the best variant per workload. Decode steps can "
                    "be tuned for both families (--kernel decode, then --kernel attention): the "
                    "runtime's dispatch takes the faster record. E.g. 'kgen tune --gpu "
                    "interpreter --trials 4 --head-dim 64 --block-size 16 --batch 1 --context "
                    "512', or '... --kernel attention --query-len 4,512'.")
    parser.add_argument("--gpu", required=True, metavar="NAME",
                        help="device to tune: h100, a100, l40s, ... (must be the one present), "
                             "'interpreter' (Triton interpreter on the CPU) or 'synthetic'")
    parser.add_argument("--head-dim", default="128", metavar="LIST", help="default 128")
    parser.add_argument("--block-size", default="16", metavar="LIST", help="default 16")
    parser.add_argument("--group-size", default="1", metavar="LIST", help="default 1")
    parser.add_argument("--dtype", default="fp16", metavar="LIST", help="default fp16")
    parser.add_argument("--kv-dtype", default="auto", metavar="LIST",
                        help="KV-cache element types: auto (the --dtype), fp8_e4m3, fp8_e5m2 "
                             "(default auto)")
    parser.add_argument("--features", default="", metavar="SET",
                        help="attention features compiled into every tuned variant, one comma "
                             "set of sliding_window, soft_cap, alibi, sinks (default none); "
                             "sliding-window workloads are timed with a window of half the "
                             "context bucket")
    parser.add_argument("--kernel", default=None, choices=KERNELS,
                        help="kernel family to tune: decode (one query token per sequence; the "
                             "default for --query-len 1) or attention (any query length; the "
                             "default, and the only family, for longer queries)")
    parser.add_argument("--query-len", default="1", metavar="LIST",
                        help="query-length buckets, powers of two up to 2048: 1 (decode), 2..16 "
                             "(speculative decoding), 64..2048 (prefill chunks) (default 1)")
    parser.add_argument("--batch", default=_csv(DEFAULT_BATCHES), metavar="LIST",
                        help=f"batch buckets, powers of two (default {_csv(DEFAULT_BATCHES)})")
    parser.add_argument("--context", default=_csv(DEFAULT_CONTEXTS), metavar="LIST",
                        help=f"context buckets, powers of two (default {_csv(DEFAULT_CONTEXTS)})")
    parser.add_argument("--trials", type=int, default=30, metavar="N",
                        help="trials per workload (default 30)")
    parser.add_argument("--sampler", default="tpe", choices=("tpe", "random", "grid"),
                        help="Optuna sampler (default tpe)")
    parser.add_argument("--seed", type=int, default=0, help="sampler seed (default 0)")
    parser.add_argument("--db", default=None, metavar="DIR",
                        help="database folder to write (default: $KGEN_DB; else tuning_db/ in a "
                             "source checkout, ~/.local/share/kgen/tuning_db for an installed "
                             "wheel)")
    parser.add_argument("--storage", default=None, metavar="URL",
                        help="where the Optuna studies live (default: DB/<gpu>/journal.log, for "
                             "one machine). A database URL (postgresql://user@host/db with "
                             "kgen[postgres]; mysql://...) lets processes on many machines join "
                             "the same studies; each finishes the work of members that die. "
                             "Never SQLite or a journal on NFS. Collect the records with 'kgen db "
                             "import --storage URL --gpu NAME'")
    parser.add_argument("--resume", action="store_true",
                        help="continue studies that already have trials (after an interruption): "
                             "trials of killed runs are failed and their candidates measured")
    parser.add_argument("--workers", type=int, default=1, metavar="K",
                        help="worker processes on this machine against the same storage")
    parser.add_argument("--heartbeat", type=int, default=DEFAULT_HEARTBEAT_S, metavar="S",
                        help="database storages: seconds between a running trial's heartbeats; "
                             "a trial silent for 3 of them (its member died) is failed and its "
                             f"candidate measured by another member (default {DEFAULT_HEARTBEAT_S})")
    parser.add_argument("--no-audit", action="store_true",
                        help="skip the static audit before timing on a GPU")
    parser.add_argument("--quiet", action="store_true", help="no progress bar, summary only")
    parser.set_defaults(func=run)


def make_measurer(device, *, audit: bool, seed: int):
    """The measurer for a device: synthetic, interpreter, or the GPU's (audited for its target)."""
    if device.name == "synthetic":
        # $KGEN_SYNTHETIC_DELAY_S: seconds per synthetic measurement, so tests can overlap
        # processes and kill one mid-trial
        delay = os.environ.get("KGEN_SYNTHETIC_DELAY_S", "0")
        try:
            delay_s = float(delay)
        except ValueError:
            raise ValueError(f"KGEN_SYNTHETIC_DELAY_S={delay!r} is not a number of seconds") from None
        return SyntheticMeasurer(seed=seed, delay_s=delay_s)
    if device.name == "interpreter":
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported
        return InterpreterMeasurer(seed=seed)
    return GpuMeasurer(device.name, audit_target=device.audit_target if audit else None, seed=seed)


def workloads_from_args(args, gpu: str):
    dtypes = [normalize_dtype(d.strip()) for d in args.dtype.split(",") if d.strip()]
    if not dtypes:
        raise ValueError(f"--dtype={args.dtype!r} is empty")
    kv_dtypes = [normalize_kv_dtype(k.strip(), name="--kv-dtype") for k in args.kv_dtype.split(",")
                 if k.strip()] or ["auto"]
    query_lens = parse_int_list(args.query_len, "--query-len")
    kernel = getattr(args, "kernel", None)
    if kernel == "decode" and any(q != 1 for q in query_lens):
        raise ValueError(f"--kernel decode serves one query token per sequence; --query-len="
                         f"{args.query_len} needs --kernel attention")
    if kernel is None and any(q != 1 for q in query_lens):
        kernel = "attention"  # one study family for every query length asked
    return expand_workloads(
        kv_dtypes=list(dict.fromkeys(kv_dtypes)), query_lens=query_lens, kernel=kernel,
        feature_sets=[normalize_features(args.features, name="--features")],
        gpu=gpu, dtypes=dtypes, head_dims=parse_int_list(args.head_dim, "--head-dim"),
        block_sizes=parse_int_list(args.block_size, "--block-size"),
        group_sizes=parse_int_list(args.group_size, "--group-size"),
        batches=parse_int_list(args.batch, "--batch"),
        contexts=parse_int_list(args.context, "--context"))


def summary_lines(results, table: dict | None) -> list[str]:
    lines = [f"{'workload':<38} {'best variant':<52} {'ms':>10} {'default ms':>10} {'x':>6} "
             f"{'ok/pruned/failed':>16}"]
    for r in results:
        counts = "/".join(str(r.counts.get(k, 0)) for k in ("ok", "pruned", "failed"))
        if r.best is None:
            lines.append(f"{r.workload.key:<38} {'(no valid candidate)':<52} {'-':>10} {'-':>10} "
                         f"{'-':>6} {counts:>16}")
            continue
        default = f"{r.default_time_ms:.4f}" if r.default_time_ms else "-"
        speed = f"{r.speedup:.2f}" if r.speedup else "-"
        lines.append(f"{r.workload.key:<38} {r.best.key:<52} {r.time_ms:>10.4f} {default:>10} "
                     f"{speed:>6} {counts:>16}")
    for key, rec in sorted((table or {}).get("block_size_defaults", {}).items()):
        lines.append(f"fastest block size for {key}: {rec['block_size']} "
                     f"(geomean ms per block size {rec['geomean_ms']})")
    return lines


def run(args: argparse.Namespace) -> int:
    if args.trials < 1:
        raise ValueError(f"--trials={args.trials} must be at least 1")
    if args.workers < 1:
        raise ValueError(f"--workers={args.workers} must be at least 1")
    if args.heartbeat < 1:
        raise ValueError(f"--heartbeat={args.heartbeat} must be at least 1 second")
    device = resolve_gpu(args.gpu)
    workloads = workloads_from_args(args, device.name)
    cc = device.compute_capability
    target = f"sm_{cc[0]}{cc[1]}" if cc else (None if device.is_pseudo else device.audit_target)
    for workload in workloads if target else ():
        reason = target_prune_reason(default_variant(workload), target)
        if reason:
            raise ValueError(f"cannot tune {workload.key} on {device.name} ({target}): {reason}")
    # kgen.tune.tuner imports optuna: only when tuning
    from kgen.tune.tuner import TuneInterrupted, TuneSettings, tune

    settings = TuneSettings(
        measurer=make_measurer(device, audit=not args.no_audit, seed=args.seed), device=device,
        db_dir=args.db or default_db_dir(), trials=args.trials, sampler=args.sampler,
        seed=args.seed, storage=args.storage, resume=args.resume, workers=args.workers,
        progress=not args.quiet and sys.stderr.isatty(), heartbeat_s=args.heartbeat)
    if not args.quiet:
        print(f"tuning {len(workloads)} workload(s) x {args.trials} trials on {device.full_name} "
              f"({device.name}) into {settings.store.dir}", flush=True)
    previous = interrupts.install()  # Ctrl-C and SIGTERM stop at the next safe point
    try:
        results = tune(settings, workloads)
    except TuneInterrupted as stop:
        if stop.results:
            for line in summary_lines(stop.results, None):
                print(line)
        sys.stderr.write(f"kgen tune: {stop.message}\n")
        return 130
    finally:
        interrupts.uninstall(previous)
    for line in summary_lines(results, settings.store.load_best()):
        print(line)
    return 0
