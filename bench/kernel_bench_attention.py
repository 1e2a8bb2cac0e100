"""Rows of the kernel benchmark for the ``paged_attention`` family (any query length).

Three kinds of rows, each with the family's default variant
(:func:`kgen.space_attention.default_attention_config`, segments ``auto``) called with both
planning bounds (the CUDA-graph-safe call), and a baseline:

* ``prefill``: one chunk of C new tokens (512, 2048) after a cached context (0, 4k, 32k) vs torch
  SDPA (``enable_gqa=True``, the unexpanded KV heads) on the same K/V laid out contiguously with
  the bottom-right causal mask (``is_causal`` when there is no context); TFLOP/s counted on the
  causal score / value products;
* ``spec``: speculative verification, q_len 4 and 8 new tokens per sequence after 8k and 32k
  contexts vs the decode kernel run q_len times (row r with seq_lens = context + r + 1);
* ``decode``: q_len 1 vs the decode kernel (``paged_attention_decode``, default variant).

Every kernel's output is checked against the baseline's (SDPA, or the decode kernel's rows) before
it is timed; a wrong kernel leaves NaN times. Without a GPU the sizes shrink to interpreter smoke
sizes (the script's test): such timings are CPU wall-clock and mean nothing.
"""

from __future__ import annotations

from kernel_targets import NUM_HEADS, gqa_supported
from kgen.build import load_kernel
from kgen.space import default_config
from kgen.space_attention import default_attention_config

GPU_SHAPES = {  # kind -> [(batch, q_len, context)]
    "prefill": [(1, c, ctx) for c in (512, 2048) for ctx in (0, 4096, 32768)],
    "spec": [(4, q, ctx) for q in (4, 8) for ctx in (8192, 32768)],
    "decode": [(1, 1, 32768), (4, 1, 8192), (64, 1, 4096)],
}
CPU_SHAPES = {"prefill": [(1, 16, 0), (1, 16, 32)], "spec": [(2, 2, 40), (2, 4, 24)],
              "decode": [(2, 1, 40)]}


def make_varlen_case(torch, *, dtype, head_dim, block_size, group, batch, q_len, context, device,
                     seed):
    """Paged inputs (permuted pages) of ``batch`` sequences with ``q_len`` new rows each after
    ``context`` cached keys, and the same K/V contiguous: [batch, kv_heads, context + q_len, d]."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    num_kv, total = NUM_HEADS // group, context + q_len
    per_seq = -(-total // block_size)
    perm = torch.randperm(batch * per_seq, generator=gen).to(torch.int32)
    tables = perm.view(batch, per_seq).to(device)
    shape = (batch * per_seq, block_size, num_kv, head_dim)
    key_cache = torch.randn(shape, generator=gen).to(dtype).to(device)
    value_cache = torch.randn(shape, generator=gen).to(dtype).to(device)
    contig = [c[tables.long()].reshape(batch, -1, num_kv, head_dim)[:, :total].transpose(1, 2)
              .contiguous() for c in (key_cache, value_cache)]
    return dict(
        query=torch.randn(batch * q_len, NUM_HEADS, head_dim, generator=gen).to(dtype).to(device),
        key_cache=key_cache, value_cache=value_cache, block_tables=tables,
        seq_lens=torch.full((batch,), total, dtype=torch.int32, device=device),
        query_start_loc=torch.arange(0, batch * q_len + 1, q_len, dtype=torch.int32, device=device),
        k_contig=contig[0], v_contig=contig[1])


def sdpa_varlen(torch, case, batch, q_len, context, group):
    """SDPA over the contiguous K/V with the causal mask offset by the context; returns (call
    giving [batch * q_len, heads, d], mode)."""
    import torch.nn.functional as F

    q = case["query"].view(batch, q_len, NUM_HEADS, -1).transpose(1, 2)  # [b, heads, q, d]
    k, v = case["k_contig"], case["v_contig"]
    extra, mode = {}, "mha"
    if group > 1 and gqa_supported(torch):
        extra, mode = {"enable_gqa": True}, "enable_gqa"
    elif group > 1:
        k, v, mode = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), "expanded"
    if context == 0:
        extra["is_causal"] = True
    else:  # row r at position context + r sees keys j <= context + r
        keys = torch.arange(context + q_len, device=q.device)
        extra["attn_mask"] = keys[None, :] <= context + torch.arange(q_len, device=q.device)[:, None]

    def call():
        return F.scaled_dot_product_attention(q, k, v, **extra).transpose(1, 2).reshape(
            batch * q_len, NUM_HEADS, -1)
    return call, mode


def decode_repeated(torch, decode, case, batch, q_len, context):
    """The decode kernel run q_len times, row r of every sequence with seq_lens = context + r + 1;
    returns (call, the rows' outputs as [batch * q_len, heads, d] after a call)."""
    rows = case["query"].view(batch, q_len, NUM_HEADS, -1)
    lens = [case["seq_lens"] - (q_len - 1 - r) for r in range(q_len)]
    outs = torch.empty_like(rows)  # [batch, q_len, heads, d]

    def call():
        for r in range(q_len):
            decode(rows[:, r], case["key_cache"], case["value_cache"], case["block_tables"],
                   lens[r], out=outs[:, r], max_seq_len=context + r + 1)

    def result():
        call()
        return outs.reshape(batch * q_len, NUM_HEADS, -1)
    return call, result


def attention_rows(torch, args, *, timer, device: str) -> list[dict]:
    """Benchmark rows of every kind for the first dtype / head dim / block size and each group."""
    dt, d, bs = args.dtypes[0], args.head_dims[0], args.block_sizes[0]
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[dt]
    shapes = GPU_SHAPES if device == "cuda" else CPU_SHAPES
    rows = []
    for g in args.groups:
        config = default_attention_config(head_dim=d, block_size=bs, group_size=g, dtype=dt)
        module = load_kernel(config)
        decode = load_kernel(default_config(head_dim=d, block_size=bs, group_size=g, dtype=dt,
                                            split_k=0)).paged_attention_decode
        for kind, cases in shapes.items():
            for i, (batch, q_len, ctx) in enumerate(cases):
                case = make_varlen_case(torch, dtype=dtype, head_dim=d, block_size=bs, group=g,
                                        batch=batch, q_len=q_len, context=ctx, device=device,
                                        seed=100 * g + i)
                row = dict(kind=kind, dtype=dt, head_dim=d, block_size=bs, group_size=g,
                           batch=batch, q_len=q_len, context=ctx, variant=config.key)
                if kind == "prefill":
                    base_call, row["baseline"] = sdpa_varlen(torch, case, batch, q_len, ctx, g)
                    base_out = base_call
                else:
                    base_call, base_out = decode_repeated(torch, decode, case, batch, q_len, ctx)
                    row["baseline"] = f"decode x{q_len}"
                ref = base_out().float()
                out = torch.full_like(case["query"], float("nan"))
                args_in = {k: case[k] for k in ("query", "key_cache", "value_cache",
                                                "block_tables", "seq_lens", "query_start_loc")}
                bounds = dict(max_query_len=q_len, max_seq_len=ctx + q_len)

                def call():
                    module.paged_attention(**args_in, **bounds, out=out)
                call()
                err = float((out.float() - ref).abs().max())
                ok = err < 2e-2 * max(1.0, float(ref.abs().max()))
                row["max_err"] = err
                row["ms"] = timer(call) if ok else float("nan")
                row["baseline_ms"] = timer(base_call)
                row["speedup"] = row["baseline_ms"] / row["ms"]
                block_m, _, segments = module.plan_launch(batch, NUM_HEADS // g, q_len, ctx + q_len,
                                                          device=case["query"].device)
                row["plan"] = dict(block_m=block_m, segments=segments)
                flops = 4 * batch * NUM_HEADS * d * q_len * (ctx + (q_len + 1) / 2)
                row["tflops"] = flops / (row["ms"] * 1e-3) / 1e12
                rows.append(row)
                print(f"attention {kind} {dt} d{d} g{g} {batch}x(q {q_len}, ctx {ctx}): "
                      f"{row['ms']:.4f} ms vs {row['baseline']} {row['baseline_ms']:.4f} ms "
                      f"({row['speedup']:.2f}x), rows {block_m}, segments {segments}", flush=True)
                del case
    return rows


HEADER = ("kind", "dtype", "d", "block", "g", "batch x (q, ctx)", "ms", "TFLOP/s", "baseline",
          "baseline ms", "speedup", "rows / segments")


def tables(result: dict) -> list[str]:
    """The Markdown table of the attention rows (empty when there are none)."""
    rows = result.get("attention_rows")
    if not rows:
        return []
    lines = ["", "paged_attention (any query length; default variant, both bounds given)", "",
             "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for r in rows:
        lines.append(
            f"| {r['kind']} | {r['dtype']} | {r['head_dim']} | {r['block_size']} | {r['group_size']} "
            f"| {r['batch']} x ({r['q_len']}, {r['context']}) | {r['ms']:.4f} | {r['tflops']:.2f} "
            f"| {r['baseline']} | {r['baseline_ms']:.4f} | {r['speedup']:.2f}x "
            f"| {r['plan']['block_m']} / {r['plan']['segments']} |")
    return lines
