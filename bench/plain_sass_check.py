"""Plain variants compile to the same machine code as with an earlier revision's templates.

The attention features (fp8 KV, sliding window, soft cap, ALiBi, sinks) are compile-time branches
and extra kernel parameters only of the variants that have them. This script checks the claim
that a plain variant pays nothing: it renders each variant's module twice, with the templates of
``--base`` (a git revision, read with ``git show``) and with the working tree's, compiles both for
sm_80 and sm_90 without a GPU (kgen.audit's launch capture and ``triton.compile``) and compares
the SASS instruction lists (opcodes and operands) and register counts kernel by kernel.

Example::

    python bench/plain_sass_check.py --base dd2d000 --head 312bb8c \
        --json bench/results/plain_sass_check.json

``--head`` (default: the working tree) renders the second side from another revision's templates,
so the change that added the features can be checked alone, apart from later template changes.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile in this process
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from kgen.audit.asm import resource_usage, sass_instructions  # noqa: E402
from kgen.audit.capture import capture_launches, load_jit_module, specialize  # noqa: E402
from kgen.audit.compile import compile_for, read_cubin  # noqa: E402
from kgen.render import render_source  # noqa: E402
from kgen.space import default_config  # noqa: E402


def default_variants() -> list:
    out = [default_config(head_dim=d, block_size=16, group_size=8, dtype=t, split_k=s)
           for t in ("fp16", "bf16", "fp32") for d in (80, 128) for s in (1, "auto")]
    return out + [default_config(head_dim=256, block_size=1, group_size=1, dtype="fp32", split_k=4)]


def export(rev: str, folder: Path) -> Path:
    """``kgen/`` and ``templates/`` of git revision ``rev``, unpacked into ``folder``."""
    archive = subprocess.run(["git", "archive", rev, "kgen", "templates"], cwd=_common.REPO,
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


RENDER = ("import sys; sys.path.insert(0, sys.argv[1]); from kgen.render import render_source; "
          "from kgen.variant import VariantConfig; "
          "sys.stdout.write(render_source(VariantConfig.from_key(sys.argv[2])))")


def rendered(config, folder: Path | None) -> str:
    """The variant's module as the revision unpacked in ``folder`` renders it (its own code and
    templates, in a child process), or as this working tree does (``folder`` None)."""
    if folder is None:
        return render_source(config)
    env = {**os.environ, "KGEN_CACHE": str(folder / "cache")}
    return subprocess.run([sys.executable, "-c", RENDER, str(folder), config.key], env=env,
                          capture_output=True, text=True, check=True).stdout


def compile_module(source: str, config, folder: Path, tag: str) -> dict:
    """{(kernel, target): (sass instruction list, registers)} of one rendered module."""
    path = folder / f"{tag}-{config.key}.py"
    path.write_text(source)
    out = {}
    for launch in capture_launches(load_jit_module(path), config):
        signature, constexprs, attrs, options = specialize(launch.fn, launch.args, launch.kwargs)
        for target, cc in (("sm_80", 80), ("sm_90", 90)):
            dump = read_cubin(compile_for(launch.fn, signature, constexprs, attrs, options,
                                          cc).asm["cubin"])
            out[(launch.name, target)] = (sass_instructions(dump), resource_usage(dump)["registers"])
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="dd2d000", help="git revision of the earlier templates")
    parser.add_argument("--head", default=None,
                        help="git revision of the later templates (default: the working tree)")
    parser.add_argument("--json", default=None, help="write the result here (and .md beside it)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="kgen-sass-") as tmp:
        tmp = Path(tmp)
        (tmp / "base").mkdir()
        base_dir = export(args.base, tmp / "base")
        head_dir = None
        if args.head:
            (tmp / "head").mkdir()
            head_dir = export(args.head, tmp / "head")
        for config in default_variants():
            now, before = rendered(config, head_dir), rendered(config, base_dir)
            old = compile_module(before, config, tmp, "base")
            new = compile_module(now, config, tmp, "now")
            for (kernel, target), (ins, regs) in sorted(new.items()):
                old_ins, old_regs = old[(kernel, target)]
                rows.append({"variant": config.key, "kernel": kernel, "target": target,
                             "base_instructions": len(old_ins), "instructions": len(ins),
                             "base_registers": old_regs, "registers": regs,
                             "sass_sha1": hashlib.sha1(repr(ins).encode()).hexdigest()[:12],
                             "identical": ins == old_ins and regs == old_regs})
            print(f"{config.key}: {'identical' if all(r['identical'] for r in rows[-len(new):]) else 'DIFFERENT'}",
                  flush=True)
    same = sum(r["identical"] for r in rows)
    head = args.head or "the working tree"
    lines = [f"# Plain variants: SASS of the modules rendered at {args.base} and at {head}", "",
             f"{same} of {len(rows)} (variant, kernel, target) compiles identical, instruction for "
             f"instruction (triton {_common.machine_info().get('triton')}, "
             f"{time.perf_counter() - start:.0f} s).", "",
             "| variant | kernel | target | instructions (base -> now) | registers (base -> now) "
             "| identical |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['kernel']} | {r['target']} | {r['base_instructions']} -> "
              f"{r['instructions']} | {r['base_registers']} -> {r['registers']} | "
              f"{'yes' if r['identical'] else 'NO'} |" for r in rows]
    text = "\n".join(lines)
    print(text)
    result = {"benchmark": "plain_sass_check", "base": args.base, "head": args.head,
              "machine": _common.machine_info(),
              "identical": same, "compiles": len(rows), "rows": rows}
    md = str(Path(args.json).with_suffix(".md")) if args.json else None
    _common.write_outputs(result, text, json_path=args.json, md_path=md)
    return 0 if same == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
