"""The CPU pieces behind runtime.generate()'s speed, measured one by one.

Each of the first three runs per dtype of ``--dtypes`` (float32 and bfloat16 by default):

1. ``linear``: ``F.linear`` (MKL sgemm in float32, oneDNN in bfloat16), the oneDNN-packed weight
   (``KGEN_CPU_LINEAR=onednn``) and kgen's GEMM (``runtime/native/gemm.c``, the default path in
   float32, and in bfloat16 where the CPU has AVX512-BF16), for the e2e model's projection shapes
   (hidden 512: qkv, o, gate_up, down, lm_head) and 1-2048 rows, at 1 and 2 threads; the time of
   all five shapes summed, warm (weights in cache) and, up to 256 rows, cold (weights from DRAM).
2. ``decode``: one layer's paged decode for a 64-sequence batch with contexts 16-768 (block 16,
   2 KV heads x 64, 8 query heads; q and cache in the dtype): the torch backend (grouped gather +
   SDPA; one group, the old path, and the default grouping) against the native C kernel, at 1 and
   2 threads; the native kernel's K/V bytes per second.
3. ``layer_ops``: the decoder's elementwise steps of one layer on the e2e model's shapes (residual
   add + RMSNorm over 512, SiLU(gate) * up over 1376, RoPE on 10 heads of 64) for 1-2048 rows:
   torch's ops (the fallback) against the C ops of ``runtime/model/native_ops.py``.
4. ``threads``: a short generate() run (16 of the e2e mixed requests) in fresh processes with 1
   thread, 2 threads under ``OMP_WAIT_POLICY=PASSIVE`` and 2 threads spinning (``ACTIVE``).

Each case reports the best of its repeats, with the load average, since the machine is shared.
Usage::

    python bench/cpu_kernels.py [--quick] [--threads-only] [--dtypes float32,bfloat16] [--json PATH] [--md PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401 - puts the checkout on sys.path
from _common import build_checkpoint

SHAPES = {"qkv": (768, 512), "o_proj": (512, 512), "gate_up": (2752, 512), "down": (512, 1376), "lm_head": (4096, 512)}


def best_ms(fn, repeats: int, inner: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(inner):
            fn()
        best = min(best, (time.perf_counter() - t) / inner)
    return best * 1e3


def _linears(dtype, copies: int, path: str) -> list[list]:
    """``copies`` sets of the five projections (random weights) on KGEN_CPU_LINEAR=``path``."""
    import torch

    from runtime.model.linear import Linear

    with _linear_path(path):
        return [[Linear((torch.randn(n, k) * k ** -0.5).to(dtype)) for n, k in SHAPES.values()] for _ in range(copies)]


@contextlib.contextmanager
def _linear_path(path: str):
    """KGEN_CPU_LINEAR=path while Linear objects are made, then as it was."""
    saved = os.environ.get("KGEN_CPU_LINEAR")
    os.environ["KGEN_CPU_LINEAR"] = path
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("KGEN_CPU_LINEAR")
        else:
            os.environ["KGEN_CPU_LINEAR"] = saved


def bench_linear(rows_list, threads_list, repeats, dtype) -> list[dict]:
    """Per row count: the five shapes summed through F.linear, oneDNN's packed weight and kgen's
    native GEMM (float32; bfloat16 with AVX512-BF16), warm (the same weights every call, so from
    cache) and cold (8 sets of weights in turn, 150 MB in float32: from DRAM, as in a decode step)."""
    import torch
    import torch.nn.functional as F

    from runtime.native_build import native_info

    out = []
    tol = dict(rtol=1e-4, atol=1e-3) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    paths = {"onednn": _linears(dtype, 8, "onednn")}
    if dtype == torch.float32 or (dtype == torch.bfloat16 and (native_info() or {}).get("bf16_gemm")):
        paths["native"] = _linears(dtype, 8, "native")
    _check_linear(paths, dtype, tol)
    dense = [(torch.randn(n, k) * k ** -0.5).to(dtype) for n, k in SHAPES.values()]
    for threads in threads_list:
        torch.set_num_threads(threads)
        for rows in rows_list:
            xs = {k: torch.randn(rows, k).to(dtype) for _, k in SHAPES.values()}
            inner = 2 if rows >= 1024 else 10
            row = {"dtype": _name(dtype), "threads": threads, "rows": rows, "loadavg": os.getloadavg()[0],
                   "aten_ms": sum(best_ms(lambda: F.linear(xs[w.shape[1]], w), repeats, inner) for w in dense)}
            for name, sets in paths.items():
                row[f"{name}_path"] = sets[0][0].path
                row[f"{name}_ms"] = sum(best_ms(lambda: lin(xs[k]), repeats, inner)
                                        for lin, (_, k) in zip(sets[0], SHAPES.values()))
                if rows <= 256:  # cold: one pass over the 8 sets per call of best_ms, per set
                    row[f"{name}_cold_ms"] = best_ms(lambda: [lin(xs[k]) for one in sets
                                                              for lin, (_, k) in zip(one, SHAPES.values())],
                                                     repeats, 1) / len(sets)
            row["speedup"] = row["aten_ms"] / row["onednn_ms"]
            if "native_ms" in row:
                row["native_vs_onednn"] = row["onednn_ms"] / row["native_ms"]
                if "native_cold_ms" in row:
                    row["native_vs_onednn_cold"] = row["onednn_cold_ms"] / row["native_cold_ms"]
            out.append(row)
    return out


def _check_linear(paths: dict, dtype, tol: dict) -> None:
    """Every timed path gives F.linear's result on its own weights (a wrong kernel is not timed as
    a fast one)."""
    import torch
    import torch.nn.functional as F

    from runtime.model.linear import Linear

    for name, sets in paths.items():
        for n, k in SHAPES.values():
            w = (torch.randn(n, k) * k ** -0.5).to(dtype)
            with _linear_path(name):
                fresh = Linear(w.clone())
            assert fresh.path == sets[0][0].path, (name, fresh.path)
            x = torch.randn(37, k).to(dtype)
            torch.testing.assert_close(fresh(x), F.linear(x, w), **tol)


def _name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def decode_case(seed=0, batch=64, dtype=None):
    import torch

    from runtime.attention import AttentionMetadata

    g = torch.Generator().manual_seed(seed)
    bs, kvh, d = 16, 2, 64
    lens = torch.randint(16, 769, (batch,), generator=g, dtype=torch.int32)
    need = [-(-int(n) // bs) for n in lens]
    num_blocks = sum(need) + 8
    dtype = dtype or torch.float32
    kc = torch.randn(num_blocks, bs, kvh, d, generator=g).to(dtype)
    vc = torch.randn(num_blocks, bs, kvh, d, generator=g).to(dtype)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables = torch.zeros(batch, max(need), dtype=torch.int32)
    for i, nb in enumerate(need):
        tables[i, :nb] = torch.tensor([perm.pop() for _ in range(nb)])
    q = torch.randn(batch, 8, d, generator=g).to(dtype)
    meta = AttentionMetadata(slot_mapping=None, prefills=[], num_prefill_tokens=0, block_tables=tables,
                             seq_lens=lens, max_seq_len=int(lens.max()))
    return q, kc, vc, meta, num_blocks


def bench_decode(threads_list, repeats, dtype) -> list[dict]:
    import torch

    from runtime.decode_native import NativeDecode, native_lacks
    from runtime.decode_torch import TorchDecode
    from runtime.kv_cache import LayerKV

    q, kc, vc, meta, num_blocks = decode_case(dtype=dtype)
    layer = LayerKV(kc, vc, 1.0, 1.0, dtype)
    backends = {"torch_one_group": TorchDecode(16, 2, 64, dtype, group_tokens=10 ** 9),
                "torch_grouped": TorchDecode(16, 2, 64, dtype)}
    if native_lacks(dtype, 8, 64, torch.device("cpu")) is None:
        backends["native"] = NativeDecode(16, 2, 8, 64, num_blocks, dtype=dtype)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    out = []
    for threads in threads_list:
        torch.set_num_threads(threads)
        row = {"dtype": _name(dtype), "threads": threads, "context_tokens": int(meta.seq_lens.sum()),
               "kv_bytes": int(meta.seq_lens.sum()) * 2 * 2 * 64 * kc.element_size()}
        ref = None
        for name, backend in backends.items():
            meta.extra.clear()
            backend.prepare(meta)
            got = backend.decode(q, layer, meta, 0.125)
            ref = got if ref is None else ref
            torch.testing.assert_close(got.float(), ref.float(), **tol)
            row[f"{name}_ms"] = best_ms(lambda: backend.decode(q, layer, meta, 0.125), repeats, 5)
        if "native" in backends:
            row["native_kernel"] = backends["native"].kernel
        row["loadavg"] = os.getloadavg()[0]
        out.append(row)
    return out


def bench_layer_ops(rows_list, threads_list, repeats, dtype) -> list[dict]:
    import torch
    import torch.nn.functional as F

    from runtime.model.native_ops import NativeOps
    from runtime.model.ops import rms_norm, rotate_half

    ops = NativeOps.for_model(dtype, torch.device("cpu"))
    if ops is None:
        return []
    out = []
    for threads in threads_list:
        torch.set_num_threads(threads)
        for rows in rows_list:
            x, delta, w = (torch.randn(*shape).to(dtype) for shape in ((rows, 512), (rows, 512), (512,)))
            gate_up, qk = torch.randn(rows, 2752).to(dtype), torch.randn(rows, 10, 64).to(dtype)
            cos, sin = torch.randn(rows, 1, 64).to(dtype), torch.randn(rows, 1, 64).to(dtype)
            inner = 3 if rows >= 1024 else 20
            cases = {
                "add_norm": (lambda: rms_norm(x + delta, w, 1e-5), lambda: ops.add_rms_norm(x, delta, w, 1e-5)),
                "silu_mul": (lambda: F.silu(gate_up[:, :1376]) * gate_up[:, 1376:], lambda: ops.silu_mul(gate_up)),
                "rope": (lambda: qk * cos + rotate_half(qk) * sin, lambda: ops.rope_(qk, cos, sin)),
            }
            row = {"dtype": _name(dtype), "threads": threads, "rows": rows}
            for name, (ref, fast) in cases.items():
                row[f"{name}_torch_ms"] = best_ms(ref, repeats, inner)
                row[f"{name}_native_ms"] = best_ms(fast, repeats, inner)
            row["loadavg"] = os.getloadavg()[0]
            out.append(row)
    return out


CHILD = r"""
import sys, time, json
sys.path.insert(0, {repo!r})
import runtime, torch
g = torch.Generator().manual_seed(1234)
lens = torch.randint(16, 257, (64,), generator=g).tolist()
prompts = [torch.randint(1, 4096, (k,), generator=g).tolist() for k in lens][:{n}]
new = torch.randint(16, 513, (64,), generator=g).tolist()[:{n}]
loaded = runtime.load_model({model!r}, device="cpu")
params = [runtime.SamplingParams(max_tokens=k, ignore_eos=True) for k in new]
runtime.generate(loaded, [[5, 6, 7]] * 2, runtime.SamplingParams(max_tokens=4), num_threads={threads})
t = time.perf_counter()
outs = runtime.generate(loaded, prompts, params, num_threads={threads})
e = time.perf_counter() - t
print(json.dumps({{"tokens_per_s": sum(new) / e, "seconds": e}}))
"""


def bench_threads(model_dir: Path, requests: int, repeats: int) -> list[dict]:
    out = []
    for threads, policy in ((1, "PASSIVE"), (2, "PASSIVE"), (2, "ACTIVE")):
        best = None
        loads = []
        for _ in range(repeats):
            code = CHILD.format(repo=str(_common.REPO), n=requests, model=str(model_dir), threads=threads)
            env = {**os.environ, "OMP_WAIT_POLICY": policy}
            env.pop("OMP_NUM_THREADS", None)
            loads.append(os.getloadavg()[0])
            res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
            r = json.loads(res.stdout.strip().splitlines()[-1])
            best = r if best is None or r["tokens_per_s"] > best["tokens_per_s"] else best
        out.append({"threads": threads, "omp_wait_policy": policy.lower(), **best, "loadavg": loads})
    return out


def table(results: dict) -> str:
    nat = results.get("native") or {}
    lines = [f"Load average at start {results['loadavg_start'][0]:.2f}, at end {results['loadavg_end'][0]:.2f}; "
             f"native library: {nat.get('isa')}, {nat.get('cflags')}", "",
             "Linear (5 projection shapes of the e2e model summed, best-of ms):", "",
             "Warm: the same weights every call (from cache); cold: 8 sets of weights in turn (from DRAM, as in a "
             "decode step), ms per set. Native: kgen's GEMM (runtime/native/gemm.c; bfloat16 where the CPU has "
             "AVX512-BF16).", "",
             "| dtype | threads | rows | F.linear ms | oneDNN packed ms | speedup | oneDNN cold ms | native ms | "
             "native cold ms | native / oneDNN warm | cold |", "|---|---|---|---|---|---|---|---|---|---|---|"]

    def cell(r, key, fmt="{:.2f}"):
        return fmt.format(r[key]) if key in r else "-"

    for r in results["linear"]:
        lines.append(f"| {r['dtype']} | {r['threads']} | {r['rows']} | {r['aten_ms']:.2f} | {r['onednn_ms']:.2f} | "
                     f"{r['speedup']:.2f}x | {cell(r, 'onednn_cold_ms')} | {cell(r, 'native_ms')} | "
                     f"{cell(r, 'native_cold_ms')} | {cell(r, 'native_vs_onednn', '{:.2f}x')} | "
                     f"{cell(r, 'native_vs_onednn_cold', '{:.2f}x')} |")
    lines += ["", "Paged decode, one layer, 64 sequences, contexts 16-768 (best-of ms; GB/s: the native kernel's "
              "K/V bytes per second):", "",
              "| dtype | threads | torch one group | torch grouped | native | native vs grouped | native GB/s |",
              "|---|---|---|---|---|---|---|"]
    for r in results["decode"]:
        nat = r.get("native_ms")
        native = "n/a" if nat is None else f"{nat:.2f}"
        gain = "" if nat is None else f"{r['torch_grouped_ms'] / nat:.2f}x"
        rate = "" if nat is None else f"{r['kv_bytes'] / nat / 1e6:.1f}"
        lines.append(f"| {r['dtype']} | {r['threads']} | {r['torch_one_group_ms']:.2f} | {r['torch_grouped_ms']:.2f} | "
                     f"{native} | {gain} | {rate} |")
    kernels = sorted({r["native_kernel"] for r in results["decode"] if "native_kernel" in r})
    if kernels:
        lines += ["", "Native kernels: " + "; ".join(kernels) + "."]
    if results.get("layer_ops"):
        lines += ["", "Elementwise steps of one layer, torch ops / C ops (best-of ms):", "",
                  "| dtype | threads | rows | add + RMSNorm | SiLU x up | RoPE |", "|---|---|---|---|---|---|"]
        for r in results["layer_ops"]:
            cells = [f"{r[f'{k}_torch_ms']:.3f} / {r[f'{k}_native_ms']:.3f}" for k in ("add_norm", "silu_mul", "rope")]
            lines.append(f"| {r['dtype']} | {r['threads']} | {r['rows']} | " + " | ".join(cells) + " |")
    if results.get("threads"):
        lines += ["", f"generate() on {results['thread_requests']} mixed requests, fresh processes (tok/s, best):", "",
                  "| threads | OpenMP wait policy | tok/s | load average before runs |", "|---|---|---|---|"]
        for r in results["threads"]:
            lines.append(f"| {r['threads']} | {r['omp_wait_policy']} | {r['tokens_per_s']:.0f} | "
                         f"{', '.join(f'{x:.2f}' for x in r['loadavg'])} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer sizes and repeats, no thread runs")
    ap.add_argument("--threads-only", action="store_true", help="only the generate() thread runs (3)")
    ap.add_argument("--dtypes", default="float32,bfloat16", help="dtypes of the linear, decode and layer_ops cases")
    ap.add_argument("--threads", default=None, help="thread counts of those cases (default 1,2; --quick 1)")
    _common.add_output_args(ap)
    args = ap.parse_args(argv)
    import torch

    from runtime.config import parse_dtype
    from runtime.native_build import native_info

    dtypes = [parse_dtype(d.strip(), name="--dtypes") for d in args.dtypes.split(",") if d.strip()]
    threads = [int(t) for t in (args.threads or ("1" if args.quick else "1,2")).split(",")]
    results = {"machine": _common.machine_info(), "native": native_info(), "loadavg_start": os.getloadavg()}
    repeats = 2 if args.quick else 7
    results["linear"], results["decode"], results["layer_ops"] = [], [], []
    for dtype in [] if args.threads_only else dtypes:
        results["linear"] += bench_linear([16, 64] if args.quick else [1, 16, 64, 256, 2048], threads, repeats, dtype)
        results["decode"] += bench_decode(threads, repeats, dtype)
        results["layer_ops"] += bench_layer_ops([64] if args.quick else [1, 64, 2048], threads, repeats, dtype)
    torch.set_num_threads(max(threads))
    if not args.quick:
        results["thread_requests"] = 16
        with tempfile.TemporaryDirectory() as tmp:
            from e2e_throughput import MODEL

            build_checkpoint(Path(tmp), MODEL)
            results["threads"] = bench_threads(Path(tmp), 16, 3)
    results["loadavg_end"] = os.getloadavg()
    text = table(results)
    _common.publish(results, text, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
