"""Float64 reference for paged decode attention, and random paged test data.

The reference gathers each sequence's tokens through its block table and runs plain softmax
attention in float64. The data helper builds the contract's tensors with the things that break
careless kernels: permuted physical blocks, blocks shared between sequences, garbage table entries
past each sequence's last block, and (optionally) NaN in cache slots no sequence uses.
"""

from __future__ import annotations

import torch

from kgen.dtypes import normalize_dtype, torch_dtype

# Allowed |out - ref| <= atol + rtol * |ref| per dtype, against the float64 reference. The 16-bit
# bounds cover rounding the output (2^-11 / 2^-8 relative) and rounding softmax weights to the dot
# dtype (as flash attention does); fp32 covers summation-order differences over long contexts.
TOLERANCES = {"fp16": (4e-3, 4e-3), "bf16": (3e-2, 2e-2), "fp32": (2e-5, 2e-5)}


def paged_attention_reference(query, key_cache, value_cache, block_tables, seq_lens, scale=None):
    """Decode attention over a paged KV cache, computed in float64.

    Parameters
    ----------
    query : torch.Tensor
        ``[num_seqs, num_heads, head_dim]``, any float dtype.
    key_cache, value_cache : torch.Tensor
        ``[num_blocks, block_size, num_kv_heads, head_dim]`` (NHD pages), any strides.
    block_tables : torch.Tensor
        ``[num_seqs, max_blocks_per_seq]`` integer; entries past a sequence's last block are ignored.
    seq_lens : torch.Tensor
        ``[num_seqs]`` integer context lengths.
    scale : float, optional
        Softmax scale; ``head_dim ** -0.5`` by default.

    Returns
    -------
    torch.Tensor
        ``[num_seqs, num_heads, head_dim]`` float64 on the query's device (zeros where len is 0).
    """
    num_seqs, num_heads, head_dim = query.shape
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
    group = num_heads // num_kv_heads
    scale = head_dim ** -0.5 if scale is None else float(scale)
    out = torch.zeros(num_seqs, num_heads, head_dim, dtype=torch.float64, device=query.device)
    lens = [int(n) for n in seq_lens.tolist()]
    for s, n in enumerate(lens):
        if n == 0:
            continue
        pages = block_tables[s, : (n + block_size - 1) // block_size].long()
        # k, v: [n, num_kv_heads, head_dim] -> [num_heads, n, head_dim] (each KV head repeated)
        k = key_cache[pages].reshape(-1, num_kv_heads, head_dim)[:n].double()
        v = value_cache[pages].reshape(-1, num_kv_heads, head_dim)[:n].double()
        k = k.permute(1, 0, 2).repeat_interleave(group, dim=0)
        v = v.permute(1, 0, 2).repeat_interleave(group, dim=0)
        q = query[s].double()  # [num_heads, head_dim]
        scores = torch.einsum("hd,htd->ht", q, k) * scale  # [num_heads, n]
        out[s] = torch.einsum("ht,htd->hd", torch.softmax(scores, dim=-1), v)
    return out


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


def make_paged_inputs(num_seqs, num_heads, num_kv_heads, head_dim, block_size, seq_lens, dtype, *,
                      seed, share_blocks=True, device="cpu", extra_blocks=3, extra_table_cols=1,
                      poison_unused=False):
    """Random paged decode inputs in the kernel contract's layout.

    Parameters
    ----------
    num_seqs, num_heads, num_kv_heads, head_dim, block_size : int
        Shapes; ``num_heads`` must be a multiple of ``num_kv_heads``.
    seq_lens : sequence of int
        ``num_seqs`` context lengths (0 allowed).
    dtype : str or torch.dtype
        ``fp16``, ``bf16``, ``fp32`` (or torch dtypes / aliases).
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
        Fill cache slots past each sequence's length in its last block, and unused blocks, with NaN.

    Returns
    -------
    dict
        ``query [num_seqs, num_heads, head_dim]``, ``key_cache`` / ``value_cache``
        ``[num_blocks, block_size, num_kv_heads, head_dim]`` (dtype), ``block_tables``
        ``[num_seqs, max_blocks_per_seq]`` int32, ``seq_lens [num_seqs]`` int32, ``scale`` float.
    """
    lens = [int(n) for n in seq_lens]
    if len(lens) != num_seqs:
        raise ValueError(f"seq_lens has {len(lens)} entries, expected num_seqs={num_seqs}")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
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
    for s, row in enumerate(owned):
        if row:
            tables[s, : len(row)] = perm[torch.tensor(row, dtype=torch.long)]
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    key_cache = torch.randn(shape, generator=gen).to(tdtype)
    value_cache = torch.randn(shape, generator=gen).to(tdtype)
    if poison_unused:
        used = torch.zeros(num_blocks, block_size, dtype=torch.bool)
        for s, n in enumerate(lens):
            for t in range(n):
                used[int(tables[s, t // block_size]), t % block_size] = True
        key_cache[~used] = float("nan")
        value_cache[~used] = float("nan")
    query = torch.randn(num_seqs, num_heads, head_dim, generator=gen).to(tdtype)
    return {
        "query": query.to(device),
        "key_cache": key_cache.to(device),
        "value_cache": value_cache.to(device),
        "block_tables": tables.to(torch.int32).to(device),
        "seq_lens": torch.tensor(lens, dtype=torch.int32).to(device),
        "scale": head_dim ** -0.5,
    }
