"""One engine step's attention inputs, built once per step and read by every layer.

Two views of the same rows: per-sequence :class:`PrefillSpan`s plus decode block tables and
lengths (what the CPU backends read: a prefill by SDPA, the decodes batched), and, for kgen's
kernels, one :class:`VarlenBatch` of every sequence of the step in the any-query-length contract
(``query_start_loc`` over the step's rows, prefill chunks first, then one row per decode).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class PrefillSpan:
    """One sequence's prefill tokens inside the flat token batch.

    ``start:end`` are rows of the batch; the tokens are positions ``num_cached:ctx_len`` of the
    sequence. When ``num_cached > 0`` the prefix is read back from the cache: positions
    ``read_start:num_cached`` (all of it, or the part a sliding window still sees) at the int64
    slots ``cached_slots``.
    """

    start: int
    end: int
    num_cached: int
    ctx_len: int
    cached_slots: torch.Tensor | None = None
    read_start: int = 0


@dataclass
class VarlenBatch:
    """Every sequence of a step as kgen's ``paged_attention`` contract reads it.

    Sequence i owns rows ``query_start_loc[i] .. query_start_loc[i + 1] - 1`` of the step (its
    prefill chunk, or its one decode token), which sit at its last positions: ``seq_lens[i]``
    counts its keys including those rows, all of them in the cache when attention runs.
    """

    query_start_loc: torch.Tensor  # int32 [num_seqs + 1]
    seq_lens: torch.Tensor         # int32 [num_seqs]
    block_tables: torch.Tensor     # int32 [num_seqs, max_blocks] (freed entries: block 0, never read)
    max_query_len: int             # the most rows of one sequence (a bound: kernels plan with it)
    max_seq_len: int               # the longest seq_lens entry (a bound as well)

    @property
    def num_seqs(self) -> int:
        return int(self.seq_lens.shape[0])


@dataclass
class AttentionMetadata:
    """Everything attention needs for one engine step (built once, used by every layer).

    Rows ``[0, num_prefill_tokens)`` of the batch are prefill tokens (see ``prefills``); the rows
    after them are one token per decode sequence. ``slot_mapping`` holds the cache slot of every
    row whose K/V is written: all rows when ``write_rows`` is None, else the rows ``write_rows``
    (a sliding-window prefill does not store the positions its window has already left).
    ``varlen`` is set when the step's backend reads the whole batch from the cache (kgen's).
    """

    slot_mapping: torch.Tensor                 # int64 [num_written]: cache slot of each written row
    prefills: list[PrefillSpan]
    num_prefill_tokens: int
    block_tables: torch.Tensor | None = None   # int32 [num_decode, max_blocks]
    seq_lens: torch.Tensor | None = None       # int32 [num_decode]
    max_seq_len: int = 0
    write_rows: torch.Tensor | None = None     # int64 [num_written], or None: every row
    varlen: VarlenBatch | None = None          # every sequence, for whole-batch backends
    extra: dict = field(default_factory=dict)  # backend-prepared tensors (gather index, mask, kernel)

    @property
    def num_decodes(self) -> int:
        return 0 if self.seq_lens is None else int(self.seq_lens.shape[0])
