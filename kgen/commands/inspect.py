"""``kgen inspect``: the static audit of one variant for sm_80 / sm_90, without a GPU."""

from __future__ import annotations

import argparse
import sys

from kgen.audit import AuditResult, audit_variant, failures, parse_target
from kgen.commands.emit import config_from_args
from kgen.commands.variants import add_axis_options
from kgen.space import target_prune_reason


def format_bits(counts: dict) -> str:
    """``{128: 32, 32: 9}`` -> ``"128b x32, 32b x9"`` (``-`` when empty)."""
    return ", ".join(f"{bits}b x{n}" for bits, n in sorted(counts.items(), reverse=True)) or "-"


def format_table(result: AuditResult) -> str:
    """A readable table: one row per kernel, a total row and the K/V load summary."""
    head = ("kernel", "regs", "spill B", "shared B", "MMA", "K/V loads", "other loads", "compile s")
    rows = [(k.name, str(k.registers), str(k.spill_bytes), str(k.shared_bytes),
             str(k.mma_instructions), format_bits(k.kv_load_bits), format_bits(k.other_load_bits),
             f"{k.compile_seconds:.2f}")
            for k in result.kernels]
    rows.append(("total", str(result.registers), str(result.spill_bytes), str(result.shared_bytes),
                 str(result.mma_instructions), format_bits(result.kv_load_bits),
                 format_bits(result.other_load_bits), f"{result.compile_seconds:.2f}"))
    widths = [max(len(row[i]) for row in [head, *rows]) for i in range(len(head))]
    line = lambda row: "  ".join(c.ljust(w) if i in (0, 5, 6) else c.rjust(w)  # noqa: E731
                                 for i, (c, w) in enumerate(zip(row, widths)))
    out = [f"{result.variant} on {result.target} (triton {result.triton_version})",
           line(head), line(tuple("-" * w for w in widths)), *map(line, rows[:-1]),
           line(tuple("-" * w for w in widths)), line(rows[-1])]
    kv_total = sum(result.kv_load_bits.values())
    out.append(f"K/V loads: {result.kv_load_bits.get(128, 0)} of {kv_total} are 16-byte "
               f"({100 * result.kv_128_share:.0f}%); registers and spills per thread; "
               "load counts are PTX instructions; MMA: tensor-core instructions in the SASS")
    reasons = failures(result)
    out.append("audit: PASS" if not reasons else "audit: FAIL: " + "; ".join(reasons))
    return "\n".join(out)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "inspect", help="compile a variant for sm_80/sm_90 without a GPU and audit it",
        description="Compile one variant with triton.compile for an NVIDIA target (no GPU needed) "
                    "and report registers, spill bytes, shared memory, tensor-core instructions "
                    "and the width of its K/V global loads, e.g. 'kgen inspect --head-dim 128 "
                    "--block-size 16 --group-size 4 --dtype bf16 --target sm_90' ('--kernel "
                    "attention' for the any-query-length family: one row per row-tile shape).")
    add_axis_options(parser, multiple=False)
    parser.add_argument("--key", default=None, help="a variant key instead of the axis options")
    parser.add_argument("--target", default="sm_90", help="sm_80 or sm_90 (also 80, sm80 ...)")
    parser.add_argument("--json", action="store_true",
                        help="print the audit as JSON (keys: registers, spill_bytes, shared_bytes, "
                             "kv_load_bits, mma_instructions, target, variant, ...)")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 when the variant fails the audit (spills, narrow K/V loads, "
                             "16-bit dots off the tensor cores)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    target = parse_target(args.target)
    config = config_from_args(args)
    reason = target_prune_reason(config, target)
    if reason:
        sys.stderr.write(f"kgen inspect: {config.key} cannot run on {target}: {reason}\n")
        return 1
    try:
        result = audit_variant(config, target)
    except Exception as exc:  # noqa: BLE001 - a compile failure is reported, not a traceback
        sys.stderr.write(f"kgen inspect: {config.key} failed to compile for {target}: "
                         f"{str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__}\n")
        return 1
    print(result.to_json(indent=2) if args.json else format_table(result))
    return 1 if args.check and failures(result) else 0
