"""Float64 reference and random test data for the varlen contract (``paged_attention``).

Sequence i owns query rows ``query_start_loc[i] .. query_start_loc[i+1] - 1`` (q_i of them, 0
allowed); its ``seq_lens[i]`` keys include those q_i new tokens, so row r sits at position
``p = seq_lens[i] - q_i + r`` and sees keys ``j <= p`` (``j >= p - W + 1`` with a window). The
feature math (fp8 dequantization, soft cap before ALiBi, sinks, windows) is the decode
reference's (:func:`kgen.reference.attend_rows_float64`): a decode step is the q_i = 1 case.
"""

from __future__ import annotations

import torch

from kgen.reference import attend_rows_float64, make_paged_inputs, reference_feature_math
from kgen.dtypes import torch_dtype


def paged_attention_varlen_reference(query, key_cache, value_cache, block_tables, seq_lens,
                                     query_start_loc, scale=None, *, k_scale=None, v_scale=None,
                                     sliding_window=None, logits_soft_cap=None, alibi_slopes=None,
                                     sinks=None, **_bounds):
    """Attention of every sequence's new query rows over its paged keys, in float64.

    Parameters
    ----------
    query : torch.Tensor
        ``[num_tokens, num_heads, head_dim]``, any float dtype.
    key_cache, value_cache : torch.Tensor
        ``[num_blocks, block_size, num_kv_heads, head_dim]`` (any float dtype, fp8 included).
    block_tables : torch.Tensor
        ``[num_seqs, max_blocks_per_seq]`` integer (entries no row reads are ignored).
    seq_lens, query_start_loc : torch.Tensor
        ``[num_seqs]`` and ``[num_seqs + 1]`` integers (the contract's).
    scale, k_scale, v_scale, sliding_window, logits_soft_cap, alibi_slopes, sinks
        As :func:`kgen.reference.paged_attention_reference`. Other keyword arguments (the
        ``max_query_len`` / ``max_seq_len`` planning bounds) are accepted and ignored.

    Returns
    -------
    torch.Tensor
        ``[num_tokens, num_heads, head_dim]`` float64 (rows of no sequence stay 0).
    """
    out = torch.zeros(query.shape, dtype=torch.float64, device=query.device)
    math_args = reference_feature_math(query, key_cache, scale, k_scale, v_scale, logits_soft_cap,
                                       alibi_slopes, sinks)
    starts = [int(x) for x in query_start_loc.tolist()]
    for s, n in enumerate(int(n) for n in seq_lens.tolist()):
        begin, end = starts[s], starts[s + 1]
        if end == begin:
            continue
        if end - begin > n:
            raise ValueError(f"seq_lens[{s}]={n} is less than its query length {end - begin}")
        positions = list(range(n - (end - begin), n))
        out[begin:end] = attend_rows_float64(query[begin:end], block_tables[s], n, positions,
                                             sliding_window, key_cache, value_cache, **math_args)
    return out


def make_varlen_inputs(q_lens, context_lens, num_heads, num_kv_heads, head_dim, block_size, dtype,
                       *, seed, device="cpu", sliding_window=None, **paged):
    """Random inputs of the varlen contract: q_i new rows after a cached context per sequence.

    Parameters
    ----------
    q_lens, context_lens : sequence of int
        Per sequence, its new query rows q_i (0 allowed) and the keys cached before them;
        ``seq_lens[i] = context_lens[i] + q_lens[i]``.
    num_heads, num_kv_heads, head_dim, block_size, dtype, seed, device
        As :func:`kgen.reference.make_paged_inputs`.
    sliding_window : int, optional
        The window; table entries of pages wholly before the earliest window of each sequence's
        rows (key ``context - W + 1``) are garbage, and with ``poison_unused`` those slots NaN.
    **paged
        Passed on to :func:`kgen.reference.make_paged_inputs` (``kv_dtype``, ``scale_kind``,
        ``features``, ``poison_unused``, ``share_blocks``, ``extra_table_cols``, ``soft_cap``).

    Returns
    -------
    dict
        The contract's keyword arguments: ``query [num_tokens, num_heads, head_dim]``, caches,
        ``block_tables``, ``seq_lens``, ``query_start_loc`` (int32), ``scale`` and the feature
        arguments; ready for ``**`` into ``paged_attention`` and
        :func:`paged_attention_varlen_reference`.
    """
    q_lens, context_lens = [int(q) for q in q_lens], [int(c) for c in context_lens]
    if len(q_lens) != len(context_lens) or min(q_lens + context_lens + [0]) < 0:
        raise ValueError(f"q_lens={q_lens} and context_lens={context_lens} must be equally long "
                         "lists of integers >= 0")
    lens = [c + q for c, q in zip(context_lens, q_lens)]
    first_keys = None
    if sliding_window is not None:
        first_keys = [max(0, c - int(sliding_window) + 1) for c in context_lens]
    inputs = make_paged_inputs(len(lens), num_heads, num_kv_heads, head_dim, block_size, lens,
                               dtype, seed=seed, device=device, sliding_window=sliding_window,
                               first_keys=first_keys, **paged)
    gen = torch.Generator().manual_seed(int(seed) + 7919)
    num_tokens = sum(q_lens)
    inputs["query"] = torch.randn(num_tokens, num_heads, head_dim, generator=gen).to(
        torch_dtype(dtype)).to(device)
    starts = torch.zeros(len(lens) + 1, dtype=torch.int32)
    starts[1:] = torch.cumsum(torch.tensor(q_lens, dtype=torch.int64), 0).to(torch.int32)
    inputs["query_start_loc"] = starts.to(device)
    return inputs
