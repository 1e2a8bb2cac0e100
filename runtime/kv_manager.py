"""Per-sequence block tables over a shared block pool: allocate, append, fork, copy-on-write, free.

Pure Python (no torch, no kgen), so the memory study in ``bench/`` drives it without a model.
The formulas (blocks for n tokens, slots, the window's first live position) live in
:mod:`runtime.kv_layout`; admission planning in :mod:`runtime.kv_plan`.

Contract with the engine (see also :mod:`runtime.scheduler`):

- ``allocate_all(seqs)`` builds each ``seq.block_table`` for all ``len(seq)`` tokens (the
  prefill). It reuses the longest cached prefix of *full, computed* blocks (prefix caching) and
  blocks that an earlier sequence of the same call computes in this step (in-group sharing);
  ``seq.num_cached_tokens`` (= ``seq.num_computed_tokens``) says how many tokens the prefill may
  skip. The last token is never skipped, so the prefill always yields logits.
- After each forward pass the engine sets ``seq.num_computed_tokens`` (normally ``len(seq) - 1``
  once the sampled token is appended). Full blocks below that count are registered in the prefix
  cache by :meth:`KVCacheManager.mark_computed`, which ``append_slot``, ``release_out_of_window``
  and ``free`` call, so the engine need not.
- ``append_slot(seq)`` before a decode step makes the slot of position ``len(seq) - 1`` exist and
  be private (copy-on-write of a shared last block); it returns ``(src, dst)`` block copies that
  the engine performs on the K and V caches before the forward.
- ``fork(parent, child)`` shares every block; ``free(seq)`` drops the references. Blocks of freed
  sequences that hold cached prefixes stay reusable until allocation evicts them, LRU first.

Sliding window (``sliding_window=W``, a model whose every layer uses the same window): blocks
wholly below :func:`runtime.kv_layout.window_start` of the next query position are freed by
``release_out_of_window`` (and never allocated at admission), their table entries set to
:data:`~runtime.kv_layout.NULL_BLOCK`, so a sequence holds at most
``kv_layout.window_blocks(W, bs)`` blocks while it decodes. The engine must not read those
entries, and writes no K/V into them.

Allocation failures raise :class:`runtime.block_pool.NoFreeBlocksError`; the scheduler checks
``plan_admission`` / ``can_append`` first, so it never sees one.
"""

from __future__ import annotations

from runtime import kv_layout
from runtime.block_pool import BlockPool, NoFreeBlocksError
from runtime.kv_layout import NULL_BLOCK, window_start
from runtime.kv_plan import GroupPlan, apply_plan, plan_group
from runtime.kv_stats import memory_stats
from runtime.prefix_cache import BlockHash, PrefixCache, extend_block_hashes
from runtime.sequence import Sequence

__all__ = ["KVCacheManager", "NoFreeBlocksError", "NULL_BLOCK"]


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
    sliding_window : int, optional
        The window of every layer; blocks that slide wholly out of it are freed.
    """

    def __init__(self, num_blocks: int, block_size: int, *, enable_prefix_caching: bool = True,
                 watermark: float = 0.01, sliding_window: int | None = None) -> None:
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        if not 0.0 <= watermark < 1.0:
            raise ValueError(f"watermark must be in [0, 1), got {watermark!r}")
        if sliding_window is not None and (isinstance(sliding_window, bool) or not isinstance(sliding_window, int)
                                           or sliding_window <= 0):
            raise ValueError(f"sliding_window must be a positive int or None, got {sliding_window!r}")
        self.pool = BlockPool(num_blocks)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.sliding_window = sliding_window
        self.watermark_blocks = kv_layout.watermark_blocks(num_blocks, watermark)
        self.prefix_cache = PrefixCache(self.pool) if enable_prefix_caching else None
        self._seqs: dict[int, Sequence] = {}            # seq_id -> sequence holding blocks
        self._hashes: dict[int, list[BlockHash]] = {}    # seq_id -> chain keys of its full blocks
        self._registered: dict[int, int] = {}            # seq_id -> blocks already offered to the cache
        self._live_from: dict[int, int] = {}             # seq_id -> table entries below are NULL_BLOCK
        self._held: dict[int, int] = {}                  # seq_id -> non-null table entries
        self.num_preemptions = 0
        self.num_cow_copies = 0
        self.prefix_query_blocks = 0
        self.prefix_hit_blocks = 0
        self.prefill_tokens_skipped = 0
        self.window_freed_blocks = 0
        self.peak_blocks_in_use = 0
        self.peak_blocks_per_seq = 0  # the most one sequence held at a decode step

    @property
    def enable_prefix_caching(self) -> bool:
        return self.prefix_cache is not None

    @property
    def num_free_blocks(self) -> int:
        """Free blocks, counting cached ones that allocation may evict."""
        return self.pool.num_free

    @property
    def usable_blocks(self) -> int:
        """Blocks admission may hand out in an empty pool (the pool minus the watermark)."""
        return self.num_blocks - self.watermark_blocks

    def num_blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold ``num_tokens`` tokens."""
        return kv_layout.blocks_for_tokens(num_tokens, self.block_size)

    def is_tracked(self, seq: Sequence) -> bool:
        """Whether ``seq`` currently holds blocks of this manager."""
        return self._seqs.get(seq.seq_id) is seq

    def num_held_blocks(self, seq: Sequence) -> int:
        """Table entries of ``seq`` that hold a block (all but the freed, out-of-window ones)."""
        return self._held.get(seq.seq_id, 0)

    # ------------------------------------------------------------------ admission / prefill
    def _plan(self, seqs, *, use_cache: bool = True, store_all: bool = False) -> GroupPlan:
        cache = self.prefix_cache if use_cache else None
        return plan_group(seqs, self.block_size, self.sliding_window, cache, self.pool.ref_count,
                          store_all=store_all)

    def blocks_to_admit(self, seqs, *, store_all: bool = False) -> int:
        """Blocks ``seqs`` need in an empty pool with an empty prefix cache (in-group sharing
        only); ``store_all``: with a window, every prompt position gets a block."""
        return self._plan(seqs, use_cache=False, store_all=store_all).num_taken

    def can_allocate(self, seq: Sequence) -> bool:
        """Whether :meth:`allocate` of ``seq`` fits now and leaves the watermark free."""
        return self.can_allocate_all([seq])

    def plan_admission(self, seqs, *, store_all: bool = False) -> GroupPlan | None:
        """The first plan that fits above the watermark, else None (hand it to :meth:`allocate_all`
        before anything else allocates or frees, or it no longer describes the pool). In order: with prefix-cache
        hits; with a window, first storing every prompt position (so that the prompt's full
        blocks enter the prefix cache, as vLLM does; the out-of-window ones are freed after the
        step) and then only what the window keeps; finally without cache hits (a windowed
        prefill may hold cached blocks it will not keep).

        ``store_all`` allows only plans that give every position being prefilled a block: needed
        when the prefill is chunked over several steps, or when attention reads every key of the
        prompt from the cache (kgen's kernels), since a later row reads the earlier rows' K/V."""
        caching = self.prefix_cache is not None
        if self.sliding_window and store_all:
            options = [(True, True), (False, True)]
        elif self.sliding_window:
            options = [(True, True), (True, False), (False, False)]
        else:
            options = [(True, False), (False, False)]
        for use_cache, store_all in options:
            if use_cache and not caching:
                continue
            plan = self._plan(seqs, use_cache=use_cache, store_all=store_all)
            if self.pool.num_free - plan.num_taken >= self.watermark_blocks:
                return plan
        return None

    def can_allocate_all(self, seqs) -> bool:
        """Whether allocating every sequence of ``seqs`` fits now and leaves the watermark free."""
        return self.plan_admission(seqs) is not None

    def allocate(self, seq: Sequence) -> None:
        """:meth:`allocate_all` of one sequence."""
        self.allocate_all([seq])

    def allocate_all(self, seqs, plan: GroupPlan | None = None) -> None:
        """Give each of ``seqs`` blocks for all its ``len(seq)`` tokens (see the module docstring),
        following ``plan`` (from :meth:`plan_admission` just before) or one made now.

        Sets ``seq.block_table``, ``seq.num_cached_tokens`` and ``seq.num_computed_tokens`` (both
        the reused prefix length, a multiple of ``block_size`` below ``len(seq)``).
        """
        for seq in seqs:
            if seq.block_table or seq.seq_id in self._seqs:
                raise ValueError(f"seq_id={seq.seq_id} already has blocks {seq.block_table}; free it first")
        plan = plan or self.plan_admission(seqs)
        if plan is None:
            need = self._plan(seqs).num_taken
            raise NoFreeBlocksError(f"seq_ids={[s.seq_id for s in seqs]} need {need} blocks, "
                                    f"{self.pool.num_free} free")
        # one setup reference on every revived and new block (revived ones leave the free queue
        # first, so that allocate() cannot evict them), one per table entry, then drop the setup ones
        for b in plan.revived:
            self.pool.incref(b)
        new_blocks = [self.pool.allocate() for _ in range(plan.num_new)]
        for seq, sp in zip(seqs, plan.seqs):
            seq.block_table = apply_plan(sp, new_blocks)
            for b in seq.block_table:
                if b != NULL_BLOCK:
                    self.pool.incref(b)
            seq.num_cached_tokens = seq.num_computed_tokens = sp.cut * self.block_size
            self._track(seq, sp.keys, min(sp.reused, default=sp.first_new), sp.cut)
            self.prefix_query_blocks += len(sp.keys)
            self.prefill_tokens_skipped += seq.num_cached_tokens
        for b in list(plan.revived) + new_blocks:
            self.pool.decref(b)
        self.prefix_hit_blocks += plan.cache_hits
        self.peak_blocks_in_use = max(self.peak_blocks_in_use, self.pool.num_used)

    def _track(self, seq: Sequence, keys: list[BlockHash], live_from: int, registered: int) -> None:
        self._seqs[seq.seq_id] = seq
        self._hashes[seq.seq_id] = keys
        self._registered[seq.seq_id] = registered
        self._live_from[seq.seq_id] = live_from
        self._held[seq.seq_id] = sum(1 for b in seq.block_table if b != NULL_BLOCK)
        self.peak_blocks_in_use = max(self.peak_blocks_in_use, self.pool.num_used)

    def _check_tracked(self, seq: Sequence) -> None:
        if not self.is_tracked(seq):
            raise ValueError(f"seq_id={seq.seq_id} holds no blocks here; allocate or fork it first")

    # ------------------------------------------------------------------ decode
    def release_out_of_window(self, seq: Sequence) -> int:
        """Free ``seq``'s blocks that lie wholly below the window of its next query; returns how
        many table entries were released (0 without a sliding window)."""
        if self.sliding_window is None or not self.is_tracked(seq):
            return 0
        self.mark_computed(seq)
        sid, table = seq.seq_id, seq.block_table
        end = min(window_start(seq.num_computed_tokens, self.sliding_window) // self.block_size, len(table) - 1)
        released = 0
        for i in range(self._live_from[sid], end):
            if table[i] != NULL_BLOCK:
                self.pool.decref(table[i])
                table[i] = NULL_BLOCK
                released += 1
        self._live_from[sid] = max(self._live_from[sid], end)
        self._held[sid] -= released
        self.window_freed_blocks += released
        return released

    def _append_need(self, seq: Sequence) -> tuple[int, bool]:
        """(new blocks, whether the block of position len(seq)-1 needs copy-on-write)."""
        last = (len(seq) - 1) // self.block_size
        table = seq.block_table
        new = max(0, last + 1 - len(table))
        cow = last < len(table) and self.pool.ref_count(table[last]) > 1
        return new, cow

    def append_need(self, seqs) -> int:
        """Free blocks :meth:`append_slot` of every sequence of ``seqs`` takes (counting COW copies)."""
        need = 0
        for seq in seqs:
            new, cow = self._append_need(seq)
            need += new + cow
        return need

    def can_append(self, seqs) -> bool:
        """Whether :meth:`append_slot` fits for every sequence of ``seqs`` (counting COW copies)."""
        return self.append_need(seqs) <= self.pool.num_free

    def append_slot(self, seq: Sequence) -> list[tuple[int, int]]:
        """Make the slot of position ``len(seq) - 1`` exist and be private to ``seq``.

        Returns
        -------
        list[tuple[int, int]]
            ``(src_block, dst_block)`` copies (at most one, the copy-on-write of a shared last
            block) that the engine must apply to the K and V caches before this step's forward.
        """
        self._check_tracked(seq)
        self.release_out_of_window(seq)
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
        self._held[seq.seq_id] += new
        self.peak_blocks_in_use = max(self.peak_blocks_in_use, self.pool.num_used)
        self.peak_blocks_per_seq = max(self.peak_blocks_per_seq, self._held[seq.seq_id])
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
            if seq.block_table[i] != NULL_BLOCK:
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
            if b != NULL_BLOCK:
                self.pool.incref(b)
        child.block_table = list(parent.block_table)
        pid = parent.seq_id
        self._track(child, list(self._hashes[pid]), self._live_from[pid], self._registered[pid])

    def free(self, seq: Sequence) -> None:
        """Drop ``seq``'s references (no-op if it holds none); cached full blocks stay reusable."""
        if not self.is_tracked(seq):
            if seq.block_table:
                raise ValueError(f"seq_id={seq.seq_id} has a block table this manager did not give it")
            return
        self.mark_computed(seq)
        for b in reversed(seq.block_table):  # the tail goes to the free queue first: evicted first
            if b != NULL_BLOCK:
                self.pool.decref(b)
        seq.block_table = []
        sid = seq.seq_id
        del self._seqs[sid], self._hashes[sid], self._registered[sid], self._live_from[sid], self._held[sid]

    def record_preemption(self) -> None:
        """Count one preemption (the scheduler calls this)."""
        self.num_preemptions += 1

    # ------------------------------------------------------------------ lookup / stats
    def slot(self, seq: Sequence, pos: int) -> int:
        """Physical slot of token position ``pos`` (:func:`runtime.kv_layout.slot_of`)."""
        if not 0 <= pos < len(seq.block_table) * self.block_size:
            raise ValueError(f"pos={pos} is outside the {len(seq.block_table)} blocks of seq_id={seq.seq_id}")
        return kv_layout.slot_of(seq.block_table, pos, self.block_size)

    def slots(self, seq: Sequence, start: int, end: int) -> list[int]:
        """Slots of positions ``start .. end - 1`` of ``seq``."""
        if not 0 <= start <= end <= len(seq.block_table) * self.block_size:
            raise ValueError(f"positions {start}..{end} are outside the {len(seq.block_table)} blocks "
                             f"of seq_id={seq.seq_id}")
        return kv_layout.slots_of(seq.block_table, start, end, self.block_size)

    def tracked_seqs(self) -> list[Sequence]:
        """Sequences currently holding blocks."""
        return list(self._seqs.values())

    def stats(self) -> dict:
        """Memory counters (:func:`runtime.kv_stats.memory_stats`)."""
        return memory_stats(self)
