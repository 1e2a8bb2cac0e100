"""Per-step memory picture of the engine: blocks with and without sharing, slots really filled.

Pure Python over the memory manager's state, O(sequences) per step, so it can run every step.
"""

from __future__ import annotations

from runtime.kv_layout import NULL_BLOCK


class StepMeter:
    """Accumulates, step by step, what the live sequences hold in the KV pool."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.peak_blocks_no_sharing = 0
        self.steps = 0
        self._logical_sum = self._used_sum = self._stored_sum = self._peak_used = 0
        self.at_peak: dict = {}

    def record(self, kv) -> dict:
        """Measure one step of a :class:`runtime.kv_manager.KVCacheManager` (after scheduling);
        returns this step's ``blocks_in_use``, ``logical_blocks`` and ``tokens_stored``.

        Every block in use is referenced by the block tables holding it (ref count = tables), and
        only a table's last block can be partly filled, unless another table holds it as a full one.
        """
        bs, pool = self.block_size, kv.pool
        logical = 0
        last_fill: dict[int, int] = {}
        last_refs: dict[int, int] = {}
        for seq in kv.tracked_seqs():
            table = seq.block_table
            logical += kv.num_held_blocks(seq)  # out-of-window entries of a sliding window hold none
            if table and table[-1] != NULL_BLOCK:  # a freed (out-of-window) entry holds no slots
                b = table[-1]
                last_fill[b] = max(last_fill.get(b, 0), len(seq) - (len(table) - 1) * bs)
                last_refs[b] = last_refs.get(b, 0) + 1
        used = pool.num_used
        empty = sum(bs - f for b, f in last_fill.items() if pool.ref_count(b) == last_refs[b])
        stored = used * bs - empty
        self.steps += 1
        self.peak_blocks_no_sharing = max(self.peak_blocks_no_sharing, logical)
        self._logical_sum += logical
        self._used_sum += used
        self._stored_sum += stored
        step = {"blocks_in_use": used, "logical_blocks": logical, "tokens_stored": stored}
        if used > self._peak_used:
            self._peak_used = used
            self.at_peak = dict(step, slots_allocated=used * bs, utilization=stored / (used * bs))
        return step

    def summary(self, peak_blocks_in_use: int) -> dict:
        """``peak_blocks_no_sharing``: the most blocks the live block tables added up to (what the
        same sequences would hold without sharing); ``blocks_saved_by_sharing_at_peak``: that minus
        ``peak_blocks_in_use``; ``sharing_saving``: saved fraction over all steps;
        ``mean_utilization``: filled over allocated slots, over all steps; ``at_peak``: the picture
        at the step with the most blocks in use."""
        return {
            "peak_blocks_no_sharing": self.peak_blocks_no_sharing,
            "blocks_saved_by_sharing_at_peak": self.peak_blocks_no_sharing - peak_blocks_in_use,
            "sharing_saving": (1 - self._used_sum / self._logical_sum) if self._logical_sum else 0.0,
            "mean_utilization": (self._stored_sum / (self._used_sum * self.block_size)
                                 if self._used_sum else 0.0),
            "at_peak": dict(self.at_peak),
        }
