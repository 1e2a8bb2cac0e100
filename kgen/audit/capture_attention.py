"""Capture the launches of a ``paged_attention`` module for the static audit.

An attention variant compiles one kernel per row tile it launches with, so the audit must see
each shape its launcher may pick (:func:`plan_shapes`): the 2D kernel with the variant's q tile
(prefill chunks) and with 16 rows (short queries in one pass), and for segmenting variants the
segmented kernel with 16 rows (decode) and with the q tile (the longest speculative query that
fits one tile), and the merge with its narrowest (16 partitions) and widest (64, 8 warps) steps.
The launcher's planner is replaced for each call by one returning that shape, so the capture
does not depend on the planner's choices; identical launches (same kernel and constexprs) are
kept once.
"""

from __future__ import annotations

from kgen.audit.recording import Recorder, interpreter_off, mark_kv_args, workload
from kgen.variant_attention import AttentionVariantConfig

NARROW_MERGE, WIDE_MERGE = 4, 64  # segments of the calls whose merge reads 16 / 64 per step


def plan_shapes(config: AttentionVariantConfig) -> list[tuple[int, int, int]]:
    """The (BLOCK_M, BLOCK_Q, segments) plans whose launches the audit compiles."""
    g = config.group_size
    plans = [(config.q_tile, config.q_tile // g, 1), (16, 16 // g, 1)]
    if config.split_k != 1:
        plans += [(16, 16 // g, NARROW_MERGE), (config.q_tile, config.q_tile // g, NARROW_MERGE),
                  (16, 16 // g, WIDE_MERGE)]
    return plans


def attention_workload(config: AttentionVariantConfig, *, num_seqs: int = 3) -> dict:
    """Small random CPU inputs of the varlen contract for ``config`` (the decode workload's caches,
    tables, lengths and feature arguments, with ``2 * q_tile`` query rows split over the
    sequences). Only shapes, dtypes, alignment and the integer arguments matter: the kernels
    are compiled, never run."""
    import torch

    inputs = workload(config, num_seqs=num_seqs)
    num_tokens = 2 * config.q_tile + 5
    gen = torch.Generator().manual_seed(1)
    num_heads = inputs["query"].shape[1]
    inputs["query"] = torch.randn(num_tokens, num_heads, config.head_dim, generator=gen).to(
        config.torch_dtype)
    cuts = sorted(torch.randint(0, num_tokens + 1, (num_seqs - 1,), generator=gen).tolist())
    inputs["query_start_loc"] = torch.tensor([0, *cuts, num_tokens], dtype=torch.int32)
    return inputs


def capture_attention_launches(module, config: AttentionVariantConfig) -> list:
    """Run ``module.paged_attention`` once per :func:`plan_shapes` plan, recording the launches."""
    inputs = attention_workload(config)
    bounds = dict(max_query_len=1, max_seq_len=int(inputs["seq_lens"].max()))
    sink, seen = [], set()
    saved = {name: getattr(module, name) for name in (*module.KERNELS, "plan_launch")}
    try:
        for plan in plan_shapes(config):
            calls = []
            for name in module.KERNELS:
                setattr(module, name, Recorder(name, saved[name], calls))
            module.plan_launch = lambda *args, _plan=plan, **kwargs: _plan
            with interpreter_off():  # the launcher picks interpreter-only paths from the env
                module.paged_attention(**inputs, **bounds)
            for launch in calls:
                if plan[2] == WIDE_MERGE and launch.name != "_merge_kernel":
                    continue  # that call is for the merge's widest step only
                ident = (launch.name, tuple(sorted((k, repr(v)) for k, v in launch.kwargs.items()
                                                   if not hasattr(v, "data_ptr"))))
                if ident not in seen:
                    seen.add(ident)
                    sink.append(launch)
    finally:
        for name, fn in saved.items():
            setattr(module, name, fn)
    if not sink:
        raise ValueError(f"{config.key}: paged_attention launched no kernel")
    return mark_kv_args(sink, inputs)
