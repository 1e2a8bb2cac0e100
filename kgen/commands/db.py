"""``kgen db show | explain | check | prune | import | remeasure``: the tuning database."""

from __future__ import annotations

import argparse
import os
import warnings
from pathlib import Path

from kgen.commands.tune import make_measurer
from kgen.db.check import check_db, prune_stale, stale_records
from kgen.db.lookup import DbReader
from kgen.db.schema import DbFormatError, make_provenance
from kgen.db.tables import LayeredTables
from kgen.device import normalize_gpu_name, resolve_gpu
from kgen.dtypes import normalize_kv_dtype
from kgen.features import features_text, normalize_features
from kgen.paths import default_db_dir
from kgen.shape import AttentionShape
from kgen.workload import bucket, query_bucket


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "db", help="show, explain, check, prune, import or re-measure the tuning database",
        description="'kgen db show [--gpu NAME]' prints the best-config tables; 'kgen db explain "
                    "--gpu NAME --batch B --context L ...' says which record a step would use and "
                    "why; 'kgen db check' validates every file (exit 1 if any is bad) and lists "
                    "stale records; 'kgen db prune --stale' drops them; 'kgen db import --storage "
                    "URL --gpu NAME' writes a shared study storage's results as records; 'kgen db "
                    "remeasure --gpu NAME' re-times records measured against other templates.")
    sub = parser.add_subparsers(dest="db_command",
                                metavar="{show,explain,check,prune,import,remeasure}")
    sub.required = True
    show = sub.add_parser("show", help="print the best-config table(s)")
    show.add_argument("--gpu", default=None, help="only this GPU (default: all)")
    explain = sub.add_parser("explain", help="which record a lookup uses, and why")
    explain.add_argument("--gpu", required=True)
    explain.add_argument("--batch", type=int, required=True, help="sequences in the step")
    explain.add_argument("--context", type=int, required=True, help="longest context (tokens)")
    explain.add_argument("--head-dim", type=int, default=128)
    explain.add_argument("--block-size", type=int, default=16)
    explain.add_argument("--group-size", type=int, default=1)
    explain.add_argument("--dtype", default="fp16")
    explain.add_argument("--kv-dtype", default="auto",
                         help="KV-cache element type: auto, fp8_e4m3, fp8_e5m2 (default auto)")
    explain.add_argument("--features", default="",
                         help="attention features of the step, a comma set of sliding_window, "
                              "soft_cap, alibi, sinks (default none)")
    explain.add_argument("--query-len", type=int, default=1,
                         help="most query tokens of one sequence in the step (default 1: decode)")
    explain.add_argument("--kernel", default=None, choices=("decode", "attention"),
                         help="only records of this kernel family (default: either; a decode "
                              "step takes the faster of the two)")
    check = sub.add_parser("check", help="validate every file of the database, list stale records",
                           description="Validate every file (exit 1 if one is bad) and list "
                                       "stale records: measured against other kernel templates "
                                       "(lookup does not serve them) or by an older kgen.")
    check.add_argument("--strict", action="store_true", help="exit 1 when a record is stale too")
    prune = sub.add_parser("prune", help="drop stale records from best.json",
                           description="Drop the records 'kgen db check' lists as stale from the "
                                       "best tables (the trial logs keep their history).")
    prune.add_argument("--stale", action="store_true", required=True,
                       help="drop stale records (the only kind of pruning)")
    prune.add_argument("--gpu", default=None, help="only this GPU (default: all)")
    imp = sub.add_parser("import", help="write a shared study storage's results as records",
                         description="Read every study of a GPU from an Optuna storage (a "
                                     "database URL, or a journal file) and write best.json "
                                     "entries and trials.jsonl lines with provenance: the hosts "
                                     "that measured, triton and driver versions, template hash.")
    imp.add_argument("--storage", required=True, metavar="URL",
                     help="the storage the fleet tuned into (postgresql://..., sqlite:///...)")
    imp.add_argument("--gpu", required=True, metavar="NAME")
    remeasure = sub.add_parser(
        "remeasure", help="re-time records measured against other templates",
        description="On the GPU itself: time each record lookup holds back (measured against "
                    "other kernel templates) and the current default variant; the record is "
                    "served again only if it still beats the default.")
    remeasure.add_argument("--gpu", required=True, metavar="NAME",
                           help="the GPU present (as for kgen tune)")
    remeasure.add_argument("--key", action="append", default=None, metavar="WORKLOAD",
                           help="only this workload key (repeatable; default: all held back)")
    remeasure.add_argument("--no-audit", action="store_true",
                           help="skip the static audit before timing")
    for p in (show, explain, check, prune, imp, remeasure):
        p.add_argument("--db", default=None, metavar="DIR",
                       help="database folder (default: $KGEN_DB; else tuning_db/ in a source "
                            "checkout, the user's ~/.local/share/kgen/tuning_db for a wheel)")
        p.set_defaults(func=run)


def _db_dir(args):
    return args.db or default_db_dir()


def _db_origin(args) -> str:
    """Where ``_db_dir(args)`` came from, for messages about it."""
    return "--db" if args.db else ("$KGEN_DB" if os.environ.get("KGEN_DB") else "the default database")


def show(args) -> int:
    import pandas as pd  # heavy: only for the table

    tables = LayeredTables(args.db)
    gpus = [normalize_gpu_name(args.gpu)] if args.gpu else tables.gpus()
    rows, defaults = [], []
    for gpu in gpus:
        with warnings.catch_warnings():  # a bad file is this command's error, said once below
            warnings.simplefilter("ignore", RuntimeWarning)
            table = tables.get(gpu)
        if gpu in tables.errors:  # show the database as it is: a bad file is an error here
            raise DbFormatError(tables.errors[gpu])
        if table is None:
            if args.gpu:
                raise FileNotFoundError(f"no tuning records for gpu={args.gpu!r} in "
                                        f"{', '.join(map(str, tables.layers))}")
            continue
        every = {**table.entries, **table.held}
        for key, entry in sorted(every.items()):
            w, c, prov = entry["workload"], entry["config"], entry["provenance"]
            rows.append({"gpu": gpu, "dtype": w["dtype"], "kv": w.get("kv_dtype", "auto"),
                         "features": features_text(tuple(w.get("features", ()))),
                         "d": w["head_dim"], "b": w["block_size"],
                         "g": w["group_size"], "batch": w["batch"], "context": w["context"],
                         "q": w.get("query_len", 1), "kernel": w.get("kernel", "decode"),
                         "q_tile": c.get("q_tile", "-"),
                         "split": "auto" if c["split_k"] == 0 else c["split_k"],
                         "tile": c["tile_tokens"], "warps": c["num_warps"],
                         "stages": c["num_stages"], "ms": entry["time_ms"],
                         "default_ms": entry["default_time_ms"], "speedup": entry.get("speedup"),
                         "trials": entry["trials"], "triton": prov.get("triton"),
                         "served": "no (stale)" if key in table.held else "yes",
                         "method": prov.get("method")})
        for key, rec in sorted(table.block_size_defaults.items()):
            defaults.append(f"{gpu} {key}: fastest block size {rec['block_size']} "
                            f"(geomean ms {rec['geomean_ms']})")
    if not rows:
        print(f"no tuning records in {', '.join(map(str, tables.layers))}")
        return 0
    frame = pd.DataFrame(rows)
    with pd.option_context("display.width", 200, "display.max_columns", 30,
                           "display.max_rows", 10_000, "display.float_format", "{:.5g}".format):
        print(frame.to_string(index=False))
    for line in defaults:
        print(line)
    if any(row["served"] != "yes" for row in rows):
        print("stale records are not served (see 'kgen db check')")
    return 0


def _ms(value) -> str:
    return "-" if value is None else f"{value:.5g} ms"


def explain(args) -> int:
    reader = DbReader(_db_dir(args))
    shape = AttentionShape(dtype=args.dtype, head_dim=args.head_dim, group_size=args.group_size,
                           block_size=args.block_size,
                           kv_dtype=normalize_kv_dtype(args.kv_dtype, name="--kv-dtype"),
                           features=normalize_features(args.features, name="--features"))
    result = reader.lookup(args.gpu, shape, num_seqs=args.batch, max_context=args.context,
                           max_query_len=args.query_len, kernel=args.kernel)
    print(f"step: batch {args.batch} (bucket {bucket(args.batch, '--batch')}), context "
          f"{args.context} (bucket {bucket(args.context, '--context')}), query length "
          f"{args.query_len} (bucket {query_bucket(args.query_len, '--query-len')})")
    print(f"workload: {result.workload.key} (kv dtype {result.workload.kv_dtype}, features "
          f"{features_text(result.workload.features)})")
    print(f"source: {result.source}")
    print(f"why: {result.reason}")
    print(f"variant: {result.config.key}")
    if result.entry:
        entry = result.entry
        print(f"record: {result.entry_key} in {result.path}: {_ms(entry['time_ms'])} "
              f"(default {_ms(entry['default_time_ms'])}), triton {entry['provenance'].get('triton')}, "
              f"{entry['provenance'].get('method')}, {entry['provenance'].get('date')}")
    for gpu, problem in reader.errors.items():
        print(f"skipped unusable file for {gpu}: {problem}")
    return 0


def check(args) -> int:
    reports = check_db(_db_dir(args), f"{_db_origin(args)} folder")
    bad = 0
    for report in reports:
        if report.problem:
            bad += 1
            print(f"BAD  {report.problem}")
        else:
            print(f"ok   {report.path}: {report.summary}")
    stale = stale_records(_db_dir(args))
    for record in stale:
        print(f"STALE {record.path}: {record.key}: {'; '.join(record.reasons)}")
    print(f"{len(reports)} file(s) checked, {bad} bad, {len(stale)} stale record(s)"
          + (" (not served; 'kgen db remeasure' on the GPU, or 'kgen db prune --stale')"
             if stale else ""))
    return 1 if bad or (stale and args.strict) else 0


def prune(args) -> int:
    dropped = prune_stale(_db_dir(args), normalize_gpu_name(args.gpu) if args.gpu else None,
                          f"{_db_origin(args)} folder")
    for record in dropped:
        print(f"dropped {record.key} from {record.path}: {'; '.join(record.reasons)}")
    print(f"{len(dropped)} stale record(s) dropped")
    return 0


def import_(args) -> int:
    from kgen.tune.importer import import_storage  # imports optuna

    report = import_storage(args.storage, args.gpu, _db_dir(args))
    for key, entry in sorted(report.entries.items()):
        prov = entry["provenance"]
        print(f"{key}: {entry['config_key']} {entry['time_ms']:.5g} ms (default "
              f"{_ms(entry['default_time_ms'])}), {entry['trials']} trials, hosts "
              f"{', '.join(prov['hosts'])}")
    for note in report.notes:
        print(f"note: {note}")
    print(f"{len(report.entries)} record(s) and {report.trial_lines} trial line(s) written to "
          f"{Path(_db_dir(args)) / normalize_gpu_name(args.gpu)}")
    return 0


def remeasure(args) -> int:
    from kgen.tune.remeasure import remeasure_stale  # imports optuna

    device = resolve_gpu(args.gpu)
    measurer = make_measurer(device, audit=not args.no_audit, seed=0)
    prov = make_provenance(device, method=measurer.method)
    written = remeasure_stale(args.db, device.name, measurer, prov, keys=args.key)
    for key, entry in written.items():
        block = entry["remeasure"]
        verdict = "served again" if block["beats_default"] else "still held back"
        print(f"{key}: {entry['config_key']} {_ms(block['time_ms'])} vs default "
              f"{block['default_config_key']} {_ms(block['default_time_ms'])}: {verdict}")
    print(f"{len(written)} record(s) re-measured")
    return 0


# ---- `kgen emit --gpu NAME`: the recorded best variant (used by kgen/commands/emit.py) ---------
LAUNCH_AXES = ("split_k", "tile_tokens", "num_warps", "num_stages")


def add_emit_gpu_options(parser: argparse.ArgumentParser) -> None:
    """``--gpu``, ``--batch``, ``--context``, ``--db`` for ``kgen emit``."""
    parser.add_argument("--gpu", default=None, metavar="NAME",
                        help="emit the tuning database's best variant for this GPU (h100, "
                             "interpreter, ...) and shape; launch options come from the record")
    parser.add_argument("--batch", type=int, default=None, metavar="B",
                        help="with --gpu: sequences per step (default: middle of the tuned range)")
    parser.add_argument("--context", type=int, default=None, metavar="L",
                        help="with --gpu: longest context (default: middle of the tuned range)")
    parser.add_argument("--db", default=None, metavar="DIR",
                        help="with --gpu: database folder (default: tuning_db/ or $KGEN_DB)")


def emit_config_from_db(args, given: dict):
    """The variant ``kgen emit --gpu`` writes: the lookup's choice for the given shape.

    ``given`` holds the parsed axis options; launch options may not be given with ``--gpu``.
    Without ``--block-size`` the block size recorded as fastest for (dtype, head dim) is used.
    """
    import sys

    if getattr(args, "key", None):
        raise ValueError(f"--key={args.key!r} cannot be combined with --gpu={args.gpu!r}")
    clash = [f"--{name.replace('_', '-')}" for name in LAUNCH_AXES if name in given]
    if clash:
        raise ValueError(f"--gpu={args.gpu!r} takes the launch options from the tuning database; "
                         f"drop {', '.join(clash)}")
    if "head_dim" not in given:
        raise ValueError("--head-dim is required with --gpu")
    shape = AttentionShape(dtype=given.get("dtype", "fp16"), head_dim=given["head_dim"],
                           group_size=given.get("group_size", 1),
                           kv_dtype=given.get("kv_dtype", "auto"), features=given.get("features", ()))
    reader = DbReader(_db_dir(args))
    block_size = given.get("block_size") or reader.preferred_block_size(args.gpu, shape)
    if block_size is None:
        raise ValueError(f"--block-size is required: no fastest block size is recorded for "
                         f"gpu={args.gpu!r}, {shape.key.replace('-b?', '')}")
    result = reader.lookup(args.gpu, shape.with_block_size(block_size), num_seqs=args.batch,
                           max_context=args.context)
    sys.stderr.write(f"kgen emit: {result.source}: {result.reason}\n")
    return result.config


def run(args: argparse.Namespace) -> int:
    return {"show": show, "explain": explain, "check": check, "prune": prune, "import": import_,
            "remeasure": remeasure}[args.db_command](args)
