"""Attention over the paged KV cache: the backends, prefill attention, and one layer's attention.

Every backend reads the same cache: a layer's NHD caches ``[num_blocks, block_size,
num_kv_heads, head_dim]`` (a :class:`runtime.kv_cache.LayerKV`, possibly fp8 with per-layer
scales), with int32 block tables and lengths (:mod:`runtime.attention_meta`).

- ``triton`` (:mod:`runtime.attention_triton`): kgen's any-query-length kernel runs every row
  of a step (prefill chunks, prefix-cache extends, decodes) in one launch per layer, reading all
  keys from the cache in place; kgen plans each kind of layer once and picks the kernel per step
  (the tuning database's record, else a sound default), fp8 caches included. The GPU default.
- ``native`` (:mod:`runtime.decode_native`): a small C kernel, built on first use, that reads
  each live K/V row once in place (the CPU default for float32, bfloat16 and float16 models
  when a C compiler works), for the decode rows.
- ``torch`` (:mod:`runtime.decode_torch`): sequences grouped by context length, one gather of
  each group's live context per layer and one SDPA call per group (any dtype and device), for
  the decode rows.

With ``native`` and ``torch``, prefill rows use :func:`prefill_attention`
(``torch.nn.functional.scaled_dot_product_attention`` per sequence): the new tokens' K/V come
straight from the projections (full precision even with an fp8 cache), a cached prefix is read
back from the cache (dequantized), only as far back as the layer's window reaches.

Per-layer features (:class:`runtime.config.LayerAttention`): ``sliding_window=W`` (the query at
position p sees keys j > p - W, transformers' convention) and ``logits_soft_cap=c`` (scores become
``c * tanh(s / c)`` before the softmax). Block-table entries wholly before a window may have been
freed by the memory manager and hold anything: no backend reads them. The triton backend
refuses, by feature and layer, what kgen's kernels lack.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kgen.dispatch import get_dispatcher
from runtime.attention_meta import AttentionMetadata, PrefillSpan, VarlenBatch
from runtime.attention_triton import TritonAttention, ensure_interpreter_on_cpu, layer_shapes
from runtime.decode_native import NativeDecode
from runtime.decode_torch import TorchDecode
from runtime.kv_cache import LayerKV
from runtime.sdpa import attend

__all__ = ["AttentionMetadata", "PrefillSpan", "VarlenBatch", "prefill_attention", "attend_layer",
           "TorchDecode", "NativeDecode", "TritonAttention", "make_decode_backend",
           "default_block_size", "resolve_backend", "layer_shapes", "ensure_interpreter_on_cpu"]

BACKENDS = ("auto", "torch", "native", "triton")


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


def attend_layer(backend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: LayerKV,
                 meta: AttentionMetadata, la) -> torch.Tensor:
    """One layer's attention for every row of the step (its K/V already written to the cache).

    A whole-batch backend (``triton``) runs all rows in one call; the others run each prefill
    span with :func:`prefill_attention` and the decode rows in one batched ``decode`` call.
    q: [T, num_heads, D]; k, v: [T, num_kv_heads, D] (the rows' own K/V); returns [T, num_heads, D].
    """
    if getattr(backend, "whole_batch", False):
        return backend.attend(q, layer, meta, la)
    opts = dict(sliding_window=la.sliding_window, logits_soft_cap=la.logits_soft_cap)
    npf, num_tokens = meta.num_prefill_tokens, q.shape[0]
    if npf == num_tokens and len(meta.prefills) == 1:
        return prefill_attention(q, k, v, layer, meta.prefills[0], la.scale, **opts)
    if npf == 0:  # a decode-only step: the backend's output is the whole batch's (no copy)
        return backend.decode(q, layer, meta, la.scale, **opts)
    out = torch.empty_like(q)
    for span in meta.prefills:
        s, e = span.start, span.end
        out[s:e] = prefill_attention(q[s:e], k[s:e], v[s:e], layer, span, la.scale, **opts)
    if npf < num_tokens:
        out[npf:] = backend.decode(q[npf:], layer, meta, la.scale, **opts)
    return out


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
            return TritonAttention(block_size, num_kv_heads, num_heads, head_dim, dtype, device,
                                   layers=layers, kv_cache_dtype=kv_cache_dtype)
        if name == "native":
            return NativeDecode(block_size, num_kv_heads, num_heads, head_dim, num_blocks, layers=layers,
                                dtype=dtype, device=device)
    except ValueError:
        if backend != "auto":
            raise
    return TorchDecode(block_size, num_kv_heads, head_dim, dtype, layers=layers)
