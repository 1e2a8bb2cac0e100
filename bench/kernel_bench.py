"""Kernel benchmark: paged decode attention vs device copy bandwidth and torch SDPA.

For each (dtype, head dim, block size, group size, batch x context) the script times

- kgen's default variant (``kgen.space.default_config`` with split-K ``auto``),
- the variant the tuning database gives for the device (the runtime's dispatch lookup; the row
  says whether it came from a tuned record or a fallback),
- torch ``scaled_dot_product_attention`` on the same data laid out contiguously, reading each KV
  head once (``enable_gqa=True`` on the unexpanded KV heads for groups > 1; see
  :mod:`kernel_targets`); the expanded-heads SDPA time is kept in the JSON for reference,

and reports the median time, the achieved bandwidth (K/V bytes read once plus query and output),
its fraction of the device-to-device copy bandwidth measured in the same run, the speedup over
SDPA and tuned over default. Every kernel's output is checked against SDPA's (same dtype,
compared in float32) before it is timed. On a GPU, rows with batch <= 4 also get the tuned
kernel's CUDA-graph replay time (launch overhead removed) and its per-kernel device time (split-K
partials vs merge). The issue-13 targets (:mod:`kernel_targets`) are judged over the suite rows and
printed, and written into the JSON (``targets``) and the Markdown; JSON and Markdown are rewritten
after every row, so a run cut short keeps what it measured.

The ``paged_attention`` family (any query length) gets its own rows (bench/kernel_bench_attention.py,
``--no-attention`` skips them): prefill chunks of 512 and 2048 over 0, 4k and 32k contexts vs
SDPA, speculative q_len 4 and 8 at 8k and 32k vs the decode kernel run q_len times, and q_len 1
vs the decode kernel.

Two more kinds of rows (bench/kernel_bench_features.py): fp8-KV rows for every plain row
(``--kv-dtypes``; bandwidth on the fp8 bytes, time as a fraction of the plain row's) and
sliding-window rows (``--windows``: a fixed window over the contexts of ``--window-contexts``;
the window variant's time should stay flat while the full-context kernel's grows).

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
import kernel_bench_attention as attention  # noqa: E402
import kernel_bench_features as features  # noqa: E402
import kernel_targets  # noqa: E402
import timing  # noqa: E402
from kernel_targets import NUM_HEADS  # noqa: E402

from kgen.build import load_kernel  # noqa: E402  (kernel modules, and triton, load per call)
from kgen.db.lookup import lookup  # noqa: E402
from kgen.dispatch import get_dispatcher  # noqa: E402
from kgen.paths import template_hash  # noqa: E402
from kgen.shape import AttentionShape  # noqa: E402
from kgen.space import default_config  # noqa: E402

GPU_SHAPES = list(kernel_targets.SUITE_SHAPES)
CPU_SHAPES = [(1, 96), (3, 40)]  # interpreter smoke sizes
DETAIL_MAX_BATCH = 4  # rows this small also get graph replay time and the per-kernel breakdown
GPU_WINDOW = dict(windows="4096", contexts="4096,8192,16384,32768", batch=8)
CPU_WINDOW = dict(windows="16", contexts="32,64", batch=2)  # interpreter smoke sizes


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


def bytes_moved(case, elsize: int) -> int:
    kv_tokens = int(case["seq_lens"].sum())
    _, _, num_kv, head_dim = case["key_cache"].shape
    return 2 * kv_tokens * num_kv * head_dim * elsize + 2 * case["query"].numel() * elsize


def split_plan(kernel, query, key_cache, ctx) -> dict:
    """The partitions a kernel's launcher used for this shape, and the device slots it planned
    with (SMs, resident programs per SM), read after its calls so they are the steady state."""
    g = getattr(kernel, "__globals__", {})
    num_seqs, num_kv = query.shape[0], key_cache.shape[2]
    if "device_slots" not in g:
        return {}
    sms, per_sm = g["device_slots"](query.device)
    fixed = g.get("_SPLIT_K", 0)
    splits = fixed if fixed else g["choose_num_splits"](num_seqs, num_kv, ctx, device=query.device)
    return dict(splits=splits, sms=sms, programs_per_sm=per_sm, programs=num_seqs * num_kv * splits)


def _time_kernels(torch, timer, row, kernels, args_in, ref, ctx, nbytes, copy_gbs, detail):
    """Check each kernel against SDPA's output, then time it; fills the row's per-kernel fields.

    When the tuned kernel is the default one (no usable record), it is measured once and both
    columns hold that measurement (``tuned_same_as_default``): the same kernel, not two samples.
    """
    same = kernels["tuned"] is kernels["default"]
    row["tuned_same_as_default"] = same
    for name, kernel in kernels.items():
        if name == "tuned" and same:
            row.update({k.replace("default_", "tuned_", 1): v for k, v in list(row.items())
                        if k.startswith("default_")})
            continue
        out = torch.full_like(args_in[0], float("nan"))
        kernel(*args_in, out=out, max_seq_len=ctx)
        err = float((out.float() - ref).abs().max())
        ok = bool(err < 2e-2 * max(1.0, float(ref.abs().max())))
        call = lambda: kernel(*args_in, out=out, max_seq_len=ctx)  # noqa: E731
        ms = timer(call) if ok else float("nan")
        row[f"{name}_ms"] = ms
        row[f"{name}_gbs"] = nbytes / (ms * 1e-3) / 1e9
        row[f"{name}_frac_copy"] = row[f"{name}_gbs"] / copy_gbs
        row[f"{name}_max_err"] = err
        row[f"{name}_variant"] = _common.kernel_key(kernel)
        row[f"{name}_plan"] = split_plan(kernel, args_in[0], args_in[1], ctx)
        if detail and ok and (name == "tuned" or same):  # the kernel the dispatch serves
            row["tuned_graph_ms"] = timing.graph_ms(torch, timer, call)
            names = getattr(kernel, "__globals__", {}).get("KERNELS", ())
            row["tuned_kernel_us"] = timing.kernel_device_us(torch, call, names)


def run(args, on_row=None) -> dict:
    """Benchmark every (dtype, head dim, block, group, shape); ``on_row(result)`` after each row."""
    import torch

    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    timer = _timer(device)
    copy_gbs = copy_bandwidth(torch, device, timer, (1 << 31) if device == "cuda" else (1 << 24))
    gpu_name = _common.gpu_name(torch) if device == "cuda" else "interpreter"
    shapes = (GPU_SHAPES if device == "cuda" else CPU_SHAPES)
    if args.shapes:
        shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    combos = list(itertools.product(args.dtypes, args.head_dims, args.block_sizes, args.groups, shapes))
    rows, fp8_rows = [], []
    window = GPU_WINDOW if device == "cuda" else CPU_WINDOW
    args.windows = _ints(args.windows if args.windows is not None else window["windows"])
    args.window_contexts = _ints(args.window_contexts or window["contexts"])
    args.window_batch = args.window_batch or window["batch"]
    result = dict(machine=_common.machine_info(), template_hash=template_hash(), device=device,
                  gpu=gpu_name, copy_bandwidth_gbs=copy_gbs, sdpa_enable_gqa=kernel_targets.gqa_supported(torch),
                  rows=rows, fp8_rows=fp8_rows, window_rows=[])
    for i, (dt, d, bs, g, (batch, ctx)) in enumerate(combos):
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[dt]
        case = make_case(torch, dtype=dtype, head_dim=d, block_size=bs, group=g, batch=batch,
                         context=ctx, device=device, seed=i)
        sdpa, mode = kernel_targets.sdpa_fn(torch, case["query"], case["k_contig"], case["v_contig"], g)
        ref = sdpa().squeeze(2).float()
        nbytes = bytes_moved(case, case["query"].element_size())
        row = dict(dtype=dt, head_dim=d, block_size=bs, group_size=g, batch=batch, context=ctx,
                   num_heads=NUM_HEADS, bytes=nbytes, sdpa_mode=mode)
        kernels = {"default": load_kernel(default_config(head_dim=d, block_size=bs, group_size=g,
                                                         dtype=dt, split_k=0)).paged_attention_decode}
        # what the runtime's dispatch would use: a tuned record, or a fallback it names
        found = lookup(gpu_name, AttentionShape(dtype=dt, head_dim=d, group_size=g, block_size=bs),
                       num_seqs=batch, max_context=ctx)
        row["tuned_source"] = found.source
        kernels["tuned"] = load_kernel(found.config).paged_attention_decode
        args_in = (case["query"], case["key_cache"], case["value_cache"], case["block_tables"],
                   case["seq_lens"])
        _time_kernels(torch, timer, row, kernels, args_in, ref, ctx, nbytes, copy_gbs,
                      detail=device == "cuda" and batch <= DETAIL_MAX_BATCH)
        row["sdpa_ms"] = timer(sdpa)
        if g > 1:  # the old comparison, for reference: SDPA over KV heads expanded g times
            expanded, _ = kernel_targets.sdpa_fn(torch, case["query"], case["k_contig"],
                                                 case["v_contig"], g, expand=True)
            row["sdpa_expanded_ms"] = timer(expanded)
        row["speedup_vs_sdpa"] = row["sdpa_ms"] / row["tuned_ms"]
        row["default_speedup_vs_sdpa"] = row["sdpa_ms"] / row["default_ms"]
        row["tuned_vs_default"] = row["default_ms"] / row["tuned_ms"]
        rows.append(row)
        print(f"[{i + 1}/{len(combos)}] {dt} d{d} b{bs} g{g} {batch}x{ctx}: "
              f"default {row['default_ms']:.4f} ms ({row['default_frac_copy']:.0%} of copy), "
              f"tuned {row['tuned_ms']:.4f} ms, sdpa ({mode}) {row['sdpa_ms']:.4f} ms", flush=True)
        for kv in args.kv_dtypes:
            problem = get_dispatcher(gpu_name).plan(AttentionShape(
                dtype=dt, head_dim=d, block_size=bs, group_size=g, kv_dtype=kv)).problem
            if problem:  # e.g. e4m3 on an A100: say so once per row, measure nothing
                print(f"    {kv}: skipped: {problem}", flush=True)
                continue
            fp8 = features.fp8_row(torch, case, row, kv_dtype=kv, timer=timer, copy_gbs=copy_gbs,
                                   gpu_name=gpu_name)
            fp8_rows.append(fp8)
            print(f"    {kv}: default {fp8['default_ms']:.4f} ms ({fp8['default_frac_copy']:.0%} "
                  f"of copy, {fp8['time_vs_plain']:.2f} x the plain time)", flush=True)
        if on_row:
            on_row(result)
        del case
    result["window_rows"] = features.window_rows(torch, args, make_case=make_case, timer=timer,
                                                 copy_gbs=copy_gbs, gpu_name=gpu_name, device=device)
    if not args.no_attention:
        result["attention_rows"] = attention.attention_rows(torch, args, timer=timer, device=device)
    return result


def _ms(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def table(result: dict) -> str:
    """The Markdown tables of a result: ``result["note"]`` first when present, the main table, the
    per-kernel device times, the fp8 and window rows, and the targets when they were judged
    (so that ``--from-json`` renders exactly what the run wrote)."""
    head = ("| dtype | d | block | g | batch x ctx | default ms | default GB/s | % copy "
            "| default / SDPA speedup | tuned ms (source) | % copy | tuned graph ms | SDPA ms "
            "| tuned / SDPA speedup | tuned / default | splits d/t |")
    lines = [result["note"], ""] if result.get("note") else []
    lines += [f"Device: {result['gpu']} ({result['device']}), copy bandwidth "
              f"{result['copy_bandwidth_gbs']:.0f} GB/s (read + write)", "", head,
              "|" + "---|" * 16]
    for r in result["rows"]:
        source = f" ({r['tuned_source']})" if r.get("tuned_source") else ""
        mode = f" ({r['sdpa_mode']})" if r.get("sdpa_mode") else ""
        default_speedup = r["sdpa_ms"] / r["default_ms"]  # also in the row of newer results
        lines.append(
            f"| {r['dtype']} | {r['head_dim']} | {r['block_size']} | {r['group_size']} "
            f"| {r['batch']} x {r['context']} | {r['default_ms']:.4f} | {r['default_gbs']:.0f} "
            f"| {r['default_frac_copy']:.0%} | {default_speedup:.2f}x | {r['tuned_ms']:.4f}{source} "
            f"| {r['tuned_frac_copy']:.0%} | {_ms(r.get('tuned_graph_ms'))} | {r['sdpa_ms']:.4f}{mode} "
            f"| {r['speedup_vs_sdpa']:.2f}x | {r['default_ms'] / r['tuned_ms']:.2f}x | {_splits(r)} |")
    split = [r for r in result["rows"] if r.get("tuned_kernel_us")]
    if split:
        lines += ["", "Tuned kernel device time per call (us, torch.profiler, L2 flushed):", "",
                  "| dtype | g | batch x ctx | kernels |", "|---|---|---|---|"]
        for r in split:
            parts = ", ".join(f"{k} {v:.1f}" for k, v in r["tuned_kernel_us"].items())
            lines.append(f"| {r['dtype']} | {r['group_size']} | {r['batch']} x {r['context']} | {parts} |")
    lines += features.tables(result)
    lines += attention.tables(result)
    if "targets" in result:
        lines += ["", kernel_targets.targets_markdown(result["targets"])]
    return "\n".join(lines)


def _splits(row) -> str:
    """``default/tuned`` partition counts of a row ('-' for results that did not record them)."""
    plans = [row.get(f"{name}_plan", {}).get("splits") for name in ("default", "tuned")]
    return "-" if plans == [None, None] else "/".join(str(p) for p in plans)


def _ints(text: str) -> list[int]:
    return [int(x) for x in str(text).split(",") if x.strip()]


def with_targets(result: dict, baseline) -> str:
    """Judge the targets into ``result`` and return its full Markdown (tables + targets)."""
    checks = kernel_targets.evaluate(result, baseline)
    result["targets"] = checks
    result["targets_summary"] = kernel_targets.summary(checks)
    return table(result)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="small sweep: head dim 128, block 16 (tiny shapes without a GPU)")
    _common.add_output_args(parser)
    parser.add_argument("--dtypes", default="fp16,bf16")
    parser.add_argument("--head-dims", default="128,64,256")
    parser.add_argument("--block-sizes", default="16,32")
    parser.add_argument("--groups", default="1,8")
    parser.add_argument("--shapes", default="", help="batch x context list, e.g. 1x32768,64x4096")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is present")
    parser.add_argument("--suite", action="store_true",
                        help="issue 13's shape suite: bf16,fp16, d128, block 16, groups 1,8, "
                             "1x32768,4x8192,64x4096,256x1024 (overrides the shape options)")
    parser.add_argument("--baseline", type=Path, default=kernel_targets.BASELINE,
                        help="committed kernel_bench JSON the no-regression target compares "
                             "against (default: %(default)s)")
    parser.add_argument("--kv-dtypes", default="fp8_e4m3",
                        help="fp8 caches to add a row for, after each plain row ('' for none; "
                             "fp8_e5m2 on GPUs older than sm_89)")
    parser.add_argument("--windows", default=None,
                        help="sliding windows of the window rows ('' for none; default 4096, "
                             "16 without a GPU)")
    parser.add_argument("--window-contexts", default=None,
                        help="contexts of the window rows (default 4096,8192,16384,32768; "
                             "32,64 without a GPU)")
    parser.add_argument("--window-batch", type=int, default=None,
                        help="sequences per window row (default 8; 2 without a GPU)")
    parser.add_argument("--no-attention", action="store_true",
                        help="skip the paged_attention (any query length) rows")
    parser.add_argument("--from-json", type=Path, metavar="PATH",
                        help="measure nothing: print (and with --md write) the table of a results "
                             "JSON written earlier")
    args = parser.parse_args(argv)
    args.kv_dtypes = [k.strip() for k in args.kv_dtypes.split(",") if k.strip()]
    if args.from_json:
        data = json.loads(args.from_json.read_text())
        text = table(data)
        print(text)
        _common.write_outputs(data, text, md_path=args.md, new_run=False)  # the JSON's provenance
        return 0
    if args.quick:
        args.head_dims, args.block_sizes = "128", "16"
    if args.suite:
        args.dtypes = ",".join(kernel_targets.SUITE_DTYPES)
        args.head_dims, args.block_sizes = str(kernel_targets.SUITE_HEAD_DIM), str(kernel_targets.SUITE_BLOCK_SIZE)
        args.groups = ",".join(map(str, kernel_targets.SUITE_GROUPS))
        args.shapes = args.shapes or ",".join(f"{b}x{c}" for b, c in kernel_targets.SUITE_SHAPES)
    args.dtypes = args.dtypes.split(",")
    args.head_dims = [int(x) for x in args.head_dims.split(",")]
    args.block_sizes = [int(x) for x in args.block_sizes.split(",")]
    args.groups = [int(x) for x in args.groups.split(",")]
    _common.use_interpreter_without_gpu(force=args.cpu)
    baseline = kernel_targets.load_baseline(args.baseline)  # read before --json may overwrite it

    def save(partial):  # after every row: a run cut short keeps what it measured
        _common.write_outputs(partial, with_targets(partial, baseline), json_path=args.json,
                              md_path=args.md, quiet=True)

    result = run(args, on_row=save)
    text = with_targets(result, baseline)
    _common.publish(result, text, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
