"""Float64 reference for paged decode attention, and random paged test data.

The reference gathers each sequence's tokens through its block table and runs softmax attention
in float64, with every attention feature of the kernels: fp8 caches (dequantized from the same
fp8 values the kernel reads), sliding window, logit soft-cap, ALiBi and sinks. The data helper
builds the contract's tensors with the things that break careless kernels: permuted physical
blocks, blocks shared between sequences, garbage table entries past each sequence's last block
(and before its sliding window), and (optionally) NaN in cache slots no query may read.
"""

from __future__ import annotations

import torch

from kgen.dtypes import kv_torch_dtype, normalize_dtype, normalize_kv_dtype, torch_dtype
from kgen.features import normalize_features

# Allowed |out - ref| <= atol + rtol * |ref| per dtype, against the float64 reference. The 16-bit
# bounds cover rounding the output (2^-11 / 2^-8 relative) and rounding softmax weights to the dot
# dtype (as flash attention does); fp32 covers summation-order differences over long contexts.
TOLERANCES = {"fp16": (4e-3, 4e-3), "bf16": (3e-2, 2e-2), "fp32": (2e-5, 2e-5)}


def _per_kv_head(value, num_kv_heads: int, name: str) -> torch.Tensor:
    """A dequantization scale (None, float, one-element or [num_kv_heads] tensor) as float64 [kv]."""
    if value is None:
        return torch.ones(num_kv_heads, dtype=torch.float64)
    if isinstance(value, torch.Tensor):
        flat = value.detach().double().cpu().reshape(-1)
        if flat.numel() == 1:
            return flat.expand(num_kv_heads).clone()
        if flat.numel() != num_kv_heads:
            raise ValueError(f"{name}.shape={tuple(value.shape)} is not (), (1,) or ({num_kv_heads},)")
        return flat
    return torch.full((num_kv_heads,), float(value), dtype=torch.float64)


def paged_attention_reference(query, key_cache, value_cache, block_tables, seq_lens, scale=None, *,
                              k_scale=None, v_scale=None, sliding_window=None,
                              logits_soft_cap=None, alibi_slopes=None, sinks=None):
    """Decode attention over a paged KV cache, computed in float64.

    For sequence i the query is at position p = seq_lens[i] - 1 and keys j <= p are attended:
    s_j = scale * q . (k_j * k_scale); with a soft cap s_j = c * tanh(s_j / c); with ALiBi
    s_j += slope[h] * (j - p) (after the cap, vLLM's order); with a sliding window W only
    j >= p - W + 1; with sinks the softmax denominator gains exp(sink[h]) (no value);
    out = sum_j softmax(s)_j * v_j * v_scale.

    Parameters
    ----------
    query : torch.Tensor
        ``[num_seqs, num_heads, head_dim]``, any float dtype.
    key_cache, value_cache : torch.Tensor
        ``[num_blocks, block_size, num_kv_heads, head_dim]`` (NHD pages), any strides, any float
        dtype including fp8 (the same values the kernel reads are dequantized here).
    block_tables : torch.Tensor
        ``[num_seqs, max_blocks_per_seq]`` integer; entries past a sequence's last block (and
        before its window's first block) are ignored.
    seq_lens : torch.Tensor
        ``[num_seqs]`` integer context lengths.
    scale : float, optional
        Softmax scale; ``head_dim ** -0.5`` by default.
    k_scale, v_scale : float or torch.Tensor, optional
        Dequantization scales: a float, a one-element tensor or ``[num_kv_heads]``.
    sliding_window : int, optional
        Attend to the last ``sliding_window`` keys only.
    logits_soft_cap : float, optional
        Soft cap c of the scores.
    alibi_slopes, sinks : torch.Tensor, optional
        ``[num_heads]`` ALiBi slopes / sink logits.

    Returns
    -------
    torch.Tensor
        ``[num_seqs, num_heads, head_dim]`` float64 on the query's device (zeros where len is 0).
    """
    num_seqs = query.shape[0]
    out = torch.zeros(query.shape, dtype=torch.float64, device=query.device)
    math_args = reference_feature_math(query, key_cache, scale, k_scale, v_scale, logits_soft_cap,
                                       alibi_slopes, sinks)
    for s, n in enumerate(int(n) for n in seq_lens.tolist()):
        if n == 0:
            continue
        out[s] = attend_rows_float64(query[s][None], block_tables[s], n, [n - 1], sliding_window,
                                     key_cache, value_cache, **math_args)[0]
    return out


def reference_feature_math(query, key_cache, scale, k_scale, v_scale, logits_soft_cap,
                           alibi_slopes, sinks) -> dict:
    """The per-call values :func:`attend_rows_float64` needs, in float64 on the query's device."""
    head_dim, num_kv_heads = query.shape[-1], key_cache.shape[2]
    if query.shape[-2] % num_kv_heads:
        raise ValueError(f"num_heads={query.shape[-2]} is not a multiple of num_kv_heads={num_kv_heads}")
    device = query.device
    return {
        "scale": head_dim ** -0.5 if scale is None else float(scale),
        "k_sc": _per_kv_head(k_scale, num_kv_heads, "k_scale").to(device)[None, :, None],
        "v_sc": _per_kv_head(v_scale, num_kv_heads, "v_scale").to(device)[None, :, None],
        "cap": None if logits_soft_cap is None else float(logits_soft_cap),
        "slopes": None if alibi_slopes is None else alibi_slopes.double().to(device),
        "sink": None if sinks is None else sinks.double().to(device),
    }


def attend_rows_float64(q, table_row, seq_len, positions, sliding_window, key_cache, value_cache, *,
                        scale, k_sc, v_sc, cap, slopes, sink):
    """Float64 attention of one sequence's query rows over its paged keys.

    Row r (``q[r]``, ``[num_heads, head_dim]``) sits at ``positions[r]`` and sees keys
    ``j <= positions[r]`` (and ``j >= positions[r] - W + 1`` with a window W):
    s = scale * q . (k * k_scale), then ``cap * tanh(s / cap)``, then ``+ slope * (j - p)``;
    sinks join each row's denominator once; out = softmax . (v * v_scale). Only the pages of
    keys some row sees are gathered (table entries outside them are never touched).

    Returns
    -------
    torch.Tensor
        ``[rows, num_heads, head_dim]`` float64.
    """
    block_size, num_kv_heads, head_dim = key_cache.shape[1], key_cache.shape[2], key_cache.shape[3]
    group = q.shape[1] // num_kv_heads
    device = q.device
    pos = torch.tensor(positions, dtype=torch.float64, device=device)  # [rows]
    start = max(0, min(positions) - int(sliding_window) + 1) if sliding_window is not None else 0
    first_block = start // block_size  # entries before it are never read
    pages = table_row[first_block: (seq_len + block_size - 1) // block_size].long()
    lo, hi = start - first_block * block_size, seq_len - first_block * block_size
    # k, v: [n', num_kv_heads, head_dim] (dequantized) -> [num_heads, n', head_dim]
    k = key_cache[pages].reshape(-1, num_kv_heads, head_dim)[lo:hi].double() * k_sc
    v = value_cache[pages].reshape(-1, num_kv_heads, head_dim)[lo:hi].double() * v_sc
    k = k.permute(1, 0, 2).repeat_interleave(group, dim=0)
    v = v.permute(1, 0, 2).repeat_interleave(group, dim=0)
    keys = torch.arange(start, seq_len, dtype=torch.float64, device=device)  # [n']
    scores = torch.einsum("rhd,htd->rht", q.double(), k) * scale  # [rows, num_heads, n']
    if cap is not None:
        scores = cap * torch.tanh(scores / cap)
    if slopes is not None:
        scores = scores + slopes[None, :, None] * (keys[None, :] - pos[:, None])[:, None, :]
    seen = keys[None, :] <= pos[:, None]  # [rows, n']
    if sliding_window is not None:
        seen &= keys[None, :] > pos[:, None] - int(sliding_window)
    scores = scores.masked_fill(~seen[:, None, :], float("-inf"))
    if sink is not None:  # one more logit per head, whose value is zero
        sink_col = sink[None, :, None].expand(scores.shape[0], -1, 1)
        probs = torch.softmax(torch.cat([scores, sink_col], dim=2), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    return torch.einsum("rht,htd->rhd", probs, v)


def max_abs_error(out, ref) -> float:
    """Largest |out - ref| (NaN anywhere gives inf), computed in float64."""
    diff = (out.double() - ref.double()).abs()
    if not bool(torch.isfinite(diff).all()):
        return float("inf")
    return float(diff.max()) if diff.numel() else 0.0


def within_tolerance(out, ref, dtype) -> bool:
    """True when every element is within the dtype's :data:`TOLERANCES` of the reference."""
    atol, rtol = TOLERANCES[normalize_dtype(dtype)]
    diff = (out.double() - ref.double()).abs()
    return bool(torch.isfinite(diff).all()) and bool((diff <= atol + rtol * ref.double().abs()).all())


def alibi_slopes_for(num_heads: int) -> torch.Tensor:
    """The ALiBi paper's geometric slopes ``2 ** (-8 (h + 1) / n)`` for ``n`` heads (n a power of
    two; otherwise the closest power of two's slopes, then every other slope of twice as many)."""
    def pow2_slopes(n):
        return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]

    base = 1 << (max(1, num_heads).bit_length() - 1)
    slopes = pow2_slopes(base)
    if base < num_heads:
        slopes += pow2_slopes(2 * base)[0::2][: num_heads - base]
    return torch.tensor(slopes, dtype=torch.float32)


SCALE_KINDS = (None, "float", "tensor", "head")


def make_paged_inputs(num_seqs, num_heads, num_kv_heads, head_dim, block_size, seq_lens, dtype, *,
                      seed, share_blocks=True, device="cpu", extra_blocks=3, extra_table_cols=1,
                      poison_unused=False, kv_dtype="auto", scale_kind=None, features=(),
                      sliding_window=None, soft_cap=None, first_keys=None):
    """Random paged decode inputs in the kernel contract's layout.

    Parameters
    ----------
    num_seqs, num_heads, num_kv_heads, head_dim, block_size : int
        Shapes; ``num_heads`` must be a multiple of ``num_kv_heads``.
    seq_lens : sequence of int
        ``num_seqs`` context lengths (0 allowed).
    dtype : str or torch.dtype
        ``fp16``, ``bf16``, ``fp32`` (or torch dtypes / aliases): the query's dtype.
    seed : int
        Seed of a private generator (the global RNG is untouched).
    share_blocks : bool
        When True, sequences reuse some full blocks of earlier sequences (as forks and prefix
        caching do), so one physical block appears in several tables.
    extra_blocks : int
        Physical blocks no sequence uses (their data is garbage the kernel must not read).
    extra_table_cols : int
        Table columns beyond the longest sequence's need; filled, like every entry past a
        sequence's last block, with garbage indices (often past the cache) that must be ignored.
    poison_unused : bool
        Fill every cache slot no query may read (past each sequence's length, before its sliding
        window, unused blocks) with NaN.
    kv_dtype : str
        ``auto`` (the caches hold ``dtype``), ``fp8_e4m3`` or ``fp8_e5m2``: the caches are random
        values rounded to fp8.
    scale_kind : None, "float", "tensor" or "head"
        fp8 only: no ``k_scale``/``v_scale`` (1.0), random Python floats, one-element fp32
        tensors, or fp32 tensors ``[num_kv_heads]``.
    features : iterable of str
        Attention features whose arguments to add (``sliding_window``, ``soft_cap``, ``alibi``,
        ``sinks``); ALiBi slopes are the paper's, sinks random fp32.
    sliding_window : int, optional
        The window (required with feature ``sliding_window``). Table entries of pages wholly
        before each sequence's window are replaced with garbage ids: they must never be read.
    soft_cap : float, optional
        The soft cap (default 2.0: low enough that tanh changes the scores noticeably).
    first_keys : sequence of int, optional
        Per sequence, the first key any query reads (default: the window's start ``n - W``, or
        0): table entries of pages wholly before it are garbage and, with ``poison_unused``,
        its slots NaN. Varlen inputs pass the earliest window start of each sequence's rows.

    Returns
    -------
    dict
        ``query [num_seqs, num_heads, head_dim]``, ``key_cache`` / ``value_cache``
        ``[num_blocks, block_size, num_kv_heads, head_dim]`` (the KV dtype), ``block_tables``
        ``[num_seqs, max_blocks_per_seq]`` int32, ``seq_lens [num_seqs]`` int32, ``scale`` float,
        and the feature arguments asked for (``k_scale``, ``v_scale``, ``sliding_window``,
        ``logits_soft_cap``, ``alibi_slopes``, ``sinks``): ready for ``**`` into both the kernel
        and :func:`paged_attention_reference`.
    """
    lens = [int(n) for n in seq_lens]
    if len(lens) != num_seqs:
        raise ValueError(f"seq_lens has {len(lens)} entries, expected num_seqs={num_seqs}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
    features = normalize_features(features)
    kv_dtype = normalize_kv_dtype(kv_dtype)
    if scale_kind not in SCALE_KINDS:
        raise ValueError(f"scale_kind={scale_kind!r} is not one of {SCALE_KINDS}")
    if scale_kind is not None and kv_dtype == "auto":
        raise ValueError(f"scale_kind={scale_kind!r} needs an fp8 kv_dtype (got {kv_dtype!r})")
    if ("sliding_window" in features) != (sliding_window is not None):
        raise ValueError(f"sliding_window={sliding_window!r} must be given exactly when the "
                         f"features {features} include sliding_window")
    tdtype = torch_dtype(dtype)
    gen = torch.Generator().manual_seed(int(seed))
    need = [(n + block_size - 1) // block_size for n in lens]
    max_blocks = max(need + [0]) + int(extra_table_cols)

    # Assign logical blocks to physical ids; a later sequence may reuse an earlier full block.
    owned: list[list[int]] = []
    shareable: list[int] = []
    next_id = 0
    for s, nb in enumerate(need):
        row = []
        for j in range(nb):
            is_full = (j + 1) * block_size <= lens[s]
            reuse = share_blocks and shareable and is_full and torch.rand(1, generator=gen).item() < 0.3
            if reuse:
                row.append(shareable[int(torch.randint(len(shareable), (1,), generator=gen))])
            else:
                row.append(next_id)
                if is_full:
                    shareable.append(next_id)
                next_id += 1
        owned.append(row)
    num_blocks = next_id + int(extra_blocks)
    perm = torch.randperm(num_blocks, generator=gen)  # logical id -> physical id, shuffled

    # Garbage everywhere past the last block: indices often outside the cache, or negative.
    tables = torch.randint(-num_blocks, 4 * num_blocks + 1, (num_seqs, max_blocks), generator=gen)
    starts = [max(0, n - int(sliding_window)) if sliding_window is not None else 0 for n in lens]
    if first_keys is not None:
        starts = [int(k) for k in first_keys]
    for s, row in enumerate(owned):
        first_block = starts[s] // block_size  # blocks before the window keep their garbage
        if len(row) > first_block:
            tables[s, first_block: len(row)] = perm[torch.tensor(row[first_block:], dtype=torch.long)]
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    fp8 = kv_dtype != "auto"
    cache_dtype = kv_torch_dtype(kv_dtype, dtype)
    # fp8 caches: values a quantizer would produce (about N(0, 1) / scale), rounded to fp8
    key_cache = torch.randn(shape, generator=gen).to(tdtype if not fp8 else torch.float32)
    value_cache = torch.randn(shape, generator=gen).to(tdtype if not fp8 else torch.float32)
    if poison_unused:
        used = torch.zeros(num_blocks, block_size, dtype=torch.bool)
        for s, n in enumerate(lens):
            for t in range(starts[s], n):
                used[int(tables[s, t // block_size]), t % block_size] = True
        key_cache[~used] = float("nan")
        value_cache[~used] = float("nan")
    key_cache, value_cache = key_cache.to(cache_dtype), value_cache.to(cache_dtype)
    query = torch.randn(num_seqs, num_heads, head_dim, generator=gen).to(tdtype)
    inputs = {
        "query": query.to(device),
        "key_cache": key_cache.to(device),
        "value_cache": value_cache.to(device),
        "block_tables": tables.to(torch.int32).to(device),
        "seq_lens": torch.tensor(lens, dtype=torch.int32).to(device),
        "scale": head_dim ** -0.5,
    }
    inputs.update(feature_arguments(num_heads, num_kv_heads, features=features,
                                    scale_kind=scale_kind, sliding_window=sliding_window,
                                    soft_cap=soft_cap, generator=gen, device=device))
    return inputs


def feature_arguments(num_heads: int, num_kv_heads: int, *, features=(), scale_kind=None,
                      sliding_window=None, soft_cap=None, generator=None, device="cpu") -> dict:
    """The call's feature arguments: random scales, the window, the cap, ALiBi slopes, sinks.

    Parameters
    ----------
    num_heads, num_kv_heads : int
        Query heads (slopes and sinks are per query head) and KV heads (per-head scales).
    features : iterable of str
        Which of ``sliding_window``, ``soft_cap``, ``alibi``, ``sinks`` to give arguments for.
    scale_kind : None, "float", "tensor" or "head"
        No ``k_scale``/``v_scale``; random floats in [0.25, 1.75); one-element fp32 tensors;
        fp32 ``[num_kv_heads]`` tensors.
    sliding_window, soft_cap : optional
        The window (required with that feature) and the cap (default 2.0).
    generator : torch.Generator, optional
        Source of the random values (a fresh seed-0 one by default).

    Returns
    -------
    dict
        Keyword arguments for ``paged_attention_decode`` and :func:`paged_attention_reference`.
    """
    features = normalize_features(features)
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    out = {}
    if scale_kind is not None:
        for name in ("k_scale", "v_scale"):
            values = 0.25 + 1.5 * torch.rand(num_kv_heads, generator=gen)  # [0.25, 1.75)
            if scale_kind == "float":
                out[name] = float(values[0])
            elif scale_kind == "tensor":
                out[name] = values[:1].to(torch.float32).to(device)
            else:
                out[name] = values.to(torch.float32).to(device)
    if "sliding_window" in features:
        out["sliding_window"] = int(sliding_window)
    if "soft_cap" in features:
        out["logits_soft_cap"] = 2.0 if soft_cap is None else float(soft_cap)
    if "alibi" in features:
        out["alibi_slopes"] = alibi_slopes_for(num_heads).to(device)
    if "sinks" in features:
        out["sinks"] = (torch.randn(num_heads, generator=gen) * 2.0 + 1.0).to(torch.float32).to(device)
    return out
