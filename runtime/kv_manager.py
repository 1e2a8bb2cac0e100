"""Per-sequence block tables over a shared block pool: allocate, append, fork, copy-on-write, free.

Pure Python (no torch, no kgen), so the memory study in ``bench/`` drives it without a model.

Contract with the engine (see also :mod:`runtime.scheduler`):

- ``allocate(seq)`` builds ``seq.block_table`` for all ``len(seq)`` tokens (the prefill). With
  prefix caching the longest cached prefix of *full, computed* blocks is reused and
  ``seq.num_cached_tokens`` (= ``seq.num_computed_tokens``) says how many tokens the prefill may
  skip; the last token is never taken from the cache, so the prefill always yields logits.
- After each forward pass the engine sets ``seq.num_computed_tokens`` (normally ``len(seq) - 1``
  once the sampled token is appended). Full blocks below that count are registered in the prefix
  cache by :meth:`KVCacheManager.mark_computed`, which ``append_slot`` and ``free`` call, so the
  engine need not. An engine that never updates the count simply gets no prefix caching.
- ``append_slot(seq)`` before a decode step makes the slot of position ``len(seq) - 1`` exist and
  be private (copy-on-write of a shared last block); it returns ``(src, dst)`` block copies that
  the engine performs on the K and V caches (one batched index copy per step) before the forward.
- ``fork(parent, child)`` shares every block; ``free(seq)`` drops the references. Blocks of freed
  sequences that hold cached prefixes stay reusable until allocation evicts them, LRU first.

Allocation failures raise :class:`runtime.block_pool.NoFreeBlocksError`; the scheduler checks
``can_allocate_all`` / ``can_append`` first, so it never sees one.
"""

from __future__ import annotations

from runtime.block_pool import BlockPool, NoFreeBlocksError
from runtime.prefix_cache import BlockHash, PrefixCache, extend_block_hashes
from runtime.sequence import Sequence

__all__ = ["KVCacheManager", "NoFreeBlocksError"]


class KVCacheManager:
    """Paged KV memory for many sequences.

    Parameters
    ----------
    num_blocks : int
        Physical blocks in the pool (> 0); the KV caches have ``num_blocks * block_size`` slots.
    block_size : int
        Tokens per block (> 0).
    enable_prefix_caching : bool
        Reuse cached full blocks for a new sequence's longest cached prefix (default True).
    watermark : float
        Fraction of the pool, in ``[0, 1)``, that admission (``can_allocate``) keeps free so
        running sequences can still grow; decode appends may use it.
    """

    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = True,
                 watermark: float = 0.01) -> None:
        if not isinstance(block_size, int) or block_size <= 0:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        if not 0.0 <= watermark < 1.0:
            raise ValueError(f"watermark must be in [0, 1), got {watermark!r}")
        self.pool = BlockPool(num_blocks)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.watermark_blocks = int(watermark * num_blocks)
        self.prefix_cache = PrefixCache(self.pool) if enable_prefix_caching else None
        self._seqs: dict[int, Sequence] = {}            # seq_id -> sequence holding blocks
        self._hashes: dict[int, list[BlockHash]] = {}    # seq_id -> chain keys of its full blocks
        self._registered: dict[int, int] = {}            # seq_id -> blocks already offered to the cache
        self.num_preemptions = 0
        self.num_cow_copies = 0
        self.prefix_query_blocks = 0
        self.prefix_hit_blocks = 0
        self.peak_blocks_in_use = 0

    @property
    def enable_prefix_caching(self) -> bool:
        return self.prefix_cache is not None

    @property
    def num_free_blocks(self) -> int:
        """Free blocks, counting cached ones that allocation may evict."""
        return self.pool.num_free

    def num_blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold ``num_tokens`` tokens."""
        return -(-num_tokens // self.block_size)

    def is_tracked(self, seq: Sequence) -> bool:
        """Whether ``seq`` currently holds blocks of this manager."""
        return self._seqs.get(seq.seq_id) is seq

    def _cached_prefix(self, seq: Sequence) -> tuple[list[int], list[BlockHash]]:
        """(blocks of the longest cached prefix, chain keys of all cacheable full blocks)."""
        if self.prefix_cache is None:
            return [], []
        cacheable = (len(seq) - 1) // self.block_size  # the last token is always recomputed
        keys = extend_block_hashes([], seq.token_ids, self.block_size, cacheable)
        hits: list[int] = []
        for key in keys:
            block = self.prefix_cache.lookup(key)
            if block is None:
                break
            hits.append(block)
        return hits, keys

    # ------------------------------------------------------------------ admission / prefill
    def can_ever_allocate(self, seqs) -> bool:
        """Whether ``seqs`` would fit in an otherwise empty pool (above the watermark)."""
        need = sum(self.num_blocks_for(len(s)) for s in seqs)
        return need <= self.num_blocks - self.watermark_blocks

    def can_allocate(self, seq: Sequence) -> bool:
        """Whether :meth:`allocate` of ``seq`` fits now and leaves the watermark free."""
        return self.can_allocate_all([seq])

    def can_allocate_all(self, seqs) -> bool:
        """Whether allocating every sequence of ``seqs`` fits now and leaves the watermark free."""
        new, revived = 0, set()
        for seq in seqs:
            hits, _ = self._cached_prefix(seq)
            new += self.num_blocks_for(len(seq)) - len(hits)
            revived.update(b for b in hits if self.pool.ref_count(b) == 0)
        return self.pool.num_free - len(revived) - new >= self.watermark_blocks

    def allocate(self, seq: Sequence) -> None:
        """Give ``seq`` blocks for all its ``len(seq)`` tokens, reusing its longest cached prefix.

        Sets ``seq.block_table``, ``seq.num_cached_tokens`` and ``seq.num_computed_tokens``
        (both the cached prefix length, a multiple of ``block_size`` below ``len(seq)``).
        """
        if seq.block_table or seq.seq_id in self._seqs:
            raise ValueError(f"seq_id={seq.seq_id} already has blocks {seq.block_table}; free it first")
        hits, keys = self._cached_prefix(seq)
        new = self.num_blocks_for(len(seq)) - len(hits)
        revived = {b for b in hits if self.pool.ref_count(b) == 0}
        if self.pool.num_free - len(revived) < new:
            raise NoFreeBlocksError(f"seq_id={seq.seq_id} needs {new} new blocks, "
                                    f"{self.pool.num_free - len(revived)} free")
        for b in hits:
            self.pool.incref(b)
        seq.block_table = hits + [self.pool.allocate() for _ in range(new)]
        seq.num_cached_tokens = seq.num_computed_tokens = len(hits) * self.block_size
        self._track(seq, keys, len(hits))
        self.prefix_query_blocks += len(keys)
        self.prefix_hit_blocks += len(hits)

    def _track(self, seq: Sequence, keys: list[BlockHash], registered: int) -> None:
        self._seqs[seq.seq_id] = seq
        self._hashes[seq.seq_id] = keys
        self._registered[seq.seq_id] = registered
        self.peak_blocks_in_use = max(self.peak_blocks_in_use, self.pool.num_used)

    def _check_tracked(self, seq: Sequence) -> None:
        if not self.is_tracked(seq):
            raise ValueError(f"seq_id={seq.seq_id} holds no blocks here; allocate or fork it first")

    # ------------------------------------------------------------------ decode
    def _append_need(self, seq: Sequence) -> tuple[int, bool]:
        """(new blocks, whether the block of position len(seq)-1 needs copy-on-write)."""
        last = (len(seq) - 1) // self.block_size
        table = seq.block_table
        new = max(0, last + 1 - len(table))
        cow = last < len(table) and self.pool.ref_count(table[last]) > 1
        return new, cow

    def can_append(self, seqs) -> bool:
        """Whether :meth:`append_slot` fits for every sequence of ``seqs`` (counting COW copies)."""
        need = 0
        for seq in seqs:
            new, cow = self._append_need(seq)
            need += new + cow
        return need <= self.pool.num_free

    def append_slot(self, seq: Sequence) -> list[tuple[int, int]]:
        """Make the slot of position ``len(seq) - 1`` exist and be private to ``seq``.

        Returns
        -------
        list[tuple[int, int]]
            ``(src_block, dst_block)`` copies (at most one, the copy-on-write of a shared last
            block) that the engine must apply to the K and V caches before this step's forward.
        """
        self._check_tracked(seq)
        self.mark_computed(seq)
        new, cow = self._append_need(seq)
        if new + cow > self.pool.num_free:
            raise NoFreeBlocksError(f"seq_id={seq.seq_id} needs {new + cow} blocks, {self.pool.num_free} free")
        table = seq.block_table
        copies = []
        if cow:
            last = (len(seq) - 1) // self.block_size
            src = table[last]
            dst = self.pool.allocate()
            self.pool.decref(src)
            table[last] = dst
            copies.append((src, dst))
            self.num_cow_copies += 1
        for _ in range(new):
            table.append(self.pool.allocate())
        self.peak_blocks_in_use = max(self.peak_blocks_in_use, self.pool.num_used)
        return copies

    def mark_computed(self, seq: Sequence) -> None:
        """Register ``seq``'s full blocks below ``seq.num_computed_tokens`` in the prefix cache."""
        if self.prefix_cache is None or not self.is_tracked(seq):
            return
        full = min(seq.num_computed_tokens, len(seq), len(seq.block_table) * self.block_size)
        full //= self.block_size
        done = self._registered[seq.seq_id]
        if full <= done:
            return
        keys = extend_block_hashes(self._hashes[seq.seq_id], seq.token_ids, self.block_size, full)
        for i in range(done, full):
            self.prefix_cache.insert(keys[i], seq.block_table[i])
        self._registered[seq.seq_id] = full

    # ------------------------------------------------------------------ sharing / release
    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Share all of ``parent``'s blocks with ``child`` (reference counts + 1).

        ``child`` must hold no blocks and agree with ``parent`` on the tokens whose KV is
        computed (``Sequence.fork`` makes such a child).
        """
        self._check_tracked(parent)
        if child.block_table or child.seq_id in self._seqs:
            raise ValueError(f"child seq_id={child.seq_id} already has blocks; fork needs a fresh child")
        n = parent.num_computed_tokens
        if child.token_ids[:n] != parent.token_ids[:n]:
            raise ValueError(f"child seq_id={child.seq_id} differs from parent seq_id={parent.seq_id} "
                             f"within the first {n} computed tokens")
        for b in parent.block_table:
            self.pool.incref(b)
        child.block_table = list(parent.block_table)
        self._track(child, list(self._hashes[parent.seq_id]), self._registered[parent.seq_id])

    def free(self, seq: Sequence) -> None:
        """Drop ``seq``'s references (no-op if it holds none); cached full blocks stay reusable."""
        if not self.is_tracked(seq):
            if seq.block_table:
                raise ValueError(f"seq_id={seq.seq_id} has a block table this manager did not give it")
            return
        self.mark_computed(seq)
        for b in reversed(seq.block_table):  # the tail goes to the free queue first: evicted first
            self.pool.decref(b)
        seq.block_table = []
        del self._seqs[seq.seq_id], self._hashes[seq.seq_id], self._registered[seq.seq_id]

    def record_preemption(self) -> None:
        """Count one preemption (the scheduler calls this)."""
        self.num_preemptions += 1

    # ------------------------------------------------------------------ lookup / stats
    def slot(self, seq: Sequence, pos: int) -> int:
        """Physical slot of token position ``pos``: ``block_table[pos // bs] * bs + pos % bs``."""
        if not 0 <= pos < len(seq.block_table) * self.block_size:
            raise ValueError(f"pos={pos} is outside the {len(seq.block_table)} blocks of seq_id={seq.seq_id}")
        return seq.block_table[pos // self.block_size] * self.block_size + pos % self.block_size

    def tracked_seqs(self) -> list[Sequence]:
        """Sequences currently holding blocks."""
        return list(self._seqs.values())

    def stats(self) -> dict:
        """Memory counters; O(total block-table entries + cached blocks).

        ``tokens_stored`` counts distinct physical slots that hold (or are about to hold, in this
        step's forward) a token; ``utilization = tokens_stored / slots_allocated`` (0.0 when no
        block is in use). ``blocks_saved_by_sharing = logical_blocks - blocks_in_use``, where
        ``logical_blocks`` is the sum of block-table lengths (what the same sequences would use
        without any sharing).
        """
        bs = self.block_size
        fill: dict[int, int] = {}
        logical = 0
        for seq in self._seqs.values():
            n = len(seq)
            logical += len(seq.block_table)
            for i, b in enumerate(seq.block_table):
                f = max(0, min(bs, n - i * bs))
                if f >= fill.get(b, 0):  # every table block gets an entry (shared_blocks below)
                    fill[b] = f
        in_use = self.pool.num_used
        stored = sum(fill.values())
        slots = in_use * bs
        cache = self.prefix_cache
        return {
            "num_blocks": self.num_blocks,
            "block_size": bs,
            "num_seqs": len(self._seqs),
            "blocks_in_use": in_use,
            "free_blocks": self.pool.num_free,
            "shared_blocks": sum(1 for b in fill if self.pool.ref_count(b) > 1),  # refs come from tables
            "logical_blocks": logical,
            "blocks_saved_by_sharing": logical - in_use,
            "tokens_stored": stored,
            "slots_allocated": slots,
            "utilization": stored / slots if slots else 0.0,
            "peak_blocks_in_use": self.peak_blocks_in_use,
            "prefix_cache_query_blocks": self.prefix_query_blocks,
            "prefix_cache_hit_blocks": self.prefix_hit_blocks,
            "prefix_cache_hit_tokens": self.prefix_hit_blocks * bs,
            "cached_blocks": len(cache) if cache else 0,
            "evictable_cached_blocks": cache.num_evictable() if cache else 0,
            "prefix_cache_evictions": cache.num_evictions if cache else 0,
            "preemptions": self.num_preemptions,
            "cow_copies": self.num_cow_copies,
        }
