"""One engine step's batch: token ids, positions, cache slots and attention metadata, built once.

Rows are the prefill tokens of the newly admitted sequences (each over ``token_ids[
num_cached_tokens:]``), then one token per decoding sequence (its last). Slots come from the
memory manager (:mod:`runtime.kv_layout`'s formula, never written out here). A sliding window's
prefill may have no block for positions its window has already left: those rows are computed
but not stored (``AttentionMetadata.write_rows``). Freed (out-of-window) table entries and the
padding of the decode block tables become block 0, a valid id no backend reads there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from runtime.attention import AttentionMetadata, PrefillSpan
from runtime.kv_layout import NULL_BLOCK, window_start
from runtime.sequence import Sequence


@dataclass
class StepBatch:
    """Host lists of one step plus the metadata (decode tables and lengths set, not yet prepared)."""

    ids: list[int]
    positions: list[int]
    slots: list[int]              # cache slot of each written row
    last_rows: list[int]          # the rows whose logits are sampled, one per sequence
    tables: list[list[int]]       # decode block tables, padded to one width
    lens: list[int]               # decode sequence lengths
    meta: AttentionMetadata


def build_batch(kv, prefill: list[Sequence], decode: list[Sequence], device) -> StepBatch:
    """The batch of one step over sequences the :class:`runtime.kv_manager.KVCacheManager` ``kv``
    has allocated (``prefill``) or appended a slot to (``decode``)."""
    bs = kv.block_size
    ids, pos, slots, write_rows, last_rows = [], [], [], [], []
    spans: list[PrefillSpan] = []
    skipped = False
    for seq in prefill:
        start, n = seq.num_cached_tokens, len(seq)
        first = start  # a sliding window's prefill stores only the positions in blocks it kept
        while seq.block_table[first // bs] == NULL_BLOCK:
            first = (first // bs + 1) * bs
        skipped |= first > start
        write_rows.extend(range(len(ids) + first - start, len(ids) + n - start))
        slots.extend(kv.slots(seq, first, n))
        ids.extend(seq.token_ids[start:])
        pos.extend(range(start, n))
        span = PrefillSpan(len(ids) - (n - start), len(ids), start, n)
        if start:
            span.read_start = window_start(start, kv.sliding_window)
            span.cached_slots = torch.tensor(kv.slots(seq, span.read_start, start), dtype=torch.int64,
                                             device=device)
        spans.append(span)
        last_rows.append(len(ids) - 1)
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
        meta.block_tables = torch.tensor(tables, dtype=torch.int32, device=device)
        meta.seq_lens = torch.tensor(lens, dtype=torch.int32, device=device)
        meta.max_seq_len = max(lens)
    meta.slot_mapping = torch.tensor(slots, dtype=torch.int64, device=device)
    if skipped:
        meta.write_rows = torch.tensor(write_rows, dtype=torch.int64, device=device)
    return StepBatch(ids, pos, slots, last_rows, tables, lens, meta)
