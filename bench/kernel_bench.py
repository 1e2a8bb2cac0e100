"""Kernel benchmark: paged decode attention vs device copy bandwidth and torch SDPA.

For each (dtype, head dim, block size, group size, batch x context) the script times

- kgen's default variant (``kgen.space.default_config`` with split-K ``auto``),
- the variant the tuning database gives for the device (the runtime's dispatch lookup; the row
  says whether it came from a tuned record or a fallback),
- torch ``scaled_dot_product_attention`` on the same data laid out contiguously,

and reports the median time, the achieved bandwidth (K/V bytes read once plus query and output)
and its fraction of the device-to-device copy bandwidth measured in the same run. Every kernel's
output is checked against SDPA's (same dtype, compared in float32) before it is timed.

On a GPU timings come from ``triton.testing.do_bench`` (median, L2 flushed). Without one the
script still runs (``--quick``, under ``TRITON_INTERPRET=1``) on tiny sizes, to test the script,
and its timings are CPU wall-clock: useful for nothing but checking that it works.

Examples::

    python bench/kernel_bench.py --quick --json /tmp/k.json          # CPU smoke run
    python bench/kernel_bench.py --json bench/results/h100/kernel_bench.json   # on a GPU
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from kgen.build import load_kernel  # noqa: E402  (kernel modules, and triton, load per call)
from kgen.db.lookup import lookup  # noqa: E402
from kgen.space import default_config  # noqa: E402

GPU_SHAPES = [(1, 32768), (4, 8192), (64, 4096), (256, 1024)]
CPU_SHAPES = [(1, 96), (3, 40)]  # interpreter smoke sizes
NUM_HEADS = 32  # query heads (Llama-7B/8B-like); KV heads = NUM_HEADS // group


def _timer(device: str):
    """A function fn -> median milliseconds, with the L2 flushed between runs on a GPU."""
    if device == "cuda":
        import triton.testing

        def cuda_time(fn):
            return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
        return cuda_time

    def cpu_time(fn, reps=3):
        fn()
        samples = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start) * 1e3)
        return sorted(samples)[len(samples) // 2]
    return cpu_time


def copy_bandwidth(torch, device: str, timer, nbytes: int) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes // 2, dtype=torch.float16, device=device).normal_()
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    return 2 * nbytes / (ms * 1e-3) / 1e9


def make_case(torch, *, dtype, head_dim, block_size, group, batch, context, device, seed):
    """Random paged inputs (permuted physical blocks) plus the same K/V laid out contiguously."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    num_kv = NUM_HEADS // group
    blocks_per_seq = -(-context // block_size)
    num_blocks = batch * blocks_per_seq
    perm = torch.randperm(num_blocks, generator=gen).to(torch.int32)
    # block_tables: [batch, blocks_per_seq] int32, a random permutation of the physical blocks
    block_tables = perm.view(batch, blocks_per_seq).to(device)
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    shape = (num_blocks, block_size, num_kv, head_dim)
    key_cache = torch.randn(shape, dtype=dtype, device=device)
    value_cache = torch.randn(shape, dtype=dtype, device=device)
    query = torch.randn(batch, NUM_HEADS, head_dim, dtype=dtype, device=device)
    # contiguous copies for SDPA: [batch, num_kv, context, head_dim]
    k_contig = key_cache[block_tables.long()].reshape(batch, -1, num_kv, head_dim)[:, :context]
    v_contig = value_cache[block_tables.long()].reshape(batch, -1, num_kv, head_dim)[:, :context]
    return dict(query=query, key_cache=key_cache, value_cache=value_cache,
                block_tables=block_tables, seq_lens=seq_lens,
                k_contig=k_contig.transpose(1, 2).contiguous(),
                v_contig=v_contig.transpose(1, 2).contiguous())


def sdpa_fn(torch, case, group):
    import torch.nn.functional as F

    q = case["query"].unsqueeze(2)  # [batch, heads, 1, head_dim]
    k, v = case["k_contig"], case["v_contig"]
    if group > 1:  # expand KV heads once, outside the timed region (SDPA reads them per q head)
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    return lambda: F.scaled_dot_product_attention(q, k, v)


def bytes_moved(case, elsize: int) -> int:
    kv_tokens = int(case["seq_lens"].sum())
    _, _, num_kv, head_dim = case["key_cache"].shape
    return 2 * kv_tokens * num_kv * head_dim * elsize + 2 * case["query"].numel() * elsize


def run(args) -> dict:
    import torch

    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    timer = _timer(device)
    copy_gbs = copy_bandwidth(torch, device, timer, (1 << 31) if device == "cuda" else (1 << 24))
    gpu_name = _common.gpu_name(torch) if device == "cuda" else "interpreter"
    shapes = (GPU_SHAPES if device == "cuda" else CPU_SHAPES)
    if args.shapes:
        shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    combos = list(itertools.product(args.dtypes, args.head_dims, args.block_sizes, args.groups, shapes))
    rows = []
    for i, (dt, d, bs, g, (batch, ctx)) in enumerate(combos):
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[dt]
        case = make_case(torch, dtype=dtype, head_dim=d, block_size=bs, group=g, batch=batch,
                         context=ctx, device=device, seed=i)
        sdpa = sdpa_fn(torch, case, g)
        ref = sdpa().squeeze(2).float()
        nbytes = bytes_moved(case, case["query"].element_size())
        row = dict(dtype=dt, head_dim=d, block_size=bs, group_size=g, batch=batch, context=ctx,
                   bytes=nbytes)
        kernels = {"default": load_kernel(default_config(head_dim=d, block_size=bs, group_size=g,
                                                         dtype=dt, split_k=0)).paged_attention_decode}
        # what the runtime's dispatch would use: a tuned record, or a fallback it names
        found = lookup(gpu_name, dtype=dt, head_dim=d, block_size=bs, group_size=g,
                       num_seqs=batch, max_context=ctx)
        row["tuned_source"] = found.source
        kernels["tuned"] = load_kernel(found.config).paged_attention_decode
        args_in = (case["query"], case["key_cache"], case["value_cache"], case["block_tables"],
                   case["seq_lens"])
        for name, kernel in kernels.items():
            out = torch.full_like(case["query"], float("nan"))
            kernel(*args_in, out=out, max_seq_len=ctx)
            err = float((out.float() - ref).abs().max())
            ok = bool(err < 2e-2 * max(1.0, float(ref.abs().max())))
            ms = timer(lambda: kernel(*args_in, out=out, max_seq_len=ctx)) if ok else float("nan")
            row[f"{name}_ms"] = ms
            row[f"{name}_gbs"] = nbytes / (ms * 1e-3) / 1e9
            row[f"{name}_frac_copy"] = row[f"{name}_gbs"] / copy_gbs
            row[f"{name}_max_err"] = err
            row[f"{name}_variant"] = _common.kernel_key(kernel)
        row["sdpa_ms"] = timer(sdpa)
        row["speedup_vs_sdpa"] = row["sdpa_ms"] / row["tuned_ms"]
        row["default_speedup_vs_sdpa"] = row["sdpa_ms"] / row["default_ms"]
        rows.append(row)
        print(f"[{i + 1}/{len(combos)}] {dt} d{d} b{bs} g{g} {batch}x{ctx}: "
              f"default {row['default_ms']:.4f} ms ({row['default_frac_copy']:.0%} of copy), "
              f"tuned {row['tuned_ms']:.4f} ms, sdpa {row['sdpa_ms']:.4f} ms", flush=True)
        del case
    return dict(machine=_common.machine_info(), device=device, gpu=gpu_name,
                copy_bandwidth_gbs=copy_gbs, rows=rows)


def table(result: dict) -> str:
    """The Markdown table of a result (``result["note"]``, when present, comes first)."""
    head = ("| dtype | d | block | g | batch x ctx | default ms | default GB/s | % copy "
            "| default / SDPA speedup | tuned ms (source) | % copy | SDPA ms | tuned / SDPA speedup |")
    lines = [result["note"], ""] if result.get("note") else []
    lines += [f"Device: {result['gpu']} ({result['device']}), copy bandwidth "
              f"{result['copy_bandwidth_gbs']:.0f} GB/s (read + write)", "", head,
              "|" + "---|" * 13]
    for r in result["rows"]:
        source = f" ({r['tuned_source']})" if r.get("tuned_source") else ""
        default_speedup = r["sdpa_ms"] / r["default_ms"]  # also in the row of newer results
        lines.append(
            f"| {r['dtype']} | {r['head_dim']} | {r['block_size']} | {r['group_size']} "
            f"| {r['batch']} x {r['context']} | {r['default_ms']:.4f} | {r['default_gbs']:.0f} "
            f"| {r['default_frac_copy']:.0%} | {default_speedup:.2f}x | {r['tuned_ms']:.4f}{source} "
            f"| {r['tuned_frac_copy']:.0%} "
            f"| {r['sdpa_ms']:.4f} | {r['speedup_vs_sdpa']:.2f}x |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="small sweep: head dim 128, block 16 (tiny shapes without a GPU)")
    parser.add_argument("--json", type=Path, help="write the results as JSON here")
    parser.add_argument("--md", type=Path, help="write the table as Markdown here")
    parser.add_argument("--dtypes", default="fp16,bf16")
    parser.add_argument("--head-dims", default="128,64,256")
    parser.add_argument("--block-sizes", default="16,32")
    parser.add_argument("--groups", default="1,8")
    parser.add_argument("--shapes", default="", help="batch x context list, e.g. 1x32768,64x4096")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is present")
    parser.add_argument("--from-json", type=Path, metavar="PATH",
                        help="measure nothing: print (and with --md write) the table of a results "
                             "JSON written earlier")
    args = parser.parse_args(argv)
    if args.from_json:
        text = table(json.loads(args.from_json.read_text()))
        print(text)
        _common.write_outputs({}, text, md_path=args.md)
        return 0
    if args.quick:
        args.head_dims, args.block_sizes = "128", "16"
    args.dtypes = args.dtypes.split(",")
    args.head_dims = [int(x) for x in args.head_dims.split(",")]
    args.block_sizes = [int(x) for x in args.block_sizes.split(",")]
    args.groups = [int(x) for x in args.groups.split(",")]
    _common.use_interpreter_without_gpu(force=args.cpu)
    result = run(args)
    text = table(result)
    print(text)
    _common.write_outputs(result, text, json_path=args.json, md_path=args.md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
