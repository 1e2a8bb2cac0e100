"""Measurers that run real kernels: on a GPU (``do_bench``) and under the Triton interpreter.

Before a candidate is timed it must pass (1) the generator's static prune rules, (2) on a named
GPU, the static audit for its target (no spills, compiles; cached per variant), and (3) a
correctness check against the float64 reference on fresh random paged inputs with shared and
permuted blocks and lengths at block edges, into a NaN-poisoned output. A wrong kernel is a
``failed`` measurement and never a winner.
"""

from __future__ import annotations

import functools
import statistics
import time

from kgen import audit
from kgen.space import target_prune_reason
from kgen.tune.measure import Measurement, Measurer
from kgen.workload import Workload, tuning_window
from kgen.variant import VariantConfig

# The soft cap tuning measurements use (Gemma 2's attention cap); the value does not change speed.
TUNING_SOFT_CAP = 50.0


def check_lens(config: VariantConfig, workload: Workload) -> list[int]:
    """Small ragged lengths for the correctness check: past a few pages, one page, one token."""
    long = min(workload.context, 2 * max(config.block_size, config.tile_tokens) + 1)
    return [long, min(workload.context, config.block_size), 1]


def check_query_lens(workload: Workload, lens: list[int]) -> list[int]:
    """Query rows per sequence of an attention-family check: the workload's query length (at
    most 40 rows, so the interpreter stays quick), never more than the sequence's length."""
    q = min(workload.query_len, 40)
    return [min(q, n) for n in lens]


class KernelMeasurer(Measurer):
    """Shared part of the real measurers: audit, build, correctness check.

    Parameters
    ----------
    device : str
        Normalized device name recorded with the times.
    audit_target : str or None
        ``sm_80`` / ``sm_90`` to audit for before timing; None skips the audit.
    num_kv_heads : int
        KV heads of the inputs (query heads = ``num_kv_heads * group_size``).
    seed : int
        Base seed of the random inputs (each candidate gets fresh ones).
    """

    torch_device = "cpu"

    def __init__(self, device: str, *, audit_target: str | None = None, num_kv_heads: int = 2,
                 seed: int = 0) -> None:
        super().__init__()
        self.device = device
        self.audit_target = audit_target
        self.num_kv_heads = num_kv_heads
        self.seed = seed
        self._seed_counter = seed  # advanced per check / timing: each gets fresh inputs
        self._audits: dict[str, str | None] = {}

    def audit_reason(self, config: VariantConfig) -> str | None:
        """Why the static audit rejects ``config`` for this target (cached), or None."""
        if self.audit_target is None:
            return None
        if config.key not in self._audits:
            static = target_prune_reason(config, self.audit_target)
            if static:
                self._audits[config.key] = static
        if config.key not in self._audits:
            try:
                result = audit.audit_variant(config, self.audit_target)
                problems = audit.failures(result)
                reason = "; ".join(problems) if problems else None
            except Exception as exc:  # a compile failure for the target prunes the candidate
                reason = f"does not compile for {self.audit_target}: {type(exc).__name__}: {exc}"
            self._audits[config.key] = None if reason is None else f"audit {self.audit_target}: {reason}"[:500]
        return self._audits[config.key]

    def _inputs(self, config, lens: list[int], seed: int, q_lens: list[int] | None = None) -> dict:
        """Random paged inputs of ``lens`` with the variant's KV dtype (per-head scales) and the
        arguments of its features (a window of half the longest length); for the attention
        family ``q_lens`` new rows at the end of each sequence (the varlen contract)."""
        # kgen.reference and kgen.build import torch/triton: loaded when a kernel is measured
        from kgen.reference import make_paged_inputs
        from kgen.reference_varlen import make_varlen_inputs

        window = max(1, max(lens) // 2) if config.has("sliding_window") else None
        heads = self.num_kv_heads * config.group_size
        common = dict(seed=seed, device=self.torch_device, kv_dtype=config.kv_dtype,
                      scale_kind="head" if config.kv_fp8 else None, features=config.features,
                      sliding_window=window)
        if config.family == "attention":
            q_lens = q_lens or [1] * len(lens)
            return make_varlen_inputs(q_lens, [n - q for n, q in zip(lens, q_lens)], heads,
                                      self.num_kv_heads, config.head_dim, config.block_size,
                                      config.dtype, **common)
        return make_paged_inputs(len(lens), heads, self.num_kv_heads, config.head_dim,
                                 config.block_size, lens, config.dtype, **common)

    def check(self, module, config: VariantConfig, workload: Workload) -> str | None:
        """Run the kernel once against the float64 reference; a reason if it is wrong."""
        import torch

        from kgen.reference import max_abs_error, paged_attention_reference, within_tolerance
        from kgen.reference_varlen import paged_attention_varlen_reference

        self._seed_counter += 1
        lens = check_lens(config, workload)
        inputs = self._inputs(config, lens, self._seed_counter, check_query_lens(workload, lens))
        out = torch.full_like(inputs["query"], float("nan"))  # poison: all must be written
        if config.family == "attention":
            module.paged_attention(**inputs, out=out)
            ref = paged_attention_varlen_reference(**inputs)
        else:
            module.paged_attention_decode(**inputs, out=out)
            ref = paged_attention_reference(**inputs)
        if not within_tolerance(out.cpu(), ref.cpu(), config.dtype):
            return f"wrong result: max abs error {max_abs_error(out.cpu(), ref.cpu()):.3g} vs reference"
        return None

    def _measure(self, config: VariantConfig, workload: Workload) -> Measurement:
        reason = self.audit_reason(config)
        if reason:
            return Measurement("pruned", reason=reason)
        from kgen.build import load_kernel

        try:
            module = load_kernel(config)
        except Exception as exc:
            return Measurement("pruned", reason=f"does not build: {type(exc).__name__}: {exc}"[:500])
        try:
            wrong = self.check(module, config, workload)
        except Exception as exc:
            return Measurement("failed", reason=f"check crashed: {type(exc).__name__}: {exc}"[:500])
        if wrong:
            return Measurement("failed", reason=wrong)
        return self.time(module, config, workload)

    def time(self, module, config: VariantConfig, workload: Workload) -> Measurement:
        raise NotImplementedError


class InterpreterMeasurer(KernelMeasurer):
    """Wall-clock median under the Triton interpreter on a tiny instance (not GPU timings).

    Needs ``TRITON_INTERPRET=1`` set before kernel modules are imported (``kgen tune --gpu
    interpreter`` sets it). The interpreter's bf16 ``tl.dot`` is wrong, so bf16 kernels run their
    dots in fp32 there (the launcher's ``DOT_FP32``).
    """

    method = "triton interpreter wall-clock median (CPU; not GPU timings)"

    def __init__(self, *, repeats: int = 3, seed: int = 0) -> None:
        super().__init__("interpreter", audit_target=None, num_kv_heads=1, seed=seed)
        self.repeats = repeats

    def time(self, module, config: VariantConfig, workload: Workload) -> Measurement:
        lens = [min(workload.context, 4 * config.block_size), 1][: min(workload.batch, 2)]
        inputs = self._inputs(config, lens, self.seed + 10_000, check_query_lens(workload, lens))
        kernel = module.paged_attention if config.family == "attention" else module.paged_attention_decode
        times = []
        for _ in range(self.repeats):
            start = time.perf_counter()
            kernel(**inputs)
            times.append((time.perf_counter() - start) * 1e3)
        return Measurement("ok", time_ms=statistics.median(times),
                           extra={"lens": lens, "repeats": self.repeats})


def _do_bench(fn) -> float:
    """``triton.testing.do_bench`` median (L2 flushed between runs) across triton versions."""
    from triton.testing import do_bench

    try:
        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    except TypeError:  # older signature: quantiles only
        return float(do_bench(fn, warmup=25, rep=100, quantiles=[0.5])[0])


class GpuMeasurer(KernelMeasurer):
    """``do_bench`` median with the L2 flushed on fresh random inputs of the workload's size.

    A step of ``workload.batch`` sequences, the longest ``workload.context`` tokens long and the
    others uniform in [context/2, context], over a randomly permuted KV cache: one query token per
    sequence (decode family), or the workload's ``query_len`` new tokens at the end of each
    (attention family).
    """

    method = "triton.testing.do_bench median, L2 flushed, fresh random inputs"
    torch_device = "cuda"

    def __init__(self, device: str, *, audit_target: str | None, num_kv_heads: int = 8,
                 seed: int = 0) -> None:
        super().__init__(device, audit_target=audit_target, num_kv_heads=num_kv_heads, seed=seed)

    def _timing_inputs(self, config: VariantConfig, workload: Workload, seed: int) -> dict:
        import torch

        from kgen.reference import feature_arguments

        dev = self.torch_device
        gen = torch.Generator(device=dev).manual_seed(seed)
        lens = torch.randint(max(1, workload.context // 2), workload.context + 1,
                             (workload.batch,), generator=gen, device=dev, dtype=torch.int32)
        lens[0] = workload.context
        pages = (lens + config.block_size - 1) // config.block_size  # [batch]
        max_pages = int(pages.max())
        num_blocks = int(pages.sum())
        perm = torch.randperm(num_blocks, generator=gen, device=dev).to(torch.int32)
        tables = torch.zeros(workload.batch, max_pages, dtype=torch.int32, device=dev)
        offsets = torch.cumsum(pages, 0) - pages
        cols = torch.arange(max_pages, device=dev)
        valid = cols[None, :] < pages[:, None]  # [batch, max_pages]
        tables[valid] = perm[(offsets[:, None] + cols[None, :])[valid]]
        shape = (num_blocks, config.block_size, self.num_kv_heads, config.head_dim)
        dtype, kv_dtype = config.torch_dtype, config.kv_torch_dtype
        heads = self.num_kv_heads * config.group_size
        window = tuning_window(workload.context) if config.has("sliding_window") else None
        rows = workload.batch  # decode: one query row per sequence
        extra = {}
        if config.family == "attention":  # the varlen contract: query_len rows per sequence
            q_lens = torch.clamp(lens, max=workload.query_len)
            rows = int(q_lens.sum())
            starts = torch.zeros(workload.batch + 1, dtype=torch.int32, device=dev)
            starts[1:] = torch.cumsum(q_lens, 0)
            extra["query_start_loc"] = starts
        return {"query": torch.randn(rows, heads, config.head_dim, device=dev,
                                     generator=gen, dtype=dtype), **extra,
                "key_cache": torch.randn(shape, device=dev, generator=gen, dtype=dtype).to(kv_dtype),
                "value_cache": torch.randn(shape, device=dev, generator=gen, dtype=dtype).to(kv_dtype),
                "block_tables": tables, "seq_lens": lens, "scale": config.head_dim ** -0.5,
                **feature_arguments(heads, self.num_kv_heads, features=config.features,
                                    scale_kind="head" if config.kv_fp8 else None,
                                    sliding_window=window, soft_cap=TUNING_SOFT_CAP,
                                    device=dev)}

    def time(self, module, config: VariantConfig, workload: Workload) -> Measurement:
        import torch

        self._seed_counter += 1
        inputs = self._timing_inputs(config, workload, 1_000_003 * self._seed_counter)
        out = torch.empty_like(inputs["query"])
        if config.family == "attention":
            kernel = functools.partial(module.paged_attention, max_query_len=workload.query_len)
        else:
            kernel = module.paged_attention_decode

        def step():
            kernel(**inputs, out=out, max_seq_len=workload.context)

        step()
        torch.cuda.synchronize()
        ms = _do_bench(step)
        del inputs, out
        extra = {"num_kv_heads": self.num_kv_heads}
        if config.has("sliding_window"):
            extra["sliding_window"] = tuning_window(workload.context)
        return Measurement("ok", time_ms=ms, extra=extra)
