"""Continuous batching with admission by free blocks and preemption by recompute (pure Python).

One :meth:`Scheduler.schedule` call plans one engine step:

1. Decode: every running group (oldest arrival first) first releases the blocks that slid out of
   a sliding window, then gets ``append_slot`` for each unfinished sequence. When blocks run out,
   the newest running group is preempted: all its sequences' blocks are freed, their KV state is
   reset, and the group goes back to the front of the waiting queue (counted in
   ``stats()["preemptions"]``). If the group that needs blocks is the newest one left, it is
   preempted itself; if it is the only group and still cannot grow, the pool is too small for it
   and it is aborted.
2. Admission (skipped in a step that preempted): waiting groups, first come first served, while
   ``max_num_seqs``, ``max_num_batched_tokens`` and the free blocks above the watermark allow.
   The unfinished sequences of an admitted group are allocated together (they share the blocks
   they agree on) and prefilled. A re-admitted preempted sequence is prefilled over all its
   tokens (prompt + generated so far) and then continues as if it had never been preempted. A
   group that could not fit even in an empty pool is aborted.

An aborted group's unfinished sequences finish with reason ``"abort"`` (never ``"length"``: the
request did not reach its length limit) and ``group.error`` names the request and the blocks it
needs; the group is listed in ``SchedulerOutput.aborted``.

The engine then copies ``copies`` on its K/V caches, runs prefill for ``prefill_seqs`` (over
``token_ids[num_cached_tokens:]``) and decode for ``decode_seqs``, appends the sampled tokens, sets
``num_computed_tokens``, calls :meth:`Scheduler.finish_seq` on sequences that stop and finally
:meth:`Scheduler.free_finished`.
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
        Newly admitted (or re-admitted) sequences; run over ``token_ids[num_cached_tokens:]``.
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
        """Tokens the forward processes: uncached prefill tokens plus one per decode."""
        return sum(len(s) - s.num_cached_tokens for s in self.prefill_seqs) + len(self.decode_seqs)

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
        Token budget of one step's forward (>= ``max_num_seqs``); a single prompt longer than
        the budget is still admitted when it would be alone in the step's batch.
    """

    def __init__(self, kv_manager: KVCacheManager, *, max_num_seqs: int = 256,
                 max_num_batched_tokens: int = 8192) -> None:
        if not isinstance(max_num_seqs, int) or max_num_seqs <= 0:
            raise ValueError(f"max_num_seqs must be a positive int, got {max_num_seqs!r}")
        if not isinstance(max_num_batched_tokens, int) or max_num_batched_tokens < max_num_seqs:
            raise ValueError(f"max_num_batched_tokens must be an int >= max_num_seqs={max_num_seqs}, "
                             f"got {max_num_batched_tokens!r}")
        self.kv = kv_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
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
        self._schedule_decodes(out)
        if not out.preempted:
            self._admit(out)
        return out

    def _schedule_decodes(self, out: SchedulerOutput) -> None:
        queue = collections.deque(self.running)  # oldest first; victims are taken from the end
        kept: list[SequenceGroup] = []
        while queue:
            group = queue.popleft()
            seqs = group.unfinished_seqs()
            if not seqs:
                kept.append(group)  # finished; free_finished() removes it
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
                    out.copies.extend(self.kv.append_slot(s))
                    out.decode_seqs.append(s)
                kept.append(group)
        self.running = kept

    def _admit(self, out: SchedulerOutput) -> None:
        num_seqs = self.num_running_seqs
        tokens = len(out.decode_seqs)
        admitted = False
        while self.waiting:
            group = self.waiting[0]
            seqs = group.unfinished_seqs()
            if not seqs:
                self.waiting.popleft()
                self._request_ids.discard(group.request_id)
                continue
            need = self.kv.blocks_to_admit(seqs)
            if need > self.kv.usable_blocks:  # it would not fit in an empty pool either
                self.waiting.popleft()
                self._abort(group, out, need, "to be admitted")
                continue
            if num_seqs + len(seqs) > self.max_num_seqs:
                break
            new_tokens = sum(len(s) for s in seqs)
            if tokens + new_tokens > self.max_num_batched_tokens and (tokens or admitted):
                break
            plan = self.kv.plan_admission(seqs)
            if plan is None:
                break
            self.waiting.popleft()
            self.kv.allocate_all(seqs, plan)
            for s in seqs:
                s.status = SequenceStatus.RUNNING
                out.prefill_seqs.append(s)
                tokens += len(s) - s.num_cached_tokens
            num_seqs += len(seqs)
            self.running.append(group)
            admitted = True
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
