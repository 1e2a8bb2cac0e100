"""``kgen variants``: list the (pruned) variant space, filtered per axis.

Also home of the axis options shared with ``kgen emit`` (``--head-dim 128`` ...).
"""

from __future__ import annotations

import argparse
import itertools
import json

from kgen.audit.result import TARGETS
from kgen.dtypes import KV_DTYPES
from kgen.families import FAMILIES, get_family
from kgen.features import FEATURES, normalize_features
from kgen.space import AXES, target_cc, target_prune_reason
from kgen.variant import parse_split_k
from kgen.variant_attention import Q_TILES

# axis -> (option, help)
AXIS_OPTIONS = {
    "head_dim": ("--head-dim", "head dim"),
    "block_size": ("--block-size", "tokens per KV page"),
    "group_size": ("--group-size", "query heads per KV head (GQA)"),
    "q_tile": ("--q-tile", "rows of the dot: query tokens x group heads (--kernel attention)"),
    "split_k": ("--split-k", "context partitions (attention: segments of short queries); "
                             "'auto' picks per call, 1 is single pass"),
    "tile_tokens": ("--tile-tokens", "tokens per inner step"),
    "num_warps": ("--num-warps", "Triton num_warps"),
    "num_stages": ("--num-stages", "Triton num_stages"),
    "dtype": ("--dtype", "fp16, bf16 or fp32"),
    "kv_dtype": ("--kv-dtype", "KV-cache element type (default auto: the same as --dtype)"),
    "features": ("--features", "attention features compiled in, one comma-separated set "
                               "(default none)"),
}
# Shown instead of the axis values for the options whose values are not a short list.
_ALLOWED_TEXT = {"kv_dtype": ", ".join(KV_DTYPES),
                 "features": "any of " + ", ".join(FEATURES) + " (or none)",
                 "q_tile": ", ".join(map(str, Q_TILES)) + " (at least the group size)"}


def parse_axis_value(name: str, text: str):
    """One CLI value of axis ``name`` ('auto' for split_k, dtype names, else integers)."""
    text = text.strip()
    if name in ("dtype", "kv_dtype"):
        return text
    if name == "features":
        return normalize_features(text, name="--features")
    if name == "split_k":
        return parse_split_k(text)
    option = AXIS_OPTIONS[name][0]
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{option}={text!r} is not an integer") from None


def add_kernel_option(parser: argparse.ArgumentParser) -> None:
    """``--kernel {decode,attention}``: the kernel family (default decode)."""
    parser.add_argument("--kernel", default=None, choices=tuple(FAMILIES),
                        help="kernel family: decode (one query token per sequence, the default) "
                             "or attention (any query length: paged_attention)")


def kernel_family(args: argparse.Namespace, key: str | None = None):
    """The family ``--kernel`` names (decode by default; a ``--key`` names its own family, and a
    ``--kernel`` that differs from it is refused)."""
    if key:
        from kgen.variant_attention import config_from_key

        family = get_family(config_from_key(key).family)
        if args.kernel and args.kernel != family.name:
            raise ValueError(f"--key={key!r} names the {family.name} family, not --kernel {args.kernel}")
        return family
    family = get_family(args.kernel or "decode")
    if family.name != "attention" and getattr(args, "q_tile", None) is not None:
        raise ValueError(f"--q-tile={args.q_tile} applies to --kernel attention only")
    return family


def add_axis_options(parser: argparse.ArgumentParser, *, multiple: bool) -> None:
    """Add ``--kernel`` and one option per axis; with ``multiple`` each takes a comma list."""
    add_kernel_option(parser)
    for name, (option, text) in AXIS_OPTIONS.items():
        shown = _ALLOWED_TEXT.get(name) or ", ".join(
            "auto" if name == "split_k" and v == 0 else str(v) for v in AXES[name])
        extra = " (comma-separated list)" if multiple and name != "features" else ""
        parser.add_argument(option, dest=name, default=None, metavar="V",
                            help=f"{text}{extra}; one of {shown}")


def axis_filters(args: argparse.Namespace) -> dict:
    """Parsed ``--axis a,b`` options as ``{axis: [values]}`` (only the given ones)."""
    filters = {}
    for name in AXIS_OPTIONS:
        text = getattr(args, name)
        if text is None:
            continue
        if name == "features":  # one feature set, not alternatives
            filters[name] = [parse_axis_value(name, text)]
        else:
            filters[name] = [parse_axis_value(name, part) for part in text.split(",") if part.strip()]
    return filters


def target_notes(config) -> str:
    """``sm_80: why`` for each audit target whose rules exclude ``config`` ('' when none do)."""
    notes = [f"{t}: {r}" for t in TARGETS if (r := target_prune_reason(config, t))]
    return "; ".join(notes)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "variants", help="list the kernel variant space (with filters)",
        description="List variant keys of the pruned space; filter any axis with a comma list, "
                    "e.g. 'kgen variants --head-dim 128 --dtype bf16 --group-size 1,4' ("
                    "'--kernel attention' lists the any-query-length family). Without "
                    "--kv-dtype / --features only plain variants (auto KV dtype, no feature) are "
                    "listed; '--kv-dtype fp8_e4m3 --features sliding_window,soft_cap' lists "
                    "those variants (--features takes one set).")
    add_axis_options(parser, multiple=True)
    parser.add_argument("--all", action="store_true",
                        help="include pruned variants, with the reason (and the targets that "
                             "cannot run a variant, e.g. e4m3 on sm_80)")
    parser.add_argument("--target", default=None, metavar="SM",
                        help="also drop variants this target cannot run (sm_80, sm_90)")
    parser.add_argument("--limit", type=int, default=50, help="show at most N (0 = all; default 50)")
    parser.add_argument("--count", action="store_true", help="only print how many variants match")
    parser.add_argument("--json", action="store_true", help="one JSON object per line (key + fields)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.limit < 0:
        raise ValueError(f"--limit={args.limit} must be >= 0")
    family = kernel_family(args)
    filters = axis_filters(args)
    prune = not args.all
    target = args.target
    if target is not None:
        target = f"sm_{target_cc(target)}"
    if args.count:
        total = family.space_size(prune=False, **filters)
        kept = family.space_size(prune=True, target=target, **filters)
        print(f"{kept} variants kept of {total} matching ({total - kept} pruned)")
        return 0
    found = family.iter_variants(prune=prune, target=target, **filters)
    shown = itertools.islice(found, args.limit or None)
    count = 0
    for config in shown:
        count += 1
        reason = family.prune_reason(config) if args.all else None
        notes = target_notes(config) if args.all else ""
        if args.json:
            print(json.dumps({"key": config.key, **config.to_dict(), "pruned": reason,
                              "targets": {t: target_prune_reason(config, t) for t in TARGETS}}))
        else:
            print(config.key + (f"  [pruned: {reason}]" if reason else "")
                  + (f"  [not on {notes}]" if notes else ""))
    if args.limit and count == args.limit and next(found, None) is not None:
        print("... more match; --limit 0 lists all, --count counts them")
    return 0
