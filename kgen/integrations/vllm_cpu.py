"""vLLM-CPU's attention backend with kgen's kernels as its forward.

:class:`KgenCPUAttentionBackend` is vLLM's ``CPU_ATTN`` backend (the cache writes and the
metadata builder are vLLM's own) whose impl first offers each forward call to
:func:`kgen.integrations.vllm_attention.attend`: every batch of a layer kgen serves (decode,
prefill, chunked prefill, mixed, speculative) runs kgen's any-query-length kernel, and vLLM's
``cpu_attention_with_kv_cache`` op runs only for layers (or steps) kgen cannot serve. kgen reads vLLM's cache in place through strided
views (layout ``cpu`` of :mod:`kgen.integrations.kv_views`), which exist for the ``vec`` and
``vec16`` ISAs; layers on another ISA (``amx`` packs K in tiles) stay on the stock kernels.

The plugin (:mod:`kgen.integrations.vllm`) registers this class for ``CPU_ATTN`` when
``KGEN_VLLM_BACKEND=1``. The kernels run under Triton's interpreter: ``TRITON_INTERPRET=1`` must be
set before start-up (vLLM-CPU's Triton has no CPU backend); without it every layer stays on the
stock kernels and the reason is logged. This module imports vLLM; vLLM imports it by class path
when it builds the first attention layer.
"""

from __future__ import annotations

import os

from vllm.v1.attention.backend import MultipleOf
from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, CPUAttentionBackendImpl

from kgen.integrations.vllm_attention import KgenImplMixin

# ISAs whose cache packing kgen reads by strides (K transposed per page, then V row-major).
VIEWABLE_ISAS = ("vec", "vec16")


def _cpu_problem(layer) -> str | None:
    """Why a layer's cache or this process cannot run kgen's kernel on the CPU, or None."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return ("TRITON_INTERPRET unset (set TRITON_INTERPRET=1 before start-up: "
                "Triton has no CPU backend here)")
    isa = getattr(layer, "isa", None)
    if isa not in VIEWABLE_ISAS:
        return f"isa={isa} (kgen reads the {'/'.join(VIEWABLE_ISAS)} cache packing only)"
    return None


class KgenCPUAttentionImpl(KgenImplMixin, CPUAttentionBackendImpl):
    """vLLM's CPU impl; every batch of a layer kgen serves goes to kgen's kernel."""

    kgen_layout = "cpu"
    kgen_stock_name = "CPU_ATTN"

    def kgen_problem(self, layer) -> str | None:
        return _cpu_problem(layer)


class KgenCPUAttentionBackend(CPUAttentionBackend):
    """``CPU_ATTN`` with kgen's decode; also accepts block sizes that are multiples of 16."""

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list[int | MultipleOf]:
        # vLLM's CPU kernels run block 16 with their vec16 ISA; the stock class declares 32.
        return [MultipleOf(16)]

    @staticmethod
    def get_impl_cls() -> type[KgenCPUAttentionImpl]:
        return KgenCPUAttentionImpl
