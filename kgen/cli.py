"""The ``kgen`` command line: a thin dispatcher over ``kgen.commands.<name>`` modules.

Each command module exposes ``register(subparsers)``, which adds its parser and sets
``func=run`` on it. Bad options and bad values end with exit code 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = ("variants", "emit", "demo", "inspect", "tune", "db")


class _OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad option as one line on stderr and exits 2."""

    def error(self, message: str) -> None:  # noqa: D401 - argparse hook
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="kgen",
        description=(
            "kgen generates Triton PagedAttention decode kernels from templates, audits them "
            "without a GPU, tunes them per GPU into a database, and emits standalone modules."
        ),
        epilog="Run 'kgen COMMAND --help' for the options of one command.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_OneLineParser)
    subparsers.required = True
    for name in COMMANDS:  # every command is part of kgen: a missing module is a broken install
        importlib.import_module(f"kgen.commands.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except (ValueError, LookupError, OSError) as exc:  # OSError names its file (unwritable output ...)
        sys.stderr.write(f"kgen {args.command}: error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write(f"kgen {args.command}: interrupted\n")
        return 130
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
