"""Feature rows of the kernel benchmark (used by bench/kernel_bench.py): fp8 KV and sliding window.

* fp8 rows: the same paged case as a plain row, with the caches rounded to fp8 (one-element fp32
  scale tensors, as vLLM passes them). Bandwidth is counted on the fp8 bytes read; the row also
  gives its time as a fraction of the plain row's (the issue's target: approaching 0.5 at large
  batch, since half the bytes are read).
* window rows: a fixed sliding window, a growing context. The window variant reads only the
  window's pages, so its time should stay flat while the plain variant's grows with the context;
  bandwidth is counted on the window's tokens.

Every kernel's output is checked against torch SDPA on the same (dequantized / windowed) data
before it is timed; a wrong kernel leaves NaN times.
"""

from __future__ import annotations

from kernel_targets import sdpa_fn
from kgen.build import load_kernel
from kgen.db.lookup import lookup
from kgen.dtypes import kv_torch_dtype
from kgen.shape import AttentionShape
from kgen.space import default_config

FP8_SCALE = 0.5  # k_scale = v_scale; the caches hold fp8(randn) so K/V ~ 0.5 * N(0, 1)


def _check(out, ref) -> tuple[float, bool]:
    err = float((out.float() - ref).abs().max())
    return err, bool(err < 2e-2 * max(1.0, float(ref.abs().max())))


def _sdpa(torch, query, k_contig, v_contig, group):
    """SDPA of one query token per sequence over [batch, kv_heads, tokens, head_dim] K/V, reading
    each KV head once (``enable_gqa``; see kernel_targets.sdpa_fn)."""
    return sdpa_fn(torch, query, k_contig, v_contig, group)[0]


def fp8_row(torch, case, plain_row: dict, *, kv_dtype: str, timer, copy_gbs: float,
            gpu_name: str) -> dict:
    """One fp8-KV row for the plain row's case (same shape, caches rounded to ``kv_dtype``)."""
    dt, d, bs, g = (plain_row[k] for k in ("dtype", "head_dim", "block_size", "group_size"))
    batch, ctx = plain_row["batch"], plain_row["context"]
    fp8 = kv_torch_dtype(kv_dtype, dt)
    query = case["query"]
    key_cache, value_cache = case["key_cache"].to(fp8), case["value_cache"].to(fp8)
    scale = torch.tensor([FP8_SCALE], dtype=torch.float32, device=query.device)
    tables, lens = case["block_tables"], case["seq_lens"]
    # the reference reads the same fp8 values, dequantized, laid out contiguously
    dequant = [(c.to(query.dtype) * FP8_SCALE)[tables.long()].reshape(batch, -1, *c.shape[2:])[:, :ctx]
               .transpose(1, 2).contiguous() for c in (key_cache, value_cache)]
    ref = _sdpa(torch, query, *dequant, g)().squeeze(2).float()
    del dequant
    nbytes = (2 * int(lens.sum()) * key_cache.shape[2] * d * key_cache.element_size()
              + 2 * query.numel() * query.element_size())
    row = dict(dtype=dt, kv_dtype=kv_dtype, head_dim=d, block_size=bs, group_size=g, batch=batch,
               context=ctx, bytes=nbytes)
    found = lookup(gpu_name, AttentionShape(dtype=dt, head_dim=d, group_size=g, block_size=bs,
                                            kv_dtype=kv_dtype), num_seqs=batch, max_context=ctx)
    kernels = {"default": default_config(head_dim=d, block_size=bs, group_size=g, dtype=dt,
                                         kv_dtype=kv_dtype), "tuned": found.config}
    row["tuned_source"] = found.source
    for name, config in kernels.items():
        kernel = load_kernel(config).paged_attention_decode
        out = torch.full_like(query, float("nan"))

        def call():
            kernel(query, key_cache, value_cache, tables, lens, k_scale=scale, v_scale=scale,
                   out=out, max_seq_len=ctx)

        call()
        row[f"{name}_max_err"], ok = _check(out, ref)
        ms = timer(call) if ok else float("nan")
        row[f"{name}_ms"], row[f"{name}_variant"] = ms, config.key
        row[f"{name}_gbs"] = nbytes / (ms * 1e-3) / 1e9
        row[f"{name}_frac_copy"] = row[f"{name}_gbs"] / copy_gbs
    row["plain_default_ms"] = plain_row["default_ms"]
    row["time_vs_plain"] = row["default_ms"] / plain_row["default_ms"]
    return row


def window_rows(torch, args, *, make_case, timer, copy_gbs: float, gpu_name: str,
                device: str) -> list[dict]:
    """Rows of a fixed window over growing contexts: window variant vs plain variant vs SDPA on
    the window's tokens."""
    dt, d, bs = args.dtypes[0], args.head_dims[0], args.block_sizes[0]
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[dt]
    rows = []
    for window in args.windows:
        for g in args.groups:
            for ctx in args.window_contexts:
                batch = args.window_batch
                case = make_case(torch, dtype=dtype, head_dim=d, block_size=bs, group=g,
                                 batch=batch, context=ctx, device=device, seed=ctx + g)
                span = min(window, ctx)
                sdpa = _sdpa(torch, case["query"], case["k_contig"][:, :, ctx - span:],
                             case["v_contig"][:, :, ctx - span:], g)
                ref = sdpa().squeeze(2).float()
                args_in = (case["query"], case["key_cache"], case["value_cache"],
                           case["block_tables"], case["seq_lens"])
                _, _, num_kv, _ = case["key_cache"].shape
                nbytes = (2 * batch * span * num_kv * d * case["query"].element_size()
                          + 2 * case["query"].numel() * case["query"].element_size())
                found = lookup(gpu_name, AttentionShape(dtype=dt, head_dim=d, group_size=g,
                                                        block_size=bs, features=("sliding_window",)),
                               num_seqs=batch, max_context=ctx)
                row = dict(dtype=dt, head_dim=d, block_size=bs, group_size=g, batch=batch,
                           context=ctx, window=window, bytes=nbytes, tuned_source=found.source)
                swa = load_kernel(found.config).paged_attention_decode
                plain = load_kernel(default_config(head_dim=d, block_size=bs, group_size=g,
                                                   dtype=dt)).paged_attention_decode
                out = torch.full_like(case["query"], float("nan"))
                swa(*args_in, sliding_window=window, out=out, max_seq_len=ctx)
                row["window_max_err"], ok = _check(out, ref)
                ms = timer(lambda: swa(*args_in, sliding_window=window, out=out,
                                       max_seq_len=ctx)) if ok else float("nan")
                row.update(window_ms=ms, window_variant=found.config.key,
                           window_gbs=nbytes / (ms * 1e-3) / 1e9)
                row["window_frac_copy"] = row["window_gbs"] / copy_gbs
                row["plain_ms"] = timer(lambda: plain(*args_in, out=out, max_seq_len=ctx))
                row["sdpa_window_ms"] = timer(sdpa)
                rows.append(row)
                print(f"window {window} {dt} d{d} b{bs} g{g} {batch}x{ctx}: window kernel "
                      f"{row['window_ms']:.4f} ms, full-context kernel {row['plain_ms']:.4f} ms, "
                      f"SDPA on the window {row['sdpa_window_ms']:.4f} ms", flush=True)
                del case
    return rows


FP8_TABLE = (
    "fp8 KV cache (bandwidth counted on fp8 bytes; time vs the plain row's default variant)",
    ("dtype", "KV", "d", "block", "g", "batch x ctx", "default ms", "GB/s", "% copy",
     "x plain time", "tuned ms (source)"),
    lambda r: (r["dtype"], r["kv_dtype"], r["head_dim"], r["block_size"], r["group_size"],
               f"{r['batch']} x {r['context']}", f"{r['default_ms']:.4f}",
               f"{r['default_gbs']:.0f}", f"{r['default_frac_copy']:.0%}",
               f"{r['time_vs_plain']:.2f}", f"{r['tuned_ms']:.4f} ({r['tuned_source']})"))
WINDOW_TABLE = (
    "Sliding window (fixed window, growing context; bandwidth on the window's tokens)",
    ("dtype", "d", "block", "g", "window", "batch x ctx", "window kernel ms", "GB/s", "% copy",
     "full-context kernel ms", "SDPA on window ms"),
    lambda r: (r["dtype"], r["head_dim"], r["block_size"], r["group_size"], r["window"],
               f"{r['batch']} x {r['context']}", f"{r['window_ms']:.4f} ({r['tuned_source']})",
               f"{r['window_gbs']:.0f}", f"{r['window_frac_copy']:.0%}",
               f"{r['plain_ms']:.4f}", f"{r['sdpa_window_ms']:.4f}"))


def tables(result: dict) -> list[str]:
    """Markdown tables of the fp8 and window rows (empty when there are none)."""
    lines = []
    for key, (title, header, cells) in (("fp8_rows", FP8_TABLE), ("window_rows", WINDOW_TABLE)):
        if result.get(key):
            lines += ["", title, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(str(c) for c in cells(r)) + " |" for r in result[key]]
    return lines
