"""Admission planning: which blocks a group's sequences reuse and how many are new (pure Python).

A plan for a group of sequences (one request) says, per sequence, which table entries come from
the prefix cache, which are shared with an earlier sequence of the same group that computes them
in the same step, which are new, and which stay :data:`~runtime.kv_layout.NULL_BLOCK` (wholly
outside a sliding window). :class:`runtime.kv_manager.KVCacheManager` checks a plan against the
free blocks (``plan_admission``) and carries out that same plan (``allocate_all``), so both agree.

In-group sharing matters when a preempted ``n > 1`` or beam-search request is recomputed: its
sequences agree on their prompt (and beams on more), so they share those blocks again instead
of needing one copy each. A later sequence may skip the shared tokens in its prefill because the
engine writes every token's K/V of a layer before any attention of that layer reads the cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from runtime.kv_layout import NULL_BLOCK, blocks_for_tokens, window_start
from runtime.prefix_cache import BlockHash, PrefixCache, extend_block_hashes


@dataclass
class SeqPlan:
    """The planned table of one sequence.

    ``reused[i]`` is a cached block id, ``("group", j)`` for the ``j``-th new block of the plan,
    or absent; entries ``[num_reused_end, num_blocks)`` from ``first_new`` on are new blocks.
    """

    keys: list[BlockHash]
    num_blocks: int
    cut: int                      # blocks whose KV is already there (or computed earlier this step)
    reused: dict[int, object] = field(default_factory=dict)   # table index -> block id or ("group", j)
    first_new: int = 0            # new blocks fill table indices [first_new, num_blocks)
    new_ids: list[int] = field(default_factory=list)          # group-wide ids of those new blocks


@dataclass
class GroupPlan:
    seqs: list[SeqPlan]
    num_new: int                  # blocks to take from the free queue
    revived: set[int]             # cached free blocks the plan takes back (each costs a free block)
    cache_hits: int               # table entries served by the prefix cache

    @property
    def num_taken(self) -> int:
        """Free blocks the plan consumes."""
        return self.num_new + len(self.revived)


def plan_group(seqs, block_size: int, window: int | None, cache: PrefixCache | None,
               ref_count, *, store_all: bool = False) -> GroupPlan:
    """Plan the allocation of ``seqs`` (all tokens of each; see the module docstring).

    ``cache`` None plans without the prefix cache (in-group sharing still applies);
    ``ref_count(block)`` tells which cached blocks are free (and so cost a free block to revive).
    With a window, ``store_all`` gives every uncached position a block, as vLLM does (the
    prefill stores the whole prompt, so that its full blocks enter the prefix cache; those
    outside the window are freed after the step); otherwise positions the window has left by the
    end of the prefill get none.
    """
    plans: list[SeqPlan] = []
    group_new: dict[BlockHash, int] = {}   # key -> group-wide id of a new full block
    num_new, revived, hits = 0, set(), 0
    for seq in seqs:
        n = len(seq)
        cacheable = (n - 1) // block_size  # the last token is always recomputed: it gives the logits
        keys = extend_block_hashes([], seq.token_ids, block_size, cacheable)
        avail: list[object] = []
        for key in keys:
            block = cache.lookup(key) if cache is not None else None
            avail.append(block if block is not None else (("group", group_new[key]) if key in group_new else None))
        cut = _longest_cut(avail, block_size, window)
        plan = SeqPlan(keys, blocks_for_tokens(n, block_size), cut)
        for i in range(window_start(cut * block_size, window) // block_size if cut else 0, cut):
            plan.reused[i] = avail[i]
            if not isinstance(avail[i], tuple):
                hits += 1
                if ref_count(avail[i]) == 0:
                    revived.add(avail[i])
        # the block of the last position (n - 1) always exists, even at window 1 where no later
        # query reads it: the prefill writes its K/V there, and a table ends in a real block
        kept = min(window_start(n, window), n - 1)
        plan.first_new = cut if store_all else max(cut, kept // block_size)
        for i in range(plan.first_new, plan.num_blocks):
            plan.new_ids.append(num_new)
            if i < cacheable and keys[i] not in group_new:
                group_new[keys[i]] = num_new
            num_new += 1
        plans.append(plan)
    return GroupPlan(plans, num_new, revived, hits)


def _longest_cut(avail: list, block_size: int, window: int | None) -> int:
    """Largest ``c`` such that every block a prefill from position ``c * bs`` reads is available.

    Without a window that is the longest available prefix; with one, only the blocks holding
    positions ``[c * bs - window + 1, c * bs)`` must be available (those before are never read).
    """
    run = 0          # available blocks ending at index i
    best = 0
    for i, a in enumerate(avail):
        run = run + 1 if a is not None else 0
        c = i + 1
        need = c - window_start(c * block_size, window) // block_size
        if run >= need:
            best = c
        elif window is None:
            break
    return best


def apply_plan(plan: SeqPlan, new_blocks: list[int]) -> list[int]:
    """The block table of ``plan`` given the group's new block ids (``new_blocks[j]``)."""
    table = [NULL_BLOCK] * plan.num_blocks
    for i, src in plan.reused.items():
        table[i] = new_blocks[src[1]] if isinstance(src, tuple) else src
    for i, j in zip(range(plan.first_new, plan.num_blocks), plan.new_ids):
        table[i] = new_blocks[j]
    return table
