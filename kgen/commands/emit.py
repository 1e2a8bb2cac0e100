"""``kgen emit``: write one variant as a standalone module (imports only torch and triton)."""

from __future__ import annotations

import argparse
import shlex

from kgen.commands.db import add_emit_gpu_options, emit_config_from_db
from kgen.commands.variants import AXIS_OPTIONS, add_axis_options, kernel_family, parse_axis_value
from kgen.families import family_of
from kgen.render import emit
from kgen.variant_attention import config_from_key

REQUIRED = ("head_dim", "block_size")


def given_axes(args: argparse.Namespace) -> dict:
    """The axis options given on the command line, parsed."""
    return {name: parse_axis_value(name, getattr(args, name)) for name in AXIS_OPTIONS
            if getattr(args, name) is not None}


def config_from_args(args: argparse.Namespace):
    """The variant named by ``--key`` or by ``--kernel`` and the axis options (unset launch
    options default to the family's default config for the shape:
    :func:`kgen.space.default_config` or :func:`kgen.space_attention.default_attention_config`)."""
    given = given_axes(args)
    family = kernel_family(args, args.key)
    if args.key:
        if given:
            options = ", ".join(AXIS_OPTIONS[name][0] for name in given)
            raise ValueError(f"--key={args.key!r} cannot be combined with {options}")
        return config_from_key(args.key)
    missing = [AXIS_OPTIONS[name][0] for name in REQUIRED if name not in given]
    if missing:
        raise ValueError(f"{', '.join(missing)} required (or --key)")
    base = family.default_config(head_dim=given["head_dim"], block_size=given["block_size"],
                                 group_size=given.get("group_size", 1),
                                 dtype=given.get("dtype", "fp16"),
                                 split_k=given.get("split_k", "auto"),
                                 kv_dtype=given.get("kv_dtype", "auto"),
                                 features=given.get("features", ()))
    return base.replace(**given)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "emit", help="write one variant as a standalone Python module",
        description="Write a module exposing paged_attention_decode (or, with --kernel "
                    "attention, paged_attention for any query length) for one variant, e.g. "
                    "'kgen emit --head-dim 128 --block-size 16 --group-size 4 --split-k 4 "
                    "--dtype bf16 -o decode.py', or with an fp8 cache and features "
                    "'... --kv-dtype fp8_e4m3 --features sliding_window,soft_cap'. Unset launch "
                    "options take the default heuristic.")
    add_axis_options(parser, multiple=False)
    parser.add_argument("--key", default=None, help="a variant key instead of the axis options")
    add_emit_gpu_options(parser)
    parser.add_argument("-o", "--output", required=True, metavar="FILE.py", help="module to write")
    parser.add_argument("--allow-pruned", action="store_true",
                        help="emit even if a prune rule rejects the variant")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.gpu:
        if kernel_family(args).name != "decode":
            raise ValueError(f"--gpu={args.gpu!r} reads decode records; the tuning database has no "
                             f"--kernel {args.kernel} records to emit from")
        config = emit_config_from_db(args, given_axes(args))
    else:
        for name in ("batch", "context"):
            if getattr(args, name) is not None:
                raise ValueError(f"--{name}={getattr(args, name)} only applies with --gpu NAME")
        config = config_from_args(args)
    reason = family_of(config).prune_reason(config)
    if reason and not args.allow_pruned:
        raise ValueError(f"variant {config.key} is pruned ({reason}); pass --allow-pruned to emit it")
    # The command that reproduces this file exactly, whatever options named the variant.
    command_line = f"kgen emit --key {config.key} -o {shlex.quote(str(args.output))}"
    path = emit(config, args.output, command_line=command_line)
    print(f"{config.key} -> {path}")
    return 0
