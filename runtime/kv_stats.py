"""The memory manager's counters as one dict (pure Python, O(table entries + cached blocks))."""

from __future__ import annotations

from runtime.kv_layout import NULL_BLOCK


def memory_stats(kv) -> dict:
    """Counters of a :class:`runtime.kv_manager.KVCacheManager`.

    ``tokens_stored`` counts distinct physical slots that hold (or are about to hold, in this
    step's forward) a token; ``utilization = tokens_stored / slots_allocated`` (0.0 when no block
    is in use). ``logical_blocks`` is the sum over sequences of the blocks their tables hold (what
    the same sequences would use without any sharing) and ``blocks_saved_by_sharing =
    logical_blocks - blocks_in_use``. With a sliding window, ``window_freed_blocks`` counts the
    table entries freed because they slid out of the window; ``max_blocks_per_seq`` is the most
    blocks one live sequence holds now, ``peak_blocks_per_seq`` the most one held at a decode step
    (with a window at most ``kv_layout.window_blocks``; a prefill may hold its whole prompt for
    that one step, as vLLM's does, when the pool has room).
    """
    bs, pool = kv.block_size, kv.pool
    fill: dict[int, int] = {}
    logical = most = 0
    for seq in kv.tracked_seqs():
        n = len(seq)
        held = 0
        for i, b in enumerate(seq.block_table):
            if b == NULL_BLOCK:
                continue
            held += 1
            f = max(0, min(bs, n - i * bs))
            if f >= fill.get(b, 0):  # every table block gets an entry (shared_blocks below)
                fill[b] = f
        logical += held
        most = max(most, held)
    in_use = pool.num_used
    stored = sum(fill.values())
    slots = in_use * bs
    cache = kv.prefix_cache
    return {
        "num_blocks": kv.num_blocks,
        "block_size": bs,
        "sliding_window": kv.sliding_window,
        "num_seqs": len(kv.tracked_seqs()),
        "blocks_in_use": in_use,
        "free_blocks": pool.num_free,
        "shared_blocks": sum(1 for b in fill if pool.ref_count(b) > 1),  # refs come from tables
        "logical_blocks": logical,
        "blocks_saved_by_sharing": logical - in_use,
        "max_blocks_per_seq": most,
        "tokens_stored": stored,
        "slots_allocated": slots,
        "utilization": stored / slots if slots else 0.0,
        "peak_blocks_in_use": kv.peak_blocks_in_use,
        "peak_blocks_per_seq": kv.peak_blocks_per_seq,
        "window_freed_blocks": kv.window_freed_blocks,
        "prefix_cache_query_blocks": kv.prefix_query_blocks,
        "prefix_cache_hit_blocks": kv.prefix_hit_blocks,
        "prefix_cache_hit_tokens": kv.prefix_hit_blocks * bs,
        "prefill_tokens_skipped": kv.prefill_tokens_skipped,
        "cached_blocks": len(cache) if cache else 0,
        "evictable_cached_blocks": cache.num_evictable() if cache else 0,
        "prefix_cache_evictions": cache.num_evictions if cache else 0,
        "preemptions": kv.num_preemptions,
        "cow_copies": kv.num_cow_copies,
    }
