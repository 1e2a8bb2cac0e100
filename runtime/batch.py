"""One engine step's batch: token ids, positions, cache slots and attention metadata, built once.

Rows are the prefill chunks of the prefilling sequences (each over ``token_ids[
num_computed_tokens : num_computed_tokens + num_scheduled_tokens]``), then one token per decoding
sequence (its last). Only the sequences whose tokens are then all computed sample a token: a
prefill chunk that does not reach the end of its sequence yields no logits. Slots come from the
memory manager (:mod:`runtime.kv_layout`'s formula, never written out here). A sliding window's
prefill may have no block for positions its window has already left: those rows are computed
but not stored (``AttentionMetadata.write_rows``). Freed (out-of-window) table entries and the
padding of the decode block tables become block 0, a valid id no backend reads there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from runtime.attention_meta import AttentionMetadata, PrefillSpan, VarlenBatch
from runtime.kv_layout import NULL_BLOCK, window_start
from runtime.sequence import Sequence


@dataclass
class StepBatch:
    """Host lists of one step plus the metadata (decode tables and lengths set, not yet prepared)."""

    ids: list[int]
    positions: list[int]
    slots: list[int]              # cache slot of each written row
    last_rows: list[int]          # the rows whose logits are sampled, one per sampling sequence
    sampled: list[Sequence]       # the sequences those rows belong to, in the same order
    tables: list[list[int]]       # decode block tables, padded to one width
    lens: list[int]               # decode sequence lengths
    meta: AttentionMetadata


def build_batch(kv, prefill: list[Sequence], decode: list[Sequence], device, *,
                varlen: bool = False) -> StepBatch:
    """The batch of one step over sequences the :class:`runtime.kv_manager.KVCacheManager` ``kv``
    has allocated (``prefill``) or appended a slot to (``decode``).

    ``varlen`` also builds ``meta.varlen`` (every sequence in kgen's any-query-length contract)
    for a backend that reads the whole batch from the cache; such a step must store every row's
    K/V (the scheduler's ``store_whole_prompt``), and no cached prefix is gathered for it."""
    bs = kv.block_size
    ids, pos, slots, write_rows, last_rows, sampled = [], [], [], [], [], []
    spans: list[PrefillSpan] = []
    skipped = False
    for seq in prefill:
        start = seq.num_computed_tokens
        end = start + seq.num_scheduled_tokens
        if not start < end <= len(seq):
            raise ValueError(f"seq_id={seq.seq_id}: scheduled positions {start}..{end - 1} are "
                             f"not uncomputed tokens of its {len(seq)}")
        first = start  # a sliding window's prefill stores only the positions in blocks it kept
        while first < end and seq.block_table[first // bs] == NULL_BLOCK:
            first = (first // bs + 1) * bs
        first = min(first, end)
        skipped |= first > start
        write_rows.extend(range(len(ids) + first - start, len(ids) + end - start))
        slots.extend(kv.slots(seq, first, end))
        ids.extend(seq.token_ids[start:end])
        pos.extend(range(start, end))
        span = PrefillSpan(len(ids) - (end - start), len(ids), start, end)
        if start and not varlen:
            span.read_start = window_start(start, kv.sliding_window)
            span.cached_slots = torch.tensor(kv.slots(seq, span.read_start, start), dtype=torch.int64,
                                             device=device)
        spans.append(span)
        if end == len(seq):
            last_rows.append(len(ids) - 1)
            sampled.append(seq)
    npf = len(ids)
    meta = AttentionMetadata(slot_mapping=None, prefills=spans, num_prefill_tokens=npf)
    tables, lens = [], []
    if decode:
        lens = [len(s) for s in decode]
        width = max(len(s.block_table) for s in decode)
        tables = [([max(b, 0) for b in s.block_table] if kv.sliding_window else s.block_table)
                  + [0] * (width - len(s.block_table)) for s in decode]
        write_rows.extend(range(npf, npf + len(decode)))
        ids.extend(s.token_ids[-1] for s in decode)
        pos.extend(n - 1 for n in lens)
        slots.extend(kv.slot(s, n - 1) for s, n in zip(decode, lens))
        last_rows.extend(range(npf, npf + len(decode)))
        sampled.extend(decode)
        meta.block_tables = torch.tensor(tables, dtype=torch.int32, device=device)
        meta.seq_lens = torch.tensor(lens, dtype=torch.int32, device=device)
        meta.max_seq_len = max(lens)
    meta.slot_mapping = torch.tensor(slots, dtype=torch.int64, device=device)
    if skipped:
        if varlen:
            raise ValueError("a prefill skipped positions of freed blocks, but the attention reads "
                             "every row's K/V from the cache (schedule with store_whole_prompt)")
        meta.write_rows = torch.tensor(write_rows, dtype=torch.int64, device=device)
    if varlen:
        meta.varlen = varlen_batch(prefill, decode, device)
    return StepBatch(ids, pos, slots, last_rows, sampled, tables, lens, meta)


def varlen_batch(prefill: list[Sequence], decode: list[Sequence], device) -> VarlenBatch:
    """Every sequence of the step in kgen's contract: prefill chunks first, then the decodes (the
    rows' order); freed (out-of-window) table entries become block 0, which is never read."""
    seqs = prefill + decode
    q_lens = [s.num_scheduled_tokens for s in prefill] + [1] * len(decode)
    lens = [s.num_computed_tokens + s.num_scheduled_tokens for s in prefill] + [len(s) for s in decode]
    width = max(len(s.block_table) for s in seqs)
    tables = [[max(b, 0) for b in s.block_table] + [0] * (width - len(s.block_table)) for s in seqs]
    starts = [0]
    for q in q_lens:
        starts.append(starts[-1] + q)
    return VarlenBatch(torch.tensor(starts, dtype=torch.int32, device=device),
                       torch.tensor(lens, dtype=torch.int32, device=device),
                       torch.tensor(tables, dtype=torch.int32, device=device),
                       max_query_len=max(q_lens), max_seq_len=max(lens))
