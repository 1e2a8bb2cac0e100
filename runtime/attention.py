"""Attention over the paged KV cache: batch metadata, prefill attention and the decode backends.

Both backends read the same inputs: an NHD cache per layer ``[num_blocks, block_size,
num_kv_heads, head_dim]``, int32 block tables ``[num_seqs, max_blocks]`` and int32 ``seq_lens``.

- ``torch``: one batched gather of every decode sequence's context per layer, then one SDPA
  call with a padding mask (the CPU default).
- ``triton``: kgen's paged decode kernel, chosen per decode step through ``kgen.dispatch`` (the
  tuning database when it has a record, a sound default otherwise). On a CPU device it runs under
  the Triton interpreter (``TRITON_INTERPRET=1`` is set if it was not, with a warning).

Prefill attention (causal, over the tokens of one sequence, after its cached prefix) uses
``torch.nn.functional.scaled_dot_product_attention`` for both backends.

Per-layer features (:class:`runtime.config.LayerAttention`) arrive as keyword arguments of
``prefill_attention`` and ``decode``: ``sliding_window=W`` (the query at position p sees keys
j > p - W, transformers' convention) and ``logits_soft_cap=c`` (scores become ``c * tanh(s / c)``
before the softmax; computed without SDPA, whose kernels cannot cap). The torch paths implement
both; the triton backend refuses, by feature and layer, what kgen's kernels lack.
"""

from __future__ import annotations

import inspect
import os
import sys
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from kgen.dispatch import get_dispatcher, normalize_dtype
from runtime.config import kernel_features

BACKENDS = ("auto", "torch", "triton")


@dataclass
class PrefillSpan:
    """One sequence's prefill tokens inside the flat token batch.

    ``start:end`` are rows of the batch; the tokens are positions ``num_cached:ctx_len`` of the
    sequence. ``ctx_slots`` (int64 ``[ctx_len]``) are the cache slots of all its positions, needed
    only when a cached prefix must be read back from the cache (``num_cached > 0``).
    """

    start: int
    end: int
    num_cached: int
    ctx_len: int
    ctx_slots: torch.Tensor | None = None


@dataclass
class AttentionMetadata:
    """Everything attention needs for one engine step (built once, used by every layer).

    Rows ``[0, num_prefill_tokens)`` of the batch are prefill tokens (see ``prefills``); the rows
    after them are one token per decode sequence.
    """

    slot_mapping: torch.Tensor                 # int64 [num_tokens]: cache slot of each token's K/V
    prefills: list[PrefillSpan]
    num_prefill_tokens: int
    block_tables: torch.Tensor | None = None   # int32 [num_decode, max_blocks]
    seq_lens: torch.Tensor | None = None       # int32 [num_decode]
    max_seq_len: int = 0
    extra: dict = field(default_factory=dict)  # backend-prepared tensors (gather index, mask, kernel)

    @property
    def num_decodes(self) -> int:
        return 0 if self.seq_lens is None else int(self.seq_lens.shape[0])


def write_kv(key_cache: torch.Tensor, value_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Scatter new K/V rows into their slots. k, v: [num_tokens, num_kv_heads, head_dim]."""
    kv_heads, head_dim = k.shape[1], k.shape[2]
    key_cache.view(-1, kv_heads, head_dim).index_copy_(0, slot_mapping, k)
    value_cache.view(-1, kv_heads, head_dim).index_copy_(0, slot_mapping, v)


def soft_cap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """``cap * tanh(x / cap)`` in x's dtype (Gemma 2's attention scores and final logits)."""
    return torch.tanh(x / cap) * cap


def _attend(q, k, v, mask, scale: float, cap: float | None):
    """SDPA, or (with a soft-cap) the same math spelled out: scores in q's dtype, softmax in fp32.

    q: [..., n, D]; k, v: [..., S, D]; mask: bool (True = visible) or additive float, broadcastable
    to [..., n, S], or None. Returns [..., n, D].
    """
    if cap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    scores = soft_cap(torch.matmul(q, k.transpose(-1, -2)) * scale, cap)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_cache: torch.Tensor,
                      value_cache: torch.Tensor, span: PrefillSpan, scale: float, *,
                      sliding_window: int | None = None, logits_soft_cap: float | None = None) -> torch.Tensor:
    """Causal attention of one sequence's new tokens over its whole context (or its window).

    q: [n, num_heads, head_dim]; k, v: [n, num_kv_heads, head_dim] (the new tokens' K/V, already
    written to the cache). Returns [n, num_heads, head_dim].
    """
    n, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    first = 0  # context position of the first key attended to
    if span.num_cached:
        # the cached prefix lives only in the cache: read the context back by slot (from the
        # first position any new token's window reaches)
        if sliding_window is not None:
            first = max(0, span.num_cached - sliding_window + 1)
        slots = span.ctx_slots[first:]
        k = key_cache.view(-1, kv_heads, head_dim).index_select(0, slots)
        v = value_cache.view(-1, kv_heads, head_dim).index_select(0, slots)
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    # [1, heads, tokens, head_dim]
    qh, kh, vh = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    if not span.num_cached and sliding_window is None and logits_soft_cap is None:
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale)
    else:
        qpos = torch.arange(span.num_cached, span.num_cached + n, device=q.device)[:, None]
        kpos = torch.arange(first, first + k.shape[0], device=q.device)[None, :]
        mask = kpos <= qpos                                                   # [n, ctx]
        if sliding_window is not None:
            mask &= kpos > qpos - sliding_window
        out = _attend(qh, kh, vh, mask, scale, logits_soft_cap)
    return out.squeeze(0).transpose(0, 1)


class TorchDecode:
    """Vectorized paged decode in torch: one gather per layer for all decode sequences.

    The gather reads the cache as rows of ``head_dim`` (one per slot and KV head) in
    ``[seq, kv_head, position]`` order, so K and V come out contiguous as ``[B, kvh, S, D]`` and
    the grouped queries ``[B, kvh, group, D]`` attend to them in one SDPA call without expanding
    the KV heads. A windowed layer gathers only each sequence's last ``W`` positions (``S = W``),
    so blocks before the window are never read.
    """

    name = "torch"

    def __init__(self, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, layers=()) -> None:
        self.block_size, self.num_kv_heads, self.head_dim = block_size, num_kv_heads, head_dim
        self.dtype = dtype
        self.windows = sorted({la.sliding_window for la in layers} or {None}, key=lambda w: w or 0)

    def prepare(self, meta: AttentionMetadata) -> None:
        """Build the gather index and the padding mask of each window once per step."""
        for window in self.windows:
            self._plan(meta, window)

    def _plan(self, meta: AttentionMetadata, window: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(gather rows int64 ``[B * kvh * S]``, additive mask ``[B, 1, 1, S]``) for one window."""
        key = ("plan", window)
        if key not in meta.extra:
            bt = meta.block_tables.long()                                   # [B, max_blocks]
            bs, kvh = self.block_size, self.num_kv_heads
            lens = meta.seq_lens.long()
            span = meta.max_seq_len if window is None else min(window, meta.max_seq_len)
            start = (lens - span).clamp(min=0)                              # first position read
            pos = start[:, None] + torch.arange(span, device=bt.device)     # [B, S]
            slots = bt.gather(1, pos // bs) * bs + pos % bs
            heads = torch.arange(kvh, device=bt.device)
            rows = slots[:, None, :] * kvh + heads[None, :, None]             # [B, kvh, S]
            pad = pos >= lens[:, None]                                        # [B, S]
            bias = torch.zeros(pad.shape, dtype=self.dtype, device=bt.device).masked_fill_(pad, float("-inf"))
            meta.extra[key] = (rows.reshape(-1), bias[:, None, None, :])
        return meta.extra[key]

    def decode(self, q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
               meta: AttentionMetadata, scale: float, *, sliding_window: int | None = None,
               logits_soft_cap: float | None = None) -> torch.Tensor:
        """q: [B, num_heads, head_dim] -> [B, num_heads, head_dim]."""
        b, heads, d = q.shape
        idx, bias = self._plan(meta, sliding_window)
        kvh, s = self.num_kv_heads, bias.shape[-1]
        k = key_cache.view(-1, d).index_select(0, idx).view(b, kvh, s, d)     # [B, kvh, S, D]
        v = value_cache.view(-1, d).index_select(0, idx).view(b, kvh, s, d)
        qg = q.reshape(b, kvh, heads // kvh, d)                                # [B, kvh, g, D]
        return _attend(qg, k, v, bias, scale, logits_soft_cap).reshape(b, heads, d)


_WARNED_INTERPRET = False


def ensure_interpreter_on_cpu(device: torch.device) -> None:
    """Set TRITON_INTERPRET=1 (once, with a warning) when Triton must run on a CPU device."""
    global _WARNED_INTERPRET
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        if "triton" in sys.modules:
            # triton.language's own jit helpers were built in compiled mode at import: too late
            raise RuntimeError("backend='triton' on a CPU device needs TRITON_INTERPRET=1, but triton was "
                               "imported before it could be set; set TRITON_INTERPRET=1 in the environment "
                               "before importing triton (or anything that imports it, e.g. transformers models)")
        os.environ["TRITON_INTERPRET"] = "1"
        if not _WARNED_INTERPRET:
            _WARNED_INTERPRET = True
            warnings.warn("backend='triton' on a CPU device: setting TRITON_INTERPRET=1, kernels run "
                          "under the (slow) Triton interpreter", RuntimeWarning, stacklevel=3)


class TritonDecode:
    """kgen's paged decode kernel, looked up through ``kgen.dispatch`` once per step.

    ``layers`` (one :class:`runtime.config.LayerAttention` per layer) says which attention
    features each layer needs; a feature kgen's kernels lack is refused here, naming the feature
    and the layer. Each distinct feature set gets its kernel in :meth:`prepare`, and
    :meth:`decode` passes the layer's ``sliding_window`` / ``logits_soft_cap`` to it.
    """

    name = "triton"

    def __init__(self, block_size: int, num_kv_heads: int, num_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, dispatcher=None, layers=()) -> None:
        ensure_interpreter_on_cpu(device)
        self.dispatcher = dispatcher or get_dispatcher()
        self.block_size, self.head_dim = block_size, head_dim
        self.group_size = num_heads // num_kv_heads
        self.dtype = normalize_dtype(dtype)
        problem = self.dispatcher.why_unsupported(dtype=self.dtype, head_dim=head_dim,
                                                  block_size=block_size, group_size=self.group_size)
        if problem:
            raise ValueError(f"backend='triton': {problem} (use backend='torch')")
        for i, la in enumerate(layers):
            why = self._lacks(la.features)
            if why:
                raise ValueError(f"backend='triton' cannot decode layer {i} (sliding_window="
                                 f"{la.sliding_window}, logits_soft_cap={la.logits_soft_cap}): {why}; "
                                 f"use backend='torch'")
        self.feature_sets = sorted({la.features for la in layers} | ({()} if not layers else set()))

    def _lacks(self, features: tuple[str, ...]) -> str | None:
        """Why kgen's kernels cannot run ``features`` for this model (None: they can)."""
        if not features:
            return None
        if "features" not in inspect.signature(self.dispatcher.why_unsupported).parameters:
            return f"kgen's decode kernels lack the {features[0]!r} feature"  # kgen before issue 9
        return self.dispatcher.why_unsupported(dtype=self.dtype, head_dim=self.head_dim,
                                               block_size=self.block_size, group_size=self.group_size,
                                               features=features)

    def prepare(self, meta: AttentionMetadata) -> None:
        for features in self.feature_sets:
            extra = {"features": features} if features else {}
            meta.extra[("kernel", features)] = self.dispatcher.kernel_for(
                dtype=self.dtype, head_dim=self.head_dim, block_size=self.block_size,
                group_size=self.group_size, num_seqs=meta.num_decodes, max_context=meta.max_seq_len,
                **extra)

    def decode(self, q, key_cache, value_cache, meta: AttentionMetadata, scale: float, *,
               sliding_window: int | None = None, logits_soft_cap: float | None = None) -> torch.Tensor:
        features = kernel_features(sliding_window, logits_soft_cap)
        kernel = meta.extra.get(("kernel", features))
        if kernel is None:
            raise ValueError(f"the triton backend was not prepared for features {features!r} "
                             f"(sliding_window={sliding_window}, logits_soft_cap={logits_soft_cap})")
        extra = {"fixed_grid": True} if meta.extra.get("fixed_grid") else {}  # CUDA-graph steps
        if sliding_window is not None:
            extra["sliding_window"] = sliding_window
        if logits_soft_cap is not None:
            extra["logits_soft_cap"] = logits_soft_cap
        return kernel(q.contiguous(), key_cache, value_cache, meta.block_tables, meta.seq_lens,
                      scale=scale, max_seq_len=meta.max_seq_len, **extra)


def resolve_backend(backend: str, device: torch.device) -> str:
    """``auto`` -> ``triton`` on CUDA, ``torch`` on the CPU; validates the name."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not supported; use one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return backend


def default_block_size(backend: str, *, head_dim: int, dtype: torch.dtype, device: torch.device,
                       fallback: int = 16) -> int:
    """The KV block size to use when the caller gives none.

    When kgen's kernels decode (the ``triton`` backend), the block size the tuning database
    recorded as fastest for this GPU, dtype and head dim; otherwise (or if none is recorded)
    ``fallback``, the paper's and vLLM's default of 16.
    """
    if resolve_backend(backend, device) != "triton":
        return fallback
    return get_dispatcher().preferred_block_size(dtype=dtype, head_dim=head_dim) or fallback


def make_decode_backend(backend: str, *, block_size: int, num_heads: int, num_kv_heads: int,
                        head_dim: int, dtype: torch.dtype, device: torch.device, layers=()):
    """The decode backend object for a resolved backend name.

    ``layers``: one :class:`runtime.config.LayerAttention` per layer (window, soft-cap, scale).
    ``auto`` falls back to ``torch`` where kgen's kernels cannot serve the model.
    """
    name = resolve_backend(backend, device)
    if backend == "auto" and name == "triton" and get_dispatcher().why_unsupported(
            dtype=dtype, head_dim=head_dim, block_size=block_size,
            group_size=num_heads // num_kv_heads):
        name = "torch"
    if name == "triton":
        try:
            return TritonDecode(block_size, num_kv_heads, num_heads, head_dim, dtype, device, layers=layers)
        except ValueError:
            if backend != "auto":
                raise
    return TorchDecode(block_size, num_kv_heads, head_dim, dtype, layers=layers)

