"""How token positions map onto KV blocks: the one home of the paged-memory formulas (pure Python).

Everything that counts blocks or turns a position into a cache slot uses these functions: the
memory manager (:mod:`runtime.kv_manager`), the engine's batch building and ``generate()``'s pool
sizing and up-front checks. No torch, no kgen.

Sliding windows follow Hugging Face's Mistral: a query at position ``p`` attends to the keys at
positions ``j`` with ``p - window < j <= p``. Once the next query position is ``q`` (the number of
computed tokens), no later query reads a position below ``window_start(q, window)``, so every
block wholly below it can be freed (vLLM does the same).
"""

from __future__ import annotations

NULL_BLOCK = -1
"""A block-table entry whose block was never allocated or has been freed (out of the window)."""


def watermark_blocks(num_blocks: int, watermark: float) -> int:
    """Blocks of a ``num_blocks`` pool that admission keeps free for running sequences to grow."""
    return int(watermark * num_blocks)


def blocks_for_tokens(num_tokens: int, block_size: int) -> int:
    """Blocks needed to hold ``num_tokens`` tokens: ``ceil(num_tokens / block_size)``."""
    return -(-num_tokens // block_size)


def slot_of(block_table, pos: int, block_size: int) -> int:
    """Cache slot of position ``pos``: ``block_table[pos // block_size] * block_size + pos % block_size``."""
    block = block_table[pos // block_size]
    if block == NULL_BLOCK:
        raise ValueError(f"pos={pos} lies in a freed block (out of the sliding window)")
    return block * block_size + pos % block_size


def slots_of(block_table, start: int, end: int, block_size: int) -> list[int]:
    """Slots of positions ``start .. end - 1`` (see :func:`slot_of`), in order."""
    return [slot_of(block_table, p, block_size) for p in range(start, end)]


def window_start(next_pos: int, window: int | None) -> int:
    """First position that a query at ``next_pos`` or later may read (0 without a window)."""
    return 0 if window is None else max(0, next_pos - window + 1)


def window_blocks(window: int, block_size: int) -> int:
    """Most blocks that ``window`` consecutive positions can touch: ``ceil((W - 1) / bs) + 1``."""
    return blocks_for_tokens(window - 1, block_size) + 1


def max_kv_tokens(prompt_len: int, max_new_tokens: int, max_len: int | None = None) -> int:
    """Most positions whose KV a sequence stores: every token but its last sampled one.

    A sequence stops at ``prompt_len + max_new_tokens`` tokens (or ``max_len``, the context
    limit); its final token is never run through the model, and the prompt is always stored.
    """
    end = prompt_len + max_new_tokens if max_len is None else min(prompt_len + max_new_tokens, max_len)
    return max(prompt_len, end - 1)


def request_peak_blocks(prompt_len: int, max_new_tokens: int, block_size: int, *, num_seqs: int = 1,
                        max_len: int | None = None, window: int | None = None) -> int:
    """An upper bound on the blocks one request holds at once when it runs alone.

    Parameters
    ----------
    prompt_len, max_new_tokens : int
        The request's prompt length and ``max_tokens``.
    block_size : int
    num_seqs : int
        Its sequences: ``n`` parallel samples or the beam width. They share the full blocks of
        the prompt; each may hold its own partial prompt block and everything after it.
    max_len : int, optional
        The context limit (the model's ``max_position_embeddings``).
    window : int, optional
        Sliding window of every layer; a sequence then holds at most :func:`window_blocks` blocks
        while it decodes (it is admitted with only the blocks it will still read).

    Returns
    -------
    int
        ``floor(P / bs) + num_seqs * (ceil(T / bs) - floor(P / bs))`` with ``T`` from
        :func:`max_kv_tokens`, and with a window at most ``num_seqs * window_blocks``.
    """
    tokens = max_kv_tokens(prompt_len, max_new_tokens, max_len)
    shared = prompt_len // block_size if num_seqs > 1 else 0
    peak = shared + num_seqs * (blocks_for_tokens(tokens, block_size) - shared)
    if window is not None:
        peak = min(peak, num_seqs * window_blocks(window, block_size))
    return peak
