"""kgen's kernels as a vLLM attention impl's whole forward: which layers they serve, and the call.

This module holds the engine-facing logic of the vLLM adapter without importing vLLM: it reads
only plain attributes of vLLM's impl, layer and metadata objects (named below), so it is tested
with stand-ins as well as inside vLLM. The backend classes in
:mod:`kgen.integrations.vllm_cpu` (vLLM-CPU) and :mod:`kgen.integrations.vllm_gpu` (a GPU) call
:func:`attend` first and run the stock backend when it returns False.

Every batch of a supported layer goes to kgen's any-query-length kernel in one launch: pure
decode, prefill, chunked prefill, mixed prefill + decode, prefix-cache extends and speculative
decoding's 1 + k rows, exactly as vLLM describes them (``query_start_loc``, ``seq_lens``,
``block_table``, after vLLM has written the step's K/V into the cache). One launch rather than
splitting a mixed batch into a prefill and a decode launch: the kernel runs short queries on its
segmented (split-K) path and long ones on its query-tiled path in the same grid.

What a layer needs is read once per layer (:func:`layer_plan`): the KV cache dtype and the
attention features (sliding window, logit soft-cap, ALiBi, sinks) make its
:class:`kgen.shape.AttentionShape`, and kgen's plan for that shape
(:meth:`kgen.dispatch.Dispatcher.plan`) is the layer's plan: kgen's kernels get the layer when the
plan has no ``problem`` (the one gate), and the plan gives the kernel of each step.
Every KV dtype and feature of kgen's kernels is passed (:func:`feature_kwargs` builds the
arguments); what still falls back is named by :func:`layer_needs` (other cache dtypes, non-decoder
attention, ALiBi-sqrt, chunked attention) and by the backend (e.g. vLLM-CPU's AMX cache packing).

Under a CUDA graph capture (vLLM's full graphs) the kernel is planned from shapes alone: the
bounds are the step's token count and the block table's capacity, so a captured launch serves
every replay (kgen's contract: launches depend only on shapes and the two bounds, with no read of
a tensor to the host); the variant for a captured size is chosen at capture and stays.

Logging goes to the logger ``vllm.kgen``, under vLLM's ``vllm`` logger so that vLLM's handler
and ``VLLM_LOGGING_LEVEL`` apply: one INFO line ``kgen attention: <variant key>`` the first time
a variant runs, and one INFO line per distinct reason a layer or a step stays on the stock
backend.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

import torch

from kgen import dispatch
from kgen.dtypes import kv_torch_dtype, normalize_kv_dtype
from kgen.integrations.kv_views import nhd_views
from kgen.plan import AttentionPlan, variant_key
from kgen.shape import AttentionShape

logger = logging.getLogger("vllm.kgen")

# Cache dtypes / attention features this adapter forwards to kgen's kernels (all of kgen issue 9's).
# Conventions, checked against vLLM 0.32's CPU and Triton backends:
# - fp8: vLLM stores fp8(k / k_scale) (``layer._k_scale``, fp32) and reads stored * k_scale: kgen's
#   k_scale / v_scale are the same numbers. vLLM-CPU keeps an fp8 cache as uint8; it is read as
#   the fp8 dtype in place (:func:`_as_fp8`).
# - sliding window W: the query at position p sees keys p - W + 1 .. p (:func:`window_of`).
# - soft-cap before ALiBi: s = c * tanh(scale * q.k / c) + slope * (j - p); sinks: one extra
#   unscaled logit per query head in the softmax denominator, as in kgen.
# vLLM's --kv-cache-dtype spellings are kgen's one vocabulary (kgen.dtypes): auto, fp8 (= e4m3),
# fp8_e4m3, fp8_e5m2, and the model's own dtype name meaning auto.

# Counters for tests and benchmarks: kgen kernel calls (all, and those of batches with more than
# one query token for some sequence), and forward calls handed to the stock backend (unsupported
# layers or steps). Per process.
STATS = {"kgen_calls": 0, "kgen_multi_token_calls": 0, "stock_calls": 0}
_said: set[str] = set()
_lock = threading.Lock()


def _say_once(message: str) -> None:
    with _lock:
        if message in _said:
            return
        _said.add(message)
    logger.info(message)


@dataclass
class LayerPlan:
    """One vLLM attention layer as the adapter sees it: kgen's plan for its shape, and what the
    adapter adds around it.

    ``plan`` is kgen's :class:`kgen.plan.AttentionPlan` (None when the layer was refused before
    kgen was asked: encoder attention, another cache dtype ...); ``reason`` says why the layer
    stays on vLLM's kernels (None: kgen serves it); ``values`` maps kgen's feature names to the
    layer's values from vLLM; ``kwargs`` are the kernel's feature arguments, built at the first
    call.
    """

    plan: AttentionPlan | None
    reason: str | None
    values: dict = field(default_factory=dict)
    kwargs: dict | None = None

    @property
    def shape(self) -> AttentionShape:
        return self.plan.shape


def window_of(sliding_window) -> int | None:
    """The number of most recent tokens a layer sees, from vLLM's impl attribute, or None.

    The CPU backend keeps ``W`` (-1: none); the Triton backend keeps ``(W - 1, 0)`` ((-1, -1):
    none). Both mean: the query at position p attends to positions p - W + 1 .. p.
    """
    if sliding_window is None:
        return None
    if isinstance(sliding_window, (tuple, list)):
        left = int(sliding_window[0])
        return None if left < 0 else left + 1
    return None if int(sliding_window) < 0 else int(sliding_window)


def layer_needs(impl, model_dtype: torch.dtype) -> tuple[str | None, str, dict]:
    """(problem, kv_dtype, features) of a vLLM attention impl.

    ``problem`` names an attribute kgen cannot serve at all (None if there is none); ``kv_dtype``
    is kgen's name of the cache element type; ``features`` maps kgen's feature names to vLLM's
    values (only the features the layer uses).
    """
    attn_type = getattr(impl, "attn_type", "decoder")
    if str(attn_type) not in ("decoder", "AttentionType.DECODER"):
        return f"attn_type={attn_type} (kgen decodes decoder self-attention only)", "auto", {}
    if getattr(impl, "use_alibi_sqrt", False):
        return "use_alibi_sqrt=True (kgen's ALiBi is linear in distance)", "auto", {}
    if getattr(impl, "chunk_lookback", -1) > -1:
        return f"chunk_lookback={impl.chunk_lookback} (chunked attention)", "auto", {}
    cache_dtype = str(getattr(impl, "kv_cache_dtype", "auto"))
    try:
        kv_dtype = normalize_kv_dtype(cache_dtype, name="kv_cache_dtype", model_dtype=model_dtype)
    except ValueError as exc:
        return str(exc), "auto", {}
    features = {}
    window = window_of(getattr(impl, "sliding_window", None))
    if window is not None:
        features["sliding_window"] = window
    cap = getattr(impl, "logits_soft_cap", None)
    if cap:
        features["soft_cap"] = float(cap)
    if getattr(impl, "alibi_slopes", None) is not None:
        features["alibi"] = impl.alibi_slopes
    if getattr(impl, "sinks", None) is not None:
        features["sinks"] = impl.sinks
    return None, kv_dtype, features


def layer_plan(impl, *, dtype: torch.dtype, block_size: int, extra_problem: str | None = None,
               dispatcher=None) -> LayerPlan:
    """Decide once per layer whether kgen's kernels decode it, and with what.

    Parameters
    ----------
    impl : vLLM AttentionImpl
        Read: ``num_heads``, ``num_kv_heads``, ``head_size`` and the attributes
        :func:`layer_needs` reads.
    dtype : torch.dtype
        The query / model dtype.
    block_size : int
        Tokens per KV page of the layer's cache (the kernel block size).
    extra_problem : str, optional
        A reason found by the backend (cache packing, platform), checked first.
    dispatcher : kgen.dispatch.Dispatcher, optional
        Defaults to :func:`kgen.dispatch.get_dispatcher`'s shared one.
    """
    problem, kv_dtype, values = layer_needs(impl, dtype)
    if extra_problem or problem:
        return LayerPlan(None, extra_problem or problem, values)
    shape = AttentionShape.from_heads(dtype=dtype, head_dim=int(impl.head_size),
                                      num_heads=impl.num_heads, num_kv_heads=impl.num_kv_heads,
                                      kv_dtype=kv_dtype, features=tuple(values),
                                      block_size=int(block_size))
    plan = (dispatcher or dispatch.get_dispatcher()).plan(shape)
    return LayerPlan(plan, plan.problem, values)


def feature_kwargs(layer_plan: LayerPlan, layer, device) -> dict:
    """The kernel's keyword arguments for the layer's KV dtype and features (kgen issue 9's call).

    FP8 scales come from ``layer._k_scale`` / ``layer._v_scale`` (fp32 tensors on the device: no
    host sync); ALiBi slopes and sinks are moved to the device as fp32 once per layer.
    """
    kwargs = {}
    if layer_plan.shape.kv_fp8:
        kwargs["k_scale"] = layer._k_scale
        kwargs["v_scale"] = layer._v_scale
    feats = layer_plan.values
    if "sliding_window" in feats:
        kwargs["sliding_window"] = int(feats["sliding_window"])
    if "soft_cap" in feats:
        kwargs["logits_soft_cap"] = float(feats["soft_cap"])
    if "alibi" in feats:
        kwargs["alibi_slopes"] = feats["alibi"].to(device=device, dtype=torch.float32)
    if "sinks" in feats:
        kwargs["sinks"] = feats["sinks"].to(device=device, dtype=torch.float32)
    return kwargs


def _as_fp8(cache: torch.Tensor, kv_dtype: str) -> torch.Tensor:
    """An fp8 cache view in kgen's fp8 dtype (vLLM allocates fp8 caches as uint8): no copy."""
    return cache.view(kv_torch_dtype(kv_dtype, torch.float32)) if cache.dtype == torch.uint8 else cache


def step_problem(meta) -> str | None:
    """Why kgen's causal kernel cannot run this step as vLLM describes it, or None."""
    causal = getattr(meta, "causal", True)
    if causal is not True:
        return f"causal={'a per-request tensor' if isinstance(causal, torch.Tensor) else causal}"
    for name in ("dynamic_causal", "mm_prefix_range_tensor", "rswa_prefix_lens"):
        if getattr(meta, name, None) is not None:
            return f"{name} is set (kgen's kernels are causal over the cache only)"
    return None


def capturing(query: torch.Tensor) -> bool:
    """Whether this launch is being captured into a CUDA graph (vLLM's full graphs)."""
    return query.is_cuda and torch.cuda.is_current_stream_capturing()


def _bounds(query: torch.Tensor, meta, num_tokens: int, capacity: int) -> tuple[int, int]:
    """(max_query_len, max_seq_len) to plan and launch with: vLLM's step values, or under a CUDA
    graph capture shape-only bounds (the token count, the table's capacity), so the captured
    launches serve every replay."""
    if capturing(query):
        return max(1, num_tokens), capacity
    return max(1, int(meta.max_query_len)), max(1, int(meta.max_seq_len))


def attend(impl, layer, query: torch.Tensor, kv_cache: torch.Tensor, meta, output: torch.Tensor,
           *, layout: str, stock_name: str, extra_problem=None) -> bool:
    """Run one layer's step with kgen's kernel; False (nothing written) means: use the stock one.

    Parameters
    ----------
    impl, layer
        vLLM's attention impl (its plan is cached on it as ``_kgen_plan``) and layer.
    query : torch.Tensor
        ``[num_tokens, num_heads, head_dim]`` (rows past ``meta.num_actual_tokens`` are padding).
    kv_cache : torch.Tensor
        The layer's cache in ``layout`` (see :mod:`kgen.integrations.kv_views`); vLLM has already
        written this step's K/V into it.
    meta
        vLLM's attention metadata: ``num_actual_tokens``, ``query_start_loc`` (int32,
        ``[num_reqs + 1]``), ``seq_lens`` (int32, keys including the new tokens), ``block_table``
        (int32), ``max_query_len``, ``max_seq_len``, ``causal``.
    output : torch.Tensor
        ``[num_tokens, num_heads, head_dim]``, written in place.
    layout, stock_name : str
        The cache layout, and the stock backend's name for the log.
    extra_problem : callable, optional
        ``() -> str | None``: a backend-specific reason to fall back (asked once per layer).
    """
    if meta is None:  # vLLM's warm-up / profiling run: nothing to attend to
        return False
    plan = getattr(impl, "_kgen_plan", None)
    if plan is None:
        plan = layer_plan(impl, dtype=query.dtype, block_size=kv_cache.shape[2],
                          extra_problem=extra_problem() if extra_problem else None)
        impl._kgen_plan = plan
    why = plan.reason or step_problem(meta)
    if why is not None:
        what = "layers stay" if plan.reason else "steps stay"
        _say_once(f"kgen: {what} on {stock_name}'s kernels: {why}")
        STATS["stock_calls"] += 1
        return False
    n = meta.num_actual_tokens
    shape = plan.shape
    key, value = nhd_views(kv_cache, layout, num_kv_heads=impl.num_kv_heads,
                           head_dim=shape.head_dim, block_size=shape.block_size)
    if shape.kv_fp8:
        key, value = _as_fp8(key, shape.kv_dtype), _as_fp8(value, shape.kv_dtype)
    seq_lens, starts = meta.seq_lens, meta.query_start_loc
    num_seqs = seq_lens.shape[0]
    block_table = meta.block_table[:num_seqs]
    if block_table.dtype != torch.int32:
        block_table = block_table.to(torch.int32)
    max_query_len, max_seq_len = _bounds(query, meta, n, block_table.shape[1] * shape.block_size)
    kernel = plan.plan.kernel(num_seqs, max_seq_len, max_query_len)
    _say_once(f"kgen attention: {variant_key(kernel)}")
    if plan.kwargs is None:
        plan.kwargs = feature_kwargs(plan, layer, query.device)
    kernel(query[:n], key, value, block_table, seq_lens, starts, max_query_len=max_query_len,
           max_seq_len=max_seq_len, scale=impl.scale, out=output[:n], **plan.kwargs)
    STATS["kgen_calls"] += 1
    STATS["kgen_multi_token_calls"] += int(n > num_seqs)  # some sequence ran more than one row
    return True


class KgenImplMixin:
    """The ``forward`` of kgen's vLLM attention impls (CPU and GPU alike): kgen first, vLLM's own
    ``forward`` (the next class in the MRO) when :func:`decode` declines.

    A subclass sets ``kgen_layout`` (the cache layout, :mod:`kgen.integrations.kv_views`) and
    ``kgen_stock_name`` (the stock backend's name for the log), and may override
    :meth:`kgen_problem` (a backend-specific reason a layer stays on the stock kernels) and
    :meth:`kgen_step_ok` (whether a step's metadata is one kgen may take at all).
    """

    kgen_layout: str = ""
    kgen_stock_name: str = ""

    def kgen_problem(self, layer) -> str | None:
        return None

    def kgen_step_ok(self, meta) -> bool:
        return True

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None):
        if (output_scale is None and output_block_scale is None and self.kgen_step_ok(attn_metadata)
                and attend(self, layer, query, kv_cache, attn_metadata, output,
                           layout=self.kgen_layout, stock_name=self.kgen_stock_name,
                           extra_problem=lambda: self.kgen_problem(layer))):
            return output
        return super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                               output_scale, output_block_scale)
