"""Continuous batching with chunked prefill, admission by free blocks and preemption by recompute
(pure Python).

One :meth:`Scheduler.schedule` call plans one engine step within ``max_num_batched_tokens``
tokens, as vLLM does:

1. Decode: every running group (oldest arrival first) first releases the blocks that slid out of
   a sliding window, then gets ``append_slot`` for each sequence that decodes (one new token).
   When blocks run out, the newest running group is preempted: all its sequences' blocks are
   freed, their KV state is reset, and the group goes back to the front of the waiting queue
   (counted in ``stats()["preemptions"]``). If the group that needs blocks is the newest one
   left, it is preempted itself; if it is the only group and still cannot grow, the pool is too
   small for it and it is aborted. Decodes always run: a long prompt never stalls them.
2. Prefill chunks: running sequences whose prefill is not finished (it did not fit one step's
   budget) get the next chunk of their uncomputed tokens, oldest first, from the budget left.
3. Admission (skipped in a step that preempted): waiting groups, first come first served, while
   ``max_num_seqs``, the token budget and the free blocks above the watermark allow. The
   unfinished sequences of an admitted group are allocated together (blocks for all their tokens;
   they share the blocks they agree on) and prefilled, in chunks when the budget is short. A
   re-admitted preempted sequence is prefilled over all its tokens (prompt + generated so far)
   and then continues as if it had never been preempted. A group that could not fit even in an
   empty pool is aborted.

Each scheduled sequence's ``num_scheduled_tokens`` says how many tokens it runs this step, from
position ``num_computed_tokens`` (1 for a decode). With a sliding window, a prefill that is
chunked, or read back from the cache by the attention kernels (``store_whole_prompt``), stores
every prompt position (the window's freeing then happens once the prefill is done).

An aborted group's unfinished sequences finish with reason ``"abort"`` (never ``"length"``: the
request did not reach its length limit) and ``group.error`` names the request and the blocks it
needs; the group is listed in ``SchedulerOutput.aborted``.

The engine then copies ``copies`` on its K/V caches, runs the scheduled tokens of
``prefill_seqs`` and ``decode_seqs``, advances ``num_computed_tokens``, samples a token for every
sequence whose tokens are now all computed, calls :meth:`Scheduler.finish_seq` on sequences that
stop and finally :meth:`Scheduler.free_finished`.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

from runtime.kv_manager import KVCacheManager
from runtime.sequence import FINISH_REASONS, Sequence, SequenceGroup, SequenceStatus


@dataclass
class SchedulerOutput:
    """The plan of one step.

    Attributes
    ----------
    prefill_seqs : list[Sequence]
        Sequences running a chunk of their prefill (newly admitted or continuing): tokens
        ``num_computed_tokens .. num_computed_tokens + num_scheduled_tokens - 1``.
    decode_seqs : list[Sequence]
        Running sequences; one decode token each (position ``len(seq) - 1``).
    copies : list[tuple[int, int]]
        Copy-on-write block copies ``(src, dst)`` to apply before the forward.
    preempted : list[SequenceGroup]
        Groups preempted this step (blocks freed, back in the waiting queue).
    aborted : list[SequenceGroup]
        Groups that can never fit the pool; their sequences are finished (``"abort"``) and
        ``group.error`` says why.
    """

    prefill_seqs: list[Sequence] = field(default_factory=list)
    decode_seqs: list[Sequence] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)
    preempted: list[SequenceGroup] = field(default_factory=list)
    aborted: list[SequenceGroup] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        """Tokens the forward processes: the prefill chunks plus one per decode."""
        return sum(s.num_scheduled_tokens for s in self.prefill_seqs) + len(self.decode_seqs)

    def is_empty(self) -> bool:
        return not (self.prefill_seqs or self.decode_seqs)


class Scheduler:
    """First-come-first-served continuous batching over a :class:`KVCacheManager`.

    Parameters
    ----------
    kv_manager : KVCacheManager
    max_num_seqs : int
        Most sequences running at once (> 0).
    max_num_batched_tokens : int
        Token budget of one step's forward (>= ``max_num_seqs``); longer prompts are prefilled
        in chunks over several steps.
    store_whole_prompt : bool
        With a sliding window, give every prompt position a block even when the prefill runs in
        one step (the attention reads the prompt's keys back from the cache).
    """

    def __init__(self, kv_manager: KVCacheManager, *, max_num_seqs: int = 256,
                 max_num_batched_tokens: int = 8192, store_whole_prompt: bool = False) -> None:
        if not isinstance(max_num_seqs, int) or max_num_seqs <= 0:
            raise ValueError(f"max_num_seqs must be a positive int, got {max_num_seqs!r}")
        if not isinstance(max_num_batched_tokens, int) or max_num_batched_tokens < max_num_seqs:
            raise ValueError(f"max_num_batched_tokens must be an int >= max_num_seqs={max_num_seqs}, "
                             f"got {max_num_batched_tokens!r}")
        self.kv = kv_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.store_whole_prompt = store_whole_prompt
        self.waiting: collections.deque[SequenceGroup] = collections.deque()
        self.running: list[SequenceGroup] = []  # sorted by arrival, oldest first
        self._next_arrival = 0
        self._request_ids: set = set()
        self.num_steps = 0

    # ------------------------------------------------------------------ queue
    def add(self, group: SequenceGroup) -> None:
        """Queue a new request; its sequences must be WAITING and hold no blocks."""
        if group.request_id in self._request_ids:
            raise ValueError(f"request_id={group.request_id!r} is already queued or running")
        for s in group.seqs:
            if s.status is not SequenceStatus.WAITING or s.block_table:
                raise ValueError(f"seq_id={s.seq_id} of request_id={group.request_id} is "
                                 f"{s.status.name} with blocks {s.block_table}; new requests need fresh seqs")
        if group.arrival is None:
            group.arrival = self._next_arrival
        self._next_arrival = max(self._next_arrival, group.arrival) + 1
        self._request_ids.add(group.request_id)
        self.waiting.append(group)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_running_seqs(self) -> int:
        return sum(len(g.unfinished_seqs()) for g in self.running)

    # ------------------------------------------------------------------ step
    def schedule(self) -> SchedulerOutput:
        """Plan one step (see the module docstring)."""
        self.num_steps += 1
        out = SchedulerOutput()
        for group in self.running:
            for s in group.seqs:
                s.num_scheduled_tokens = 0
        self._schedule_decodes(out)
        budget = self.max_num_batched_tokens - len(out.decode_seqs)
        budget = self._schedule_chunks(out, budget)
        if not out.preempted:
            self._admit(out, budget)
        return out

    def _schedule_decodes(self, out: SchedulerOutput) -> None:
        queue = collections.deque(self.running)  # oldest first; victims are taken from the end
        kept: list[SequenceGroup] = []
        while queue:
            group = queue.popleft()
            seqs = [s for s in group.unfinished_seqs() if s.num_uncomputed_tokens == 1]
            if not seqs:
                kept.append(group)  # finished, or still prefilling: see _schedule_chunks
                continue
            for s in seqs:
                self.kv.release_out_of_window(s)
            while not self.kv.can_append(seqs):
                if queue:
                    victim = queue.pop()
                    self._preempt(victim)
                    out.preempted.append(victim)
                elif kept:
                    self._preempt(group)
                    out.preempted.append(group)
                    break
                else:
                    held = len({b for s in seqs for b in s.block_table if b >= 0})
                    self._abort(group, out, held + self.kv.append_need(seqs), "to grow")
                    break
            else:
                for s in seqs:
                    s.status = SequenceStatus.RUNNING
                    s.num_scheduled_tokens = 1
                    out.copies.extend(self.kv.append_slot(s))
                    out.decode_seqs.append(s)
                kept.append(group)
        self.running = kept

    def _schedule_chunks(self, out: SchedulerOutput, budget: int) -> int:
        """The next prefill chunk of every running sequence still prefilling; the budget left."""
        for group in self.running:
            for s in group.unfinished_seqs():
                if s.num_uncomputed_tokens > 1 and s.num_scheduled_tokens == 0 and budget > 0:
                    s.num_scheduled_tokens = min(s.num_uncomputed_tokens, budget)
                    budget -= s.num_scheduled_tokens
                    out.prefill_seqs.append(s)
        return budget

    def _needs_store_all(self, seqs, budget: int) -> bool:
        """Whether the group's prefill must store every prompt position (see the module docstring)."""
        return self.store_whole_prompt or sum(s.num_uncomputed_tokens for s in seqs) > budget

    def _admit(self, out: SchedulerOutput, budget: int) -> None:
        num_seqs = self.num_running_seqs
        while self.waiting and budget > 0:
            group = self.waiting[0]
            seqs = group.unfinished_seqs()
            if not seqs:
                self.waiting.popleft()
                self._request_ids.discard(group.request_id)
                continue
            alone = self._needs_store_all(seqs, self.max_num_batched_tokens)
            need = self.kv.blocks_to_admit(seqs, store_all=alone)
            if need > self.kv.usable_blocks:  # it would not fit in an empty pool either
                self.waiting.popleft()
                self._abort(group, out, need, "to be admitted")
                continue
            if num_seqs + len(seqs) > self.max_num_seqs:
                break
            plan = self.kv.plan_admission(seqs, store_all=self._needs_store_all(seqs, budget))
            if plan is None:
                break
            self.waiting.popleft()
            self.kv.allocate_all(seqs, plan)
            for s in seqs:
                s.status = SequenceStatus.RUNNING
                s.num_scheduled_tokens = min(s.num_uncomputed_tokens, budget)
                budget -= s.num_scheduled_tokens
                if s.num_scheduled_tokens:
                    out.prefill_seqs.append(s)
            num_seqs += len(seqs)
            self.running.append(group)
        self.running.sort(key=lambda g: g.arrival)

    def _preempt(self, group: SequenceGroup) -> None:
        for s in group.unfinished_seqs():
            self.kv.free(s)
            s.reset_for_recompute()
        self.kv.record_preemption()
        self.waiting.appendleft(group)

    def _abort(self, group: SequenceGroup, out: SchedulerOutput, need: int, what: str) -> None:
        seqs = group.unfinished_seqs()
        group.error = (f"request_id={group.request_id} needs {need} KV blocks of {self.kv.block_size} tokens "
                       f"{what} ({len(seqs)} sequence(s) of up to {max(len(s) for s in seqs)} tokens); the pool "
                       f"has num_blocks={self.kv.num_blocks} ({self.kv.usable_blocks} usable for admission)")
        for s in seqs:
            self.finish_seq(s, "abort")
        self._request_ids.discard(group.request_id)
        out.aborted.append(group)

    # ------------------------------------------------------------------ completion
    def finish_seq(self, seq: Sequence, reason: str = "stop") -> None:
        """Mark ``seq`` finished with ``reason`` (one of ``FINISH_REASONS``) and free its blocks now."""
        if reason not in FINISH_REASONS:
            raise ValueError(f"reason must be one of {FINISH_REASONS}, got {reason!r}")
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self.kv.free(seq)

    def free_finished(self) -> list[SequenceGroup]:
        """Free blocks of finished sequences still holding some; drop and return finished groups."""
        done = []
        for group in self.running:
            for s in group.seqs:
                if s.is_finished() and self.kv.is_tracked(s):
                    self.kv.free(s)
            if group.is_finished():
                done.append(group)
        if done:
            self.running = [g for g in self.running if not g.is_finished()]
            for g in done:
                self._request_ids.discard(g.request_id)
        return done

    def stats(self) -> dict:
        """``KVCacheManager.stats()`` plus queue sizes and the step count."""
        s = self.kv.stats()
        s.update(num_waiting=len(self.waiting), num_running=len(self.running), num_steps=self.num_steps)
        return s
