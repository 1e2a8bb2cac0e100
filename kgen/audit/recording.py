"""What the static audit records of a rendered module's calls: launches, and the inputs to call with.

:class:`Recorder` stands in for a module's ``@triton.jit`` kernel and keeps each :class:`Launch`
(the kernel, its grid and arguments); :func:`workload` builds small random CPU inputs of a
representative decode batch (the attention family's capture starts from them too);
:func:`mark_kv_args` names the parameters bound to the K/V caches. Both families' capture modules
(:mod:`kgen.audit.capture`, :mod:`kgen.audit.capture_attention`) build on this one.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from dataclasses import dataclass

from kgen.variant import SPLIT_AUTO, VariantConfig

AUTO_SPLITS = 4  # partitions requested for split "auto" variants, so partial + merge launch


@dataclass
class Launch:
    """One captured kernel launch: the JITFunction, its arguments and the K/V parameter names."""

    name: str
    fn: object
    grid: object
    args: tuple
    kwargs: dict
    kv_args: frozenset = frozenset()


@contextlib.contextmanager
def interpreter_off():
    """Clear ``TRITON_INTERPRET`` (and an in-process knob override) for the duration."""
    from triton import knobs

    saved_env = os.environ.pop("TRITON_INTERPRET", None)
    knob_dict = knobs.runtime.__dict__
    had_knob, saved_knob = "interpret" in knob_dict, knob_dict.get("interpret")
    if had_knob:
        knob_dict["interpret"] = False
    try:
        yield
    finally:
        if saved_env is not None:
            os.environ["TRITON_INTERPRET"] = saved_env
        if had_knob:
            knob_dict["interpret"] = saved_knob


def workload(config: VariantConfig, *, num_seqs: int = 2, num_kv_heads: int = 2, seed: int = 0):
    """Small random CPU inputs of a representative decode batch for ``config``.

    Contiguous NHD caches ``[8, block_size, num_kv_heads, head_dim]`` (the variant's KV dtype);
    block tables ``[num_seqs, ceil(max_len / block_size)]`` int32 pointing (with repeats) into
    those 8 pages; context lengths long enough that every split-K partition gets tiles, capped at
    16384 tokens; the arguments of the variant's features (per-KV-head scale tensors for fp8
    caches, so the audited kernel reads them on the device; a window of half the context).
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    splits = config.split_k if config.split_k != SPLIT_AUTO else AUTO_SPLITS
    max_len = min(16384, max(2 * splits * config.tile_tokens, 3 * config.block_size) + 3)
    num_heads = config.group_size * num_kv_heads
    cols = -(-max_len // config.block_size)
    shape = (8, config.block_size, num_kv_heads, config.head_dim)
    dtype, kv_dtype = config.torch_dtype, config.kv_torch_dtype
    inputs = {
        "query": torch.randn(num_seqs, num_heads, config.head_dim, generator=gen).to(dtype),
        "key_cache": torch.randn(shape, generator=gen).to(kv_dtype),
        "value_cache": torch.randn(shape, generator=gen).to(kv_dtype),
        "block_tables": torch.randint(0, 8, (num_seqs, cols), generator=gen, dtype=torch.int32),
        "seq_lens": torch.tensor([max_len] + [max_len - 1 - i for i in range(num_seqs - 1)],
                                 dtype=torch.int32),
    }
    if config.kv_fp8:
        inputs["k_scale"] = torch.rand(num_kv_heads, generator=gen) + 0.5
        inputs["v_scale"] = torch.rand(num_kv_heads, generator=gen) + 0.5
    if config.has("sliding_window"):
        inputs["sliding_window"] = max(1, max_len // 2)
    if config.has("soft_cap"):
        inputs["logits_soft_cap"] = 30.0
    for feature, name in (("alibi", "alibi_slopes"), ("sinks", "sinks")):
        if config.has(feature):
            inputs[name] = torch.rand(num_heads, generator=gen)
    return inputs


class Recorder:
    """Stands in for a module's jit kernel: each launch is appended to ``sink`` as a Launch."""

    def __init__(self, name, fn, sink):
        self.name, self.fn, self.sink = name, fn, sink

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.sink.append(Launch(self.name, self.fn, grid, args, kwargs))
        return launch


def mark_kv_args(launches: list, inputs: dict) -> list:
    """Set each launch's ``kv_args``: the parameters bound to the K/V caches of ``inputs``."""
    kv_ptrs = {inputs["key_cache"].data_ptr(), inputs["value_cache"].data_ptr()}
    for launch in launches:
        bound = _bind(launch.fn, launch.args, launch.kwargs)[0]
        launch.kv_args = frozenset(n for n, v in bound.items()
                                   if hasattr(v, "data_ptr") and v.data_ptr() in kv_ptrs)
    return launches


def _bind(fn, args, kwargs):
    sig = inspect.signature(fn.fn)
    options = {k: v for k, v in kwargs.items() if k not in sig.parameters}
    bound = sig.bind(*args, **{k: v for k, v in kwargs.items() if k in sig.parameters})
    bound.apply_defaults()
    return dict(bound.arguments), options


