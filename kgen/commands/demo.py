"""``kgen demo``: emit a few kernels, run them on random paged data, compare with float64.

Without a GPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1 is set in this
process before any kernel module is imported). Exit code 1 if any variant misses its tolerance.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from kgen.build import import_file
from kgen.render import emit
from kgen.space import default_config

# (variant fields, num_kv_heads, seq_lens): single pass, split-K auto, fixed split-K;
# lengths at block edges, an empty context and one spanning several partitions.
DEMO_CASES = (
    (dict(head_dim=128, block_size=16, group_size=4, split_k=1, dtype="fp16"), 2, [0, 1, 16, 17, 95]),
    (dict(head_dim=128, block_size=16, group_size=4, split_k="auto", dtype="bf16"), 2, [15, 33, 260]),
    (dict(head_dim=80, block_size=32, group_size=3, split_k=4, dtype="fp32"), 1, [31, 32, 200]),
)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="emit kernels and check them against a float64 reference",
        description="Emit a few variants as standalone modules, run them on random paged KV "
                    "caches (permuted and shared blocks, ragged lengths) and compare each with a "
                    "float64 reference. Uses the Triton interpreter when no GPU is present.")
    parser.add_argument("--out-dir", default=None, help="keep the emitted modules here")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    parser.set_defaults(func=run)


def _use_interpreter_if_no_gpu() -> str:
    import torch

    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return "cuda"
    os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported
    return "cpu"


def _run_case(fields, num_kv_heads, lens, out_dir: Path, device: str, seed: int) -> dict:
    import torch

    # kgen.reference imports torch: loaded when the demo runs, not for every `kgen` command
    from kgen.reference import (TOLERANCES, make_paged_inputs, max_abs_error,
                                paged_attention_reference, within_tolerance)

    config = default_config(head_dim=fields["head_dim"], block_size=fields["block_size"],
                            group_size=fields["group_size"], dtype=fields["dtype"],
                            split_k=fields["split_k"])
    path = emit(config, out_dir / f"{config.key}.py", command_line="kgen demo")
    module = import_file(path, f"kgen_demo_{config.key.replace('-', '_')}")
    num_heads = num_kv_heads * config.group_size
    inputs = make_paged_inputs(len(lens), num_heads, num_kv_heads, config.head_dim,
                               config.block_size, lens, config.dtype, seed=seed, device=device)
    out = torch.full_like(inputs["query"], float("nan"))  # poison: every element must be written
    start = time.perf_counter()
    module.paged_attention_decode(**inputs, out=out, validate=True)
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    ref = paged_attention_reference(**inputs)
    return {
        "variant": config.key,
        "shape": f"{len(lens)}x{num_heads}/{num_kv_heads}x{config.head_dim} len<={max(lens)}",
        "err": max_abs_error(out, ref),
        "tol": TOLERANCES[config.dtype],
        "ok": within_tolerance(out, ref, config.dtype),
        "ms": elapsed * 1e3,
    }


def run(args: argparse.Namespace) -> int:
    device = _use_interpreter_if_no_gpu()
    mode = "compiled on GPU" if device == "cuda" else "Triton interpreter on CPU"
    with tempfile.TemporaryDirectory(prefix="kgen-demo-") as tmp:
        out_dir = Path(args.out_dir) if args.out_dir else Path(tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        rows = [_run_case(fields, kv, lens, out_dir, device, args.seed + i)
                for i, (fields, kv, lens) in enumerate(DEMO_CASES)]
    print(f"kgen demo: emitted modules vs float64 reference ({mode}; first call includes compile)")
    header = f"{'variant':<46} {'seqs x heads/kv x dim':<26} {'max abs err':>11} {'atol,rtol':>13} {'result':>6} {'ms':>8}"
    print(header)
    print("-" * len(header))
    for r in rows:
        tol = f"{r['tol'][0]:g},{r['tol'][1]:g}"
        print(f"{r['variant']:<46} {r['shape']:<26} {r['err']:>11.2e} {tol:>13} "
              f"{'pass' if r['ok'] else 'FAIL':>6} {r['ms']:>8.1f}")
    failed = sum(not r["ok"] for r in rows)
    print(f"{len(rows) - failed}/{len(rows)} passed")
    return 1 if failed else 0
