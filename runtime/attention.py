"""Attention over the paged KV cache: batch metadata, prefill attention and the decode backends.

Every backend reads the same inputs: a layer's NHD caches ``[num_blocks, block_size,
num_kv_heads, head_dim]`` (a :class:`runtime.kv_cache.LayerKV`, possibly fp8 with per-layer
scales), int32 block tables ``[num_seqs, max_blocks]`` and int32 ``seq_lens``.

- ``native`` (:mod:`runtime.decode_native`): a small C kernel, built on first use, that reads
  each live K/V row once in place (the CPU default for float32, bfloat16 and float16 models
  when a C compiler works).
- ``torch`` (:mod:`runtime.decode_torch`): sequences grouped by context length, one gather of
  each group's live context per layer and one SDPA call per group (any dtype and device).
- ``triton``: kgen's paged decode kernel, chosen per decode step through ``kgen.dispatch`` (the
  tuning database when it has a record, a sound default otherwise), fp8 caches included. On a
  CPU device it runs under the Triton interpreter (``TRITON_INTERPRET=1`` is set if it was not,
  with a warning).

Prefill attention (causal, over the tokens of one sequence) uses
``torch.nn.functional.scaled_dot_product_attention`` for every backend: the new tokens' K/V come
straight from the projections (full precision even with an fp8 cache), a cached prefix is read
back from the cache (dequantized), only as far back as the layer's window reaches.

Per-layer features (:class:`runtime.config.LayerAttention`) arrive as keyword arguments of
``prefill_attention`` and ``decode``: ``sliding_window=W`` (the query at position p sees keys
j > p - W, transformers' convention) and ``logits_soft_cap=c`` (scores become ``c * tanh(s / c)``
before the softmax). Block-table entries wholly before a window may have been freed by the memory
manager and hold anything: no backend reads them. The triton backend refuses, by feature and
layer, what kgen's kernels lack.
"""

from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from kgen.dispatch import get_dispatcher
from kgen.shape import AttentionShape
from runtime.config import kernel_features
from runtime.decode_native import NativeDecode
from runtime.decode_torch import TorchDecode
from runtime.kv_cache import LayerKV
from runtime.sdpa import attend

__all__ = ["AttentionMetadata", "PrefillSpan", "prefill_attention", "TorchDecode", "NativeDecode",
           "TritonDecode", "make_decode_backend", "default_block_size", "resolve_backend",
           "layer_shapes"]

BACKENDS = ("auto", "torch", "native", "triton")


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
class AttentionMetadata:
    """Everything attention needs for one engine step (built once, used by every layer).

    Rows ``[0, num_prefill_tokens)`` of the batch are prefill tokens (see ``prefills``); the rows
    after them are one token per decode sequence. ``slot_mapping`` holds the cache slot of every
    row whose K/V is written: all rows when ``write_rows`` is None, else the rows ``write_rows``
    (a sliding-window prefill does not store the positions its window has already left).
    """

    slot_mapping: torch.Tensor                 # int64 [num_written]: cache slot of each written row
    prefills: list[PrefillSpan]
    num_prefill_tokens: int
    block_tables: torch.Tensor | None = None   # int32 [num_decode, max_blocks]
    seq_lens: torch.Tensor | None = None       # int32 [num_decode]
    max_seq_len: int = 0
    write_rows: torch.Tensor | None = None     # int64 [num_written], or None: every row
    extra: dict = field(default_factory=dict)  # backend-prepared tensors (gather index, mask, kernel)

    @property
    def num_decodes(self) -> int:
        return 0 if self.seq_lens is None else int(self.seq_lens.shape[0])


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: LayerKV, span: PrefillSpan,
                      scale: float, *, sliding_window: int | None = None,
                      logits_soft_cap: float | None = None) -> torch.Tensor:
    """Causal attention of one sequence's new tokens over its context (or its window).

    q: [n, num_heads, head_dim]; k, v: [n, num_kv_heads, head_dim] (the new tokens' own K/V).
    Returns [n, num_heads, head_dim].
    """
    n, heads, head_dim = q.shape
    group = heads // k.shape[1]
    first = span.num_cached  # context position of the first key attended to
    if span.num_cached:  # the cached prefix lives only in the cache: read back what the window sees
        first = span.read_start
        if sliding_window is not None:
            first = max(first, span.num_cached - sliding_window + 1)
        slots = span.cached_slots[first - span.read_start:]
        k = torch.cat([layer.read(layer.key, slots, layer.k_scale), k])
        v = torch.cat([layer.read(layer.value, slots, layer.v_scale), v])
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    # [1, heads, tokens, head_dim]
    qh, kh, vh = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    if not span.num_cached and (sliding_window is None or n <= sliding_window) and logits_soft_cap is None:
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale)
    else:
        qpos = torch.arange(span.num_cached, span.ctx_len, device=q.device)[:, None]
        kpos = torch.arange(first, span.ctx_len, device=q.device)[None, :]
        mask = kpos <= qpos                                                   # [n, ctx]
        if sliding_window is not None:
            mask &= kpos > qpos - sliding_window
        out = attend(qh, kh, vh, mask, scale, logits_soft_cap)
    return out.squeeze(0).transpose(0, 1)


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


def layer_shapes(layers, *, num_heads: int, num_kv_heads: int, head_dim: int, dtype,
                 kv_cache_dtype: str = "auto", block_size: int | None = None) -> dict:
    """The kgen :class:`~kgen.shape.AttentionShape` of each kind of layer: features -> shape.

    ``layers`` holds one :class:`runtime.config.LayerAttention` per layer (none: one plain kind).
    """
    kinds = sorted({la.features for la in layers} | ({()} if not layers else set()))
    return {features: AttentionShape.from_heads(dtype=dtype, head_dim=head_dim, num_heads=num_heads,
                                                num_kv_heads=num_kv_heads, kv_dtype=kv_cache_dtype,
                                                features=features, block_size=block_size)
            for features in kinds}


class TritonDecode:
    """kgen's paged decode kernel: one kgen plan per kind of layer, made here once, asked for the
    kernel of each step.

    ``layers`` (one :class:`runtime.config.LayerAttention` per layer) says which attention
    features each layer needs and ``kv_cache_dtype`` the cache's format (``auto`` or fp8); what
    kgen's kernels lack (the plan's ``problem``) is refused here, naming the layer. :meth:`prepare`
    asks each plan for the step's kernel and :meth:`decode` passes the layer's ``sliding_window``
    / ``logits_soft_cap`` to it.
    """

    name = "triton"

    def __init__(self, block_size: int, num_kv_heads: int, num_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, dispatcher=None, layers=(),
                 kv_cache_dtype: str = "auto") -> None:
        ensure_interpreter_on_cpu(device)
        dispatcher = dispatcher or get_dispatcher()
        shapes = layer_shapes(layers, num_heads=num_heads, num_kv_heads=num_kv_heads,
                              head_dim=head_dim, dtype=dtype, kv_cache_dtype=kv_cache_dtype,
                              block_size=block_size)
        self.plans = {features: dispatcher.plan(shape) for features, shape in shapes.items()}
        for features, plan in self.plans.items():
            if plan.problem is None:
                continue
            which = [i for i, la in enumerate(layers) if la.features == features]
            if features and which:
                la = layers[which[0]]
                raise ValueError(f"backend='triton' cannot decode layer {which[0]} (sliding_window="
                                 f"{la.sliding_window}, logits_soft_cap={la.logits_soft_cap}): "
                                 f"{plan.problem}; use backend='torch'")
            raise ValueError(f"backend='triton': {plan.problem} (use backend='torch')")

    def prepare(self, meta: AttentionMetadata) -> None:
        for features, plan in self.plans.items():
            meta.extra[("kernel", features)] = plan.decode_kernel(meta.num_decodes, meta.max_seq_len)

    def decode(self, q, layer: LayerKV, meta: AttentionMetadata, scale: float, *,
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
        if layer.quantized:  # kgen's fp8 variants dequantize with the layer's scales
            extra.update(k_scale=layer.k_scale, v_scale=layer.v_scale)
        return kernel(q.contiguous(), layer.key, layer.value, meta.block_tables, meta.seq_lens,
                      scale=scale, max_seq_len=meta.max_seq_len, **extra)


def resolve_backend(backend: str, device: torch.device) -> str:
    """``auto`` -> ``triton`` on CUDA, ``native`` on the CPU (before feature checks); validates the name."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not supported; use one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "native"
    return backend


def default_block_size(backend: str, *, config, dtype: torch.dtype, device: torch.device,
                       kv_cache_dtype: str = "auto", fallback: int = 16) -> int:
    """The KV block size to use when the caller gives none.

    When kgen's kernels decode (the ``triton`` backend), the block size of kgen's plan for the
    model's most common kind of layer (the tuning database's fastest for this GPU, dtype, head
    dim, KV dtype and features, else 16); otherwise ``fallback``, the paper's and vLLM's default.
    """
    if resolve_backend(backend, device) != "triton":
        return fallback
    layers = [config.layer_attention(i) for i in range(config.num_hidden_layers)]
    shapes = layer_shapes(layers, num_heads=config.num_attention_heads,
                          num_kv_heads=config.num_key_value_heads, head_dim=config.head_dim,
                          dtype=dtype, kv_cache_dtype=kv_cache_dtype)
    counts = {features: sum(la.features == features for la in layers) for features in shapes}
    most = max(shapes, key=lambda features: (counts[features], -len(features)))
    return get_dispatcher().plan(shapes[most]).block_size


def make_decode_backend(backend: str, *, block_size: int, num_heads: int, num_kv_heads: int,
                        head_dim: int, dtype: torch.dtype, device: torch.device, layers=(),
                        kv_cache_dtype: str = "auto", num_blocks: int = 0):
    """The decode backend object for a backend name.

    ``layers``: one :class:`runtime.config.LayerAttention` per layer (window, soft-cap, scale).
    ``auto`` falls back to ``torch`` where kgen's kernels (CUDA) or the native kernel (CPU) cannot
    serve the model.
    """
    name = resolve_backend(backend, device)
    try:  # each backend refuses what it cannot serve with a ValueError naming it
        if name == "triton":
            return TritonDecode(block_size, num_kv_heads, num_heads, head_dim, dtype, device, layers=layers,
                                kv_cache_dtype=kv_cache_dtype)
        if name == "native":
            return NativeDecode(block_size, num_kv_heads, num_heads, head_dim, num_blocks, layers=layers,
                                dtype=dtype, device=device)
    except ValueError:
        if backend != "auto":
            raise
    return TorchDecode(block_size, num_kv_heads, head_dim, dtype, layers=layers)
