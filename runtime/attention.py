"""Attention over the paged KV cache: batch metadata, prefill attention and the decode backends.

Both backends read the same inputs: a layer's NHD caches ``[num_blocks, block_size,
num_kv_heads, head_dim]`` (a :class:`runtime.kv_cache.LayerKV`, possibly fp8 with per-layer
scales), int32 block tables ``[num_seqs, max_blocks]`` and int32 ``seq_lens``.

- ``native`` (:mod:`runtime.decode_native`): a small C kernel, built on first use, that reads
  each live K/V row once in place (the CPU default for float32 models when a C compiler works).
- ``torch`` (:mod:`runtime.decode_torch`): sequences grouped by context length, one gather of
  each group's live context per layer and one SDPA call per group (any dtype and device).
- ``triton``: kgen's paged decode kernel, chosen per decode step through ``kgen.dispatch`` (the
  tuning database when it has a record, a sound default otherwise). On a CPU device it runs under
  the Triton interpreter (``TRITON_INTERPRET=1`` is set if it was not, with a warning).

Prefill attention (causal, over the tokens of one sequence, after its cached prefix) uses
``torch.nn.functional.scaled_dot_product_attention`` for both backends: the new tokens' K/V come
straight from the projections (full precision even with an fp8 cache), the cached prefix is read
back from the cache (dequantized).

Sliding window ``W`` (Mistral's rule): the query at position ``p`` sees keys ``p - W < j <= p``.
Block-table entries wholly below that range may have been freed by the memory manager and hold
anything: no backend may read them.
"""

from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from runtime.decode_native import NativeDecode, native_lacks
from runtime.decode_torch import TorchDecode
from runtime.kv_cache import LayerKV

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
    windows: tuple = (None,)                   # the sliding windows the model's layers use (None: full)
    extra: dict = field(default_factory=dict)  # backend-prepared tensors (gather index, mask, kernel)

    @property
    def num_decodes(self) -> int:
        return 0 if self.seq_lens is None else int(self.seq_lens.shape[0])


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: LayerKV, span: PrefillSpan,
                      scale: float, window: int | None = None) -> torch.Tensor:
    """Causal attention of one sequence's new tokens over its context (within ``window``).

    q: [n, num_heads, head_dim]; k, v: [n, num_kv_heads, head_dim] (the new tokens' K/V).
    Returns [n, num_heads, head_dim].
    """
    n, heads, head_dim = q.shape
    group = heads // k.shape[1]
    first_key = span.num_cached
    if span.num_cached:  # the cached prefix (or its part inside the window) lives only in the cache
        first_key = span.read_start
        k = torch.cat([layer.read(layer.key, span.cached_slots, layer.k_scale), k])
        v = torch.cat([layer.read(layer.value, span.cached_slots, layer.v_scale), v])
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    # [1, heads, tokens, head_dim]
    qh, kh, vh = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    if not span.num_cached and (window is None or n <= window):
        out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale)
    else:
        qpos = torch.arange(span.num_cached, span.ctx_len, device=q.device)[:, None]
        kpos = torch.arange(first_key, span.ctx_len, device=q.device)[None, :]
        mask = kpos <= qpos
        if window is not None:
            mask &= kpos > qpos - window
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale)
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


class TritonDecode:
    """kgen's paged decode kernel, looked up through ``kgen.dispatch`` once per step."""

    name = "triton"

    def __init__(self, block_size: int, num_kv_heads: int, num_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, dispatcher=None, *, kv_cache_dtype: str = "auto",
                 windows: tuple = (None,)) -> None:
        missing = triton_lacks(kv_cache_dtype, windows)
        if missing:
            raise ValueError(missing)
        ensure_interpreter_on_cpu(device)
        from kgen.dispatch import Dispatcher
        from kgen.variant import BLOCK_SIZES, HEAD_DIMS, normalize_dtype

        if head_dim not in HEAD_DIMS:
            raise ValueError(f"head_dim={head_dim} is not supported by the triton backend; "
                             f"supported: {', '.join(map(str, HEAD_DIMS))} (use backend='torch')")
        if block_size not in BLOCK_SIZES:
            raise ValueError(f"block_size={block_size} is not supported by the triton backend; "
                             f"supported: {', '.join(map(str, BLOCK_SIZES))} (use backend='torch')")
        self.block_size, self.head_dim = block_size, head_dim
        self.group_size = num_heads // num_kv_heads
        self.dtype = normalize_dtype(dtype)
        self.dispatcher = dispatcher or Dispatcher()

    def prepare(self, meta: AttentionMetadata) -> None:
        meta.extra["kernel"] = self.dispatcher.kernel_for(
            dtype=self.dtype, head_dim=self.head_dim, block_size=self.block_size,
            group_size=self.group_size, num_seqs=meta.num_decodes, max_context=meta.max_seq_len)

    def decode(self, q, layer: LayerKV, meta: AttentionMetadata, scale: float, window=None) -> torch.Tensor:
        kernel = meta.extra["kernel"]
        return kernel(q.contiguous(), layer.key, layer.value, meta.block_tables, meta.seq_lens,
                      scale=scale, max_seq_len=meta.max_seq_len)


def triton_lacks(kv_cache_dtype: str = "auto", windows: tuple = (None,)) -> str | None:
    """Why kgen's kernels cannot decode this cache yet (a message naming the feature), or None.

    fp8 caches and sliding windows come with the kernel-features work; until then the triton
    backend refuses them by name rather than decoding something else.
    """
    if kv_cache_dtype != "auto":
        return (f"kv_cache_dtype={kv_cache_dtype!r} is not supported by the triton backend yet "
                f"(kgen's kernels read caches in the model's dtype); use backend='torch'")
    window = next((w for w in windows if w is not None), None)
    if window is not None:
        return (f"sliding_window={window} is not supported by the triton backend yet (kgen's kernels "
                f"attend to the whole context); use backend='torch'")
    return None


def resolve_backend(backend: str, device: torch.device) -> str:
    """``auto`` -> ``triton`` on CUDA, ``native`` on the CPU (before feature checks); validates the name."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not supported; use one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "native"
    return backend


def default_block_size(backend: str, *, head_dim: int, dtype: torch.dtype, device: torch.device,
                       fallback: int = 16) -> int:
    """The KV block size to use when the caller gives none.

    When kgen's kernels decode (the ``triton`` backend), the block size the tuning database
    recorded as fastest for this GPU, dtype and head dim; otherwise (or if none is recorded)
    ``fallback``, the paper's and vLLM's default of 16.
    """
    if resolve_backend(backend, device) != "triton" or not triton_supports(head_dim, fallback):
        return fallback
    from kgen.db.lookup import preferred_block_size
    from kgen.device import default_gpu_name
    from kgen.variant import BLOCK_SIZES

    found = preferred_block_size(default_gpu_name(), dtype=str(dtype), head_dim=head_dim)
    return found if found in BLOCK_SIZES else fallback


def make_decode_backend(backend: str, *, block_size: int, num_heads: int, num_kv_heads: int,
                        head_dim: int, dtype: torch.dtype, device: torch.device, kv_cache_dtype: str = "auto",
                        windows: tuple = (None,), num_blocks: int = 0):
    """The decode backend object for a backend name; ``auto`` falls back to torch for what kgen's
    kernels (CUDA) or the native kernel (CPU) do not cover."""
    name = resolve_backend(backend, device)
    if backend == "auto" and name == "triton" and (not triton_supports(head_dim, block_size)
                                                   or triton_lacks(kv_cache_dtype, windows)):
        name = "torch"
    if backend == "auto" and name == "native" and native_lacks(dtype, num_heads, head_dim, device):
        name = "torch"
    if name == "triton":
        return TritonDecode(block_size, num_kv_heads, num_heads, head_dim, dtype, device,
                            kv_cache_dtype=kv_cache_dtype, windows=windows)
    if name == "native":
        missing = native_lacks(dtype, num_heads, head_dim, device)
        if missing:
            raise ValueError(f"backend='native': {missing}")
        return NativeDecode(block_size, num_kv_heads, num_heads, head_dim, num_blocks)
    return TorchDecode(block_size, num_kv_heads, head_dim, dtype)


def triton_supports(head_dim: int, block_size: int) -> bool:
    """Whether kgen's kernel space covers this head dim and block size."""
    from kgen.variant import BLOCK_SIZES, HEAD_DIMS

    return head_dim in HEAD_DIMS and block_size in BLOCK_SIZES
