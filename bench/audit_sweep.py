"""Static audit sweep (CPU, no GPU): ``kgen inspect`` over the variant space for sm_80 and sm_90.

Every variant is compiled with ``triton.compile`` for each target and read back with the bundled
``cuobjdump``: registers, spill bytes, shared memory and the width of its K/V global loads (see
:mod:`kgen.audit` for the rule that tells K/V loads from block-table and other loads). Target:
zero spills and 100% 16-byte K/V loads for fp16 and bf16.

Two parts of the space are swept:

* ``shapes``: every head dim x block size x group size (1, 8) x split-K (1, 4) x dtype, each
  with the default launch parameters of :func:`kgen.space.default_config` (group sizes up to 16
  share one padded program shape, so 1 and 8 stand for the others);
* ``launch``: every unpruned tile / num_warps / num_stages for bf16, head dims 128 and 256,
  block size 16, group size 8, single pass.

Two more parts cover the KV-dtype and feature axes (not in the default ``--parts``):

* ``fp8``: both fp8 caches x every query dtype x every head dim x block sizes 1, 16, 128 x
  split-K 1 and 4, group size 8, default launch parameters, no feature (e4m3 on sm_80 is listed
  as not supported: Triton cannot convert it there);
* ``features``: all four features on, bf16 queries over an e4m3, an e5m2 and a plain cache and
  fp16 / fp32 queries over an e5m2 cache, head dims 64, 128, 256, block size 16, groups 1 and 8,
  split-K 1 and 4; plus each feature alone (bf16, d128, b16, g8, split-K 1 and 4).

The full product of the new axes with the old sweep (x 3 KV dtypes x 16 feature sets) would be
~70 000 audits, days on this 2-core machine; these parts are the reduced sweep.

``--kernel attention`` sweeps the any-query-length family (:mod:`kgen.space_attention`) instead,
with the same parts: ``shapes`` (every head dim x block sizes 1, 16, 128 x groups 1, 3, 8, 16 x
dtype, default launch parameters, segments auto), ``launch`` (every unpruned q tile / key tile / warps / stages
for bf16, d128, b16, g4), ``fp8`` and ``features`` (as above, on the family's defaults); each
audit compiles every row-tile shape the launcher may pick (see kgen.audit.capture_attention).

Examples::

    python bench/audit_sweep.py --quick --json /tmp/audit.json              # < 1 minute
    python bench/audit_sweep.py --json bench/results/audit_sweep.json        # the plain sweep
    python bench/audit_sweep.py --parts fp8,features --json bench/results/audit_sweep_features.json
    python bench/audit_sweep.py --kernel attention --quick --json /tmp/audit_attention.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile in this process (audit.py otherwise forks)
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from kgen.audit import audit_many, parse_target  # noqa: E402
from kgen.commands.inspect import format_bits  # noqa: E402
from kgen.render import template_hash  # noqa: E402
from kgen.space import default_config, enumerate_variants, target_prune_reason  # noqa: E402
from kgen.space_attention import (default_attention_config,  # noqa: E402
                                  enumerate_attention_variants)
from kgen.variant import BLOCK_SIZES, DTYPES, HEAD_DIMS  # noqa: E402
from kgen.variant_attention import config_from_key  # noqa: E402

GROUPS = (1, 8)
# The attention family's shapes part: block sizes of one page per token, a typical one and a large
# one; groups 1, 3 (not a power of two: rows past the last whole token are masked), 8 and 16.
ATTENTION_BLOCKS = (1, 16, 128)
ATTENTION_GROUPS = (1, 3, 8, 16)
SPLITS = (1, 4)
PARTS = ("shapes", "launch", "fp8", "features")
ALL_FEATURES = ("sliding_window", "soft_cap", "alibi", "sinks")


def sweep_configs(part: str, quick: bool) -> list:
    """The variants of one part of the sweep (``shapes``, ``launch`` or ``quick``)."""
    if quick:
        base = default_config(head_dim=128, block_size=16, group_size=4, dtype="bf16")
        return [base, base.replace(split_k=4),
                default_config(head_dim=80, block_size=1, group_size=8, dtype="fp16", split_k=4),
                base.replace(kv_dtype="fp8_e4m3", features=ALL_FEATURES)]
    if part == "shapes":  # plus d128/b16/g4, the shape of the table
        return [default_config(head_dim=d, block_size=b, group_size=g, dtype=t, split_k=s)
                for t, d, b, g, s in itertools.product(DTYPES, HEAD_DIMS, BLOCK_SIZES, GROUPS, SPLITS)
                ] + [default_config(head_dim=128, block_size=16, group_size=4, dtype=t, split_k=s)
                     for t, s in itertools.product(DTYPES, SPLITS)]
    if part == "fp8":
        return [default_config(head_dim=d, block_size=b, group_size=8, dtype=t, split_k=s,
                               kv_dtype=kv)
                for kv, t, d, b, s in itertools.product(("fp8_e4m3", "fp8_e5m2"), DTYPES, HEAD_DIMS,
                                                        (1, 16, 128), SPLITS)]
    if part == "features":
        every = [default_config(head_dim=d, block_size=16, group_size=g, dtype=t, split_k=s,
                                kv_dtype=kv, features=ALL_FEATURES)
                 for (t, kv), d, g, s in itertools.product(
                     (("bf16", "fp8_e4m3"), ("bf16", "fp8_e5m2"), ("bf16", "auto"),
                      ("fp16", "fp8_e5m2"), ("fp32", "fp8_e5m2")), (64, 128, 256), GROUPS, SPLITS)]
        return every + [default_config(head_dim=128, block_size=16, group_size=8, dtype="bf16",
                                       split_k=s, features=(f,))
                        for f, s in itertools.product(ALL_FEATURES, SPLITS)]
    return enumerate_variants(head_dim=[128, 256], block_size=16, group_size=8, dtype="bf16",
                              split_k=1)


def attention_configs(part: str, quick: bool) -> list:
    """The attention family's variants of one part of the sweep (see the module docstring)."""
    make = default_attention_config
    if quick:
        base = make(head_dim=128, block_size=16, group_size=4, dtype="bf16")
        return [base, base.replace(split_k=1),
                make(head_dim=80, block_size=1, group_size=8, dtype="fp16"),
                make(head_dim=128, block_size=16, group_size=4, dtype="bf16", kv_dtype="fp8_e4m3",
                     features=ALL_FEATURES)]
    if part == "shapes":  # each audit compiles every row-tile shape: a smaller grid than decode's
        return [make(head_dim=d, block_size=b, group_size=g, dtype=t)
                for t, d, b, g in itertools.product(DTYPES, HEAD_DIMS, ATTENTION_BLOCKS,
                                                    ATTENTION_GROUPS)]
    if part == "fp8":
        return [make(head_dim=d, block_size=b, group_size=8, dtype=t, kv_dtype=kv)
                for kv, t, d, b in itertools.product(("fp8_e4m3", "fp8_e5m2"), DTYPES, HEAD_DIMS,
                                                     (1, 16, 128))]
    if part == "features":
        return [make(head_dim=d, block_size=16, group_size=g, dtype=t, kv_dtype=kv,
                     features=ALL_FEATURES)
                for (t, kv), d, g in itertools.product(
                    (("bf16", "fp8_e4m3"), ("bf16", "fp8_e5m2"), ("bf16", "auto"),
                     ("fp16", "fp8_e5m2"), ("fp32", "fp8_e5m2")), (64, 128, 256), GROUPS)]
    return enumerate_attention_variants(head_dim=128, block_size=16, group_size=4, dtype="bf16",
                                        split_k="auto")


KERNEL_FIELDS = ("name", "registers", "spill_bytes", "stack_bytes", "shared_bytes", "kv_load_bits",
                 "other_load_bits", "consistent", "mma_instructions")


def row_of(config, target, result) -> dict:
    """One JSON row: the audit dict (kernels cut to their main fields), the compile error, or
    the target rule that excludes the variant (``unsupported``: not compiled)."""
    base = {"variant": config.key, "target": target, "dtype": config.dtype,
            "kv_dtype": config.kv_dtype, "features": list(config.features)}
    if isinstance(result, str):
        return {**base, "unsupported": result}
    if isinstance(result, Exception):
        return {**base, "error": f"{type(result).__name__}: {str(result).strip().splitlines()[-1:]}"}
    row = {**base, **result.to_dict()}
    row["kernels"] = [{k: kernel[k] for k in KERNEL_FIELDS} for kernel in row["kernels"]]
    return row


def _features_text(row) -> str:
    return ",".join(row.get("features") or []) or "none"


def summarize(rows: list[dict]) -> list[dict]:
    """Per (target, dtype, KV dtype, features): counts of variants, compile failures, spills,
    full 16-byte K/V; variants a target rule excludes are counted apart (``unsupported``)."""
    groups = defaultdict(list)
    for row in rows:
        groups[(row["target"], row["dtype"], row.get("kv_dtype", "auto"), _features_text(row))].append(row)
    out = []
    for (target, dtype, kv_dtype, features), all_items in sorted(groups.items()):
        items = [r for r in all_items if "unsupported" not in r]
        ok = [r for r in items if "error" not in r]
        kv = sum(sum(r["kv_load_bits"].values()) for r in ok)
        kv128 = sum(r["kv_load_bits"].get("128", 0) for r in ok)
        out.append({
            "target": target, "dtype": dtype, "kv_dtype": kv_dtype, "features": features,
            "variants": len(items), "unsupported": len(all_items) - len(items),
            "compile_failed": len(items) - len(ok),
            "spilling": sum(1 for r in ok if r["spill_bytes"] > 0),
            "all_kv_16B": sum(1 for r in ok if r["kv_128_share"] == 1.0),
            "kv_16B_share": round(kv128 / kv, 4) if kv else 0.0,
            "max_registers": max((r["registers"] for r in ok), default=0),
            "max_shared_bytes": max((r["shared_bytes"] for r in ok), default=0),
            "passing": sum(1 for r in ok if r["passes"]),
        })
    return out


def _table(header, rows) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def render(summary: list[dict], rows: list[dict], machine: dict, seconds: float, *,
           every_row: bool = False, kernel: str = "decode") -> str:
    """Markdown: the per-target/dtype summary, every failing variant, and the d128/b16/g4 rows."""
    family = "" if kernel == "decode" else f", {kernel} family"
    lines = [f"# Static audit sweep (kgen inspect, sm_80 / sm_90, no GPU{family})", "",
             f"triton {machine.get('triton')}, templates {template_hash(kernel)}, "
             f"{machine.get('host_cpu')}, {machine.get('date')}; "
             f"{len(rows)} audits in {seconds:.0f} s.", "",
             "K/V loads are global loads whose address derives from key_cache / value_cache (PTX "
             "provenance, widths cross-checked in the SASS); counts are PTX load instructions.", ""]
    lines += _table(("target", "dtype", "KV dtype", "features", "variants", "compile failed",
                     "spilling", "all K/V 16 B", "K/V 16 B share", "max regs", "max shared B",
                     "pass"),
                    [(s["target"], s["dtype"], s["kv_dtype"], s["features"], s["variants"],
                      s["compile_failed"], s["spilling"], s["all_kv_16B"],
                      f"{100 * s['kv_16B_share']:.1f}%", s["max_registers"],
                      s["max_shared_bytes"], s["passing"]) for s in summary])
    skipped = [r for r in rows if "unsupported" in r]
    if skipped:
        reasons = sorted({r["unsupported"] for r in skipped})
        lines += ["", f"Not compiled ({len(skipped)} audits): a target rule excludes them: "
                  + "; ".join(reasons)]
    rows = [r for r in rows if "unsupported" not in r]
    bad = [r for r in rows if "error" in r or not r["passes"]]
    lines += ["", f"## Failing variants ({len(bad)})", ""]
    lines += _table(("variant", "target", "why"),
                    [(r["variant"], r["target"], r.get("error") or "; ".join(r["failures"]))
                     for r in bad]) if bad else ["none"]
    note = [r for r in rows if "error" not in r and (every_row or "-d128-b16-g4-" in r["variant"]
                                                      or "-d128-b16-g8-" in r["variant"]
                                                      and r.get("kv_dtype", "auto") != "auto")]
    lines += ["", "## Every variant audited" if every_row else
              "## d128 / b16 / g4 variants (and d128 / b16 / g8 fp8 variants)", ""]
    lines += _table(("variant", "target", "regs", "spill B", "shared B", "MMA", "K/V loads",
                     "other loads"),
                    [(r["variant"], r["target"], r["registers"], r["spill_bytes"],
                      r["shared_bytes"], r.get("mma_instructions"),
                      format_bits({int(k): v for k, v in r["kv_load_bits"].items()}),
                      format_bits({int(k): v for k, v in r["other_load_bits"].items()}))
                     for r in note])
    if every_row:
        lines += ["", "Per kernel (a split variant's second `_merge_kernel` is the widest merge "
                  "step: 64 partitions, 8 warps):", ""]
        lines += _table(("variant", "target", "kernel", "regs", "spill B", "shared B", "K/V loads"),
                        [(r["variant"], r["target"], k["name"], k["registers"], k["spill_bytes"],
                          k["shared_bytes"],
                          format_bits({int(b): n for b, n in k["kv_load_bits"].items()}) or "-")
                         for r in note for k in r["kernels"]])
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="four variants only, one fp8 with every feature (< 1 minute)")
    parser.add_argument("--json", default=None, metavar="PATH", help="write the results as JSON")
    parser.add_argument("--md", default=None, metavar="PATH",
                        help="write the Markdown table (default: next to --json, .md)")
    parser.add_argument("--targets", default="sm_80,sm_90", help="comma list (default both)")
    parser.add_argument("--parts", default="shapes,launch",
                        help="comma list of: shapes, launch, fp8, features (default shapes,launch)")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="compile processes (default min(2, CPUs))")
    parser.add_argument("--kernel", default="decode", choices=("decode", "attention"),
                        help="kernel family to sweep (default decode)")
    parser.add_argument("--keys", default="",
                        help="comma list of variant keys to audit instead of --parts (each row "
                             "listed in the Markdown)")
    args = parser.parse_args(argv)
    targets = [parse_target(t) for t in args.targets.split(",") if t.strip()]
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    for part in parts:
        if part not in PARTS:
            raise SystemExit(f"--parts: unknown part {part!r}; use {', '.join(PARTS)}")
    part_configs = attention_configs if args.kernel == "attention" else sweep_configs
    configs = part_configs("quick", True) if args.quick else list(dict.fromkeys(
        c for part in parts for c in part_configs(part, False)))
    if args.keys:
        configs, parts = [config_from_key(k.strip()) for k in args.keys.split(",") if k.strip()], []
    start = time.perf_counter()
    rows = [row_of(c, t, reason) for c in configs for t in targets
            if (reason := target_prune_reason(c, t))]
    by_target = {t: [c for c in configs if not target_prune_reason(c, t)] for t in targets}
    pairs = [(t, c) for t in targets for c in by_target[t]]
    total = len(pairs)
    done = 0
    for target in targets:
        for config, _, result in audit_many(by_target[target], [target], jobs=args.jobs):
            rows.append(row_of(config, target, result))
            done += 1
            if done % 100 == 0:
                print(f"  {done}/{total} audits, {time.perf_counter() - start:.0f} s",
                      file=sys.stderr)
    seconds = time.perf_counter() - start
    machine = _common.machine_info()
    summary = summarize(rows)
    text = render(summary, rows, machine, seconds, every_row=bool(args.keys), kernel=args.kernel)
    print(text)
    result = {"benchmark": "audit_sweep", "machine": machine, "quick": args.quick,
              "kernel": args.kernel, "parts": parts, "template_hash": template_hash(args.kernel),
              "targets": targets,
              "seconds": round(seconds, 1), "summary": summary, "rows": rows}
    md = args.md or (str(Path(args.json).with_suffix(".md")) if args.json else None)
    _common.write_outputs(result, text, md_path=md)  # also stamps result's provenance
    if args.json:
        write_json(result, args.json)
    return 0


def write_json(result: dict, path) -> None:
    """The result as JSON with one compact line per audit row (the sweep has ~1500 rows)."""
    head = {k: v for k, v in result.items() if k != "rows"}
    rows = ",\n".join(json.dumps(row, separators=(",", ":")) for row in result["rows"])
    text = json.dumps(head, indent=1)[:-2] + f',\n "rows": [\n{rows}\n ]\n}}\n'
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
