"""Paged decode attention in torch: length-sorted groups, one gather and one SDPA call per group.

Works for every dtype and device, with per-layer sliding windows and soft-caps
(:class:`runtime.config.LayerAttention`); the CPU default is the native kernel
(:mod:`runtime.decode_native`) when it can serve the model.

A decode step attends each sequence's query to its live context: positions ``[start, len)``
with ``start = max(0, len - window)`` under a sliding window, else 0. :meth:`TorchDecode.prepare`
sorts the sequences by live-context length and cuts them into groups whose padded gather stays
small (``GROUP_TOKENS`` context rows), so that

- padding is bounded by the sorted neighbours' length difference, not by the longest sequence
  of the whole batch (the mixed workload's lengths spread 16..768), and
- each group's gathered K/V (about 1 KB per token at 2 KV heads x 64 x fp32, per K and V) stays
  in the L2/L3 cache between the gather and SDPA reading it.

The gather reads rows of ``head_dim`` (one per slot and KV head) in ``[seq, kv_head, position]``
order, so K and V come out as ``[b, kvh, S, D]`` and the grouped queries ``[b, kvh, group, D]``
attend in one SDPA call without expanding the KV heads. Padded positions repeat the sequence's
last live position (masked out), so no gather ever touches a table entry outside the live
range: entries a sliding window has freed may hold anything. With an fp8 cache the gather moves
one byte per element, converts to the compute dtype, and the scales are folded in: ``k_scale``
into the softmax scale and ``v_scale`` into the output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from runtime.config import layer_windows
from runtime.sdpa import attend, attend_padded

GROUP_TOKENS = 4096
"""Most ``sequences x padded length`` rows one group gathers: 2k-8k were alike on the 2-core EPYC;
one group for the whole 64-sequence mixed batch (the old path) is 2.1x slower on one thread
(``bench/results/cpu_kernels.md``)."""


@dataclass
class _Group:
    rows: torch.Tensor | None      # int64 [b]: which decode rows; None = all rows in order
    gather: torch.Tensor           # int64 [b * kvh * S]: cache rows of head_dim values
    bias: torch.Tensor | None      # [b, 1, 1, S] bool, True where live; None when no padding
    size: int
    length: int


def plan_groups(counts: list[int], budget: int = GROUP_TOKENS) -> list[tuple[int, int]]:
    """Cut sequences sorted by descending live length ``counts`` into ``[i, j)`` groups whose
    ``(j - i) * counts[i]`` stays within ``budget`` (a group holds at least one sequence)."""
    groups, i = [], 0
    while i < len(counts):
        j = i + 1
        while j < len(counts) and (j + 1 - i) * counts[i] <= budget:
            j += 1
        groups.append((i, j))
        i = j
    return groups


class TorchDecode:
    """Vectorized paged decode in torch (see the module docstring).

    Parameters
    ----------
    block_size, num_kv_heads, head_dim : int
    dtype : torch.dtype
        The compute dtype (queries, outputs, the additive mask).
    layers : sequence of LayerAttention
        Each layer's settings; one gather plan is built per distinct window.
    group_tokens : int
        The groups' gather budget (:data:`GROUP_TOKENS`).
    """

    name = "torch"

    def __init__(self, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, layers=(), group_tokens: int = GROUP_TOKENS) -> None:
        self.block_size, self.num_kv_heads, self.head_dim = block_size, num_kv_heads, head_dim
        self.dtype = dtype
        self.group_tokens = group_tokens
        self.windows = layer_windows(layers)

    def prepare(self, meta) -> None:
        """Build the groups' gather indices and masks once per step, per window the layers use."""
        for window in self.windows:
            meta.extra[("torch_decode", window)] = self._plan(meta.block_tables, meta.seq_lens, window)

    def _plan(self, tables: torch.Tensor, seq_lens: torch.Tensor, window: int | None) -> list[_Group]:
        bs, kvh = self.block_size, self.num_kv_heads
        dev = tables.device
        lens = seq_lens.long()
        starts = (lens - window).clamp_(min=0) if window is not None else torch.zeros_like(lens)
        counts = lens - starts
        order = torch.argsort(counts, descending=True, stable=True)
        sorted_counts = counts[order].tolist()
        heads = torch.arange(kvh, device=dev)[None, :, None]
        groups = []
        for i, j in plan_groups(sorted_counts, self.group_tokens):
            length = sorted_counts[i]
            rows = order[i:j]
            cnt, start = counts[rows], starts[rows]
            offs = torch.arange(length, device=dev)[None, :]
            pos = start[:, None] + torch.minimum(offs, cnt[:, None] - 1)            # [b, S], live only
            blocks = tables.index_select(0, rows).long().gather(1, pos // bs)
            gather = ((blocks * bs + pos % bs)[:, None, :] * kvh + heads).reshape(-1)
            bias = None
            if int(cnt.min()) < length:  # [b, 1, 1, S]: True where a position is live
                bias = (offs < cnt[:, None])[:, None, None, :]
            whole = i == 0 and j == len(sorted_counts) and bool((order == torch.arange(j, device=dev)).all())
            groups.append(_Group(None if whole else rows, gather, bias, j - i, length))
        return groups

    def decode(self, q: torch.Tensor, layer, meta, scale: float, *, sliding_window: int | None = None,
               logits_soft_cap: float | None = None) -> torch.Tensor:
        """q: [B, num_heads, head_dim] -> [B, num_heads, head_dim]; ``layer`` a ``LayerKV``."""
        b_all, heads, d = q.shape
        kvh = self.num_kv_heads
        key = ("torch_decode", sliding_window)
        if key not in meta.extra:  # a window no layer announced: plan it now
            meta.extra[key] = self._plan(meta.block_tables, meta.seq_lens, sliding_window)
        groups = meta.extra[key]
        key = layer.key.view(-1, d)
        value = layer.value.view(-1, d)
        out = None if len(groups) == 1 and groups[0].rows is None else torch.empty_like(q)
        for g in groups:
            k = key.index_select(0, g.gather).view(g.size, kvh, g.length, d)       # [b, kvh, S, D]
            v = value.index_select(0, g.gather).view(g.size, kvh, g.length, d)
            if layer.quantized:
                k, v = k.to(q.dtype), v.to(q.dtype)
            qg = q if g.rows is None else q.index_select(0, g.rows)
            qg = qg.reshape(g.size, kvh, heads // kvh, d)                           # [b, kvh, g, D]
            if g.bias is None:
                o = attend(qg, k, v, None, scale * layer.k_scale, logits_soft_cap)
            else:  # padded rows: SDPA's answer for an unpadded row, also for NaN scores
                o = attend_padded(qg, k, v, g.bias, scale * layer.k_scale, logits_soft_cap)
            o = o.reshape(g.size, heads, d)
            if layer.v_scale != 1.0:
                o = o * layer.v_scale
            if out is None:
                return o
            out.index_copy_(0, g.rows, o)
        return out
