"""The ``triton`` backend: kgen's kernels as the runtime's whole attention, one launch per layer.

Each step's rows (prefill chunks, prefix-cache extends and decodes together) go to one call of
the any-query-length kernel (kgen's ``paged_attention`` contract) per layer: the new tokens' K/V
are written to the cache first, and every key, cached or new, is read from the cache in place.
There is no SDPA call and no gather of a cached prefix. kgen plans each kind of layer once
(:meth:`kgen.dispatch.Dispatcher.plan`); each step asks the plans for the kernel of its batch,
context and query-length buckets (the tuning database's record, else the heuristic default).

On a CPU device the kernels run under the Triton interpreter (``TRITON_INTERPRET=1`` is set if it
was not, with a warning).
"""

from __future__ import annotations

import os
import sys
import warnings

import torch

from kgen.dispatch import get_dispatcher
from kgen.shape import AttentionShape
from runtime.attention_meta import AttentionMetadata
from runtime.kv_cache import LayerKV

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


class TritonAttention:
    """kgen's kernels for every row of a step: one kgen plan per kind of layer, made here once.

    ``layers`` (one :class:`runtime.config.LayerAttention` per layer) says which attention
    features each layer needs and ``kv_cache_dtype`` the cache's format (``auto`` or fp8); what
    kgen's kernels lack (the plan's ``problem``) is refused here, naming the layer.
    :meth:`prepare` asks each plan for the step's kernel (from the step's
    :class:`~runtime.attention_meta.VarlenBatch`) and :meth:`attend` runs a layer's rows in one
    launch with the layer's scale, window and soft cap.
    """

    name = "triton"
    whole_batch = True  # attention reads every key from the cache: the batch needs meta.varlen

    def __init__(self, block_size: int, num_kv_heads: int, num_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, dispatcher=None, layers=(),
                 kv_cache_dtype: str = "auto") -> None:
        ensure_interpreter_on_cpu(device)
        dispatcher = dispatcher or get_dispatcher()
        shapes = layer_shapes(layers, num_heads=num_heads, num_kv_heads=num_kv_heads,
                              head_dim=head_dim, dtype=dtype, kv_cache_dtype=kv_cache_dtype,
                              block_size=block_size)
        self.plans = {features: dispatcher.plan(shape) for features, shape in shapes.items()}
        self.launches = 0  # kernel calls made (one per layer per step)
        for features, plan in self.plans.items():
            if plan.problem is None:
                continue
            which = [i for i, la in enumerate(layers) if la.features == features]
            if features and which:
                la = layers[which[0]]
                raise ValueError(f"backend='triton' cannot run layer {which[0]} (sliding_window="
                                 f"{la.sliding_window}, logits_soft_cap={la.logits_soft_cap}): "
                                 f"{plan.problem}; use backend='torch'")
            raise ValueError(f"backend='triton': {plan.problem} (use backend='torch')")

    def prepare(self, meta: AttentionMetadata) -> None:
        """Pick each kind of layer's kernel for the step's buckets (once per step)."""
        v = meta.varlen
        if v is None:
            raise ValueError("the triton backend needs the step's varlen batch (build_batch(..., "
                             "varlen=True))")
        for features, plan in self.plans.items():
            meta.extra[("kernel", features)] = plan.kernel(v.num_seqs, max(1, v.max_seq_len),
                                                           v.max_query_len)

    def attend(self, q: torch.Tensor, layer: LayerKV, meta: AttentionMetadata, la) -> torch.Tensor:
        """One layer's attention for every row of the step, read from the cache in place.

        q: [num_tokens, num_heads, head_dim]; the rows' K/V are already in ``layer``'s cache.
        Returns [num_tokens, num_heads, head_dim].
        """
        kernel = meta.extra.get(("kernel", la.features))
        if kernel is None:
            raise ValueError(f"the triton backend was not prepared for features {la.features!r} "
                             f"(sliding_window={la.sliding_window}, logits_soft_cap={la.logits_soft_cap})")
        extra = {}
        if la.sliding_window is not None:
            extra["sliding_window"] = la.sliding_window
        if la.logits_soft_cap is not None:
            extra["logits_soft_cap"] = la.logits_soft_cap
        if layer.quantized:  # kgen's fp8 variants dequantize with the layer's scales
            extra.update(k_scale=layer.k_scale, v_scale=layer.v_scale)
        v = meta.varlen
        self.launches += 1
        return kernel(q.contiguous(), layer.key, layer.value, v.block_tables, v.seq_lens,
                      v.query_start_loc, max_query_len=v.max_query_len, max_seq_len=v.max_seq_len,
                      scale=la.scale, **extra)
