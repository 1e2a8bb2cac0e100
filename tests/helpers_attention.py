"""Helpers shared by the ``paged_attention`` (any query length) tests: run one varlen case."""

import torch

from helpers_kernels import make_strided
from kgen.build import load_kernel
from kgen.reference_varlen import make_varlen_inputs, paged_attention_varlen_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def kv_heads_for(config) -> int:
    """Two KV heads for small groups (so a program's KV head offset matters), one for large."""
    return 1 if config.group_size > 4 else 2


def varlen_inputs(config, q_lens, context_lens, *, seed, scales=None, window=None):
    """Random varlen inputs for ``config``: NaN in every unreachable cache slot, and with a window
    every table entry wholly before the earliest window of a sequence's rows out of the cache's
    range (negative or past the end: a kernel reading one fails loudly or gives NaN)."""
    kv = kv_heads_for(config)
    inputs = make_varlen_inputs(q_lens, context_lens, kv * config.group_size, kv, config.head_dim,
                              config.block_size, config.dtype, seed=seed, device=DEVICE,
                              poison_unused=True, kv_dtype=config.kv_dtype, scale_kind=scales,
                              features=config.features, sliding_window=window)
    if window:
        tables, num_blocks = inputs["block_tables"], inputs["key_cache"].shape[0]
        for s, context in enumerate(context_lens):
            for j in range(max(0, context - window + 1) // config.block_size):
                tables[s, j] = -1 - j if j % 2 else num_blocks + 1000 + j
    return inputs


def run_varlen(config, q_lens, context_lens, *, seed, scales=None, window=None, noncontig=False,
               index_views=False, **call):
    """The kernel's output (``out`` NaN-poisoned first) and the float64 reference, same inputs.

    ``noncontig``: strided query / caches / out; ``index_views``: strided seq_lens,
    block_tables and query_start_loc (the elements between hold wrong values). ``call``: more
    keyword arguments of ``paged_attention`` (bounds, validate ...; validate=True by default).
    """
    inputs = varlen_inputs(config, q_lens, context_lens, seed=seed, scales=scales, window=window)
    ref = paged_attention_varlen_reference(**inputs)
    out = make_strided(inputs, torch.full_like(inputs["query"], float("nan")), noncontig=noncontig,
                       index_views=index_views, index_garbage=(("seq_lens", 1), ("block_tables", 0),
                                                               ("query_start_loc", 3)))
    call.setdefault("validate", True)
    result = load_kernel(config).paged_attention(**inputs, out=out, **call)
    assert result is out
    return out, ref, inputs
