"""AttentionPlan: what kgen does for one attention layer shape on one GPU, made once, used per step.

In the manner of FlashInfer's ``plan()`` / ``run()``: an engine asks
:meth:`kgen.dispatch.Dispatcher.plan` once per kind of attention layer (at start-up), keeps the
plan, and asks it for the kernel of each step. The plan holds

- ``problem``: None when kgen's kernels cover the shape on this GPU, else the reason, naming the
  value (the engine then uses its own attention and says why);
- ``block_size``: the shape's own, or the one the tuning database recorded as fastest for this
  shape's dtype, head dim, KV dtype and features (records of another KV dtype or feature set never
  choose it), else 16; ``block_size_source`` says which;
- :meth:`AttentionPlan.kernel`: the compiled kernel for a step of ``num_seqs`` sequences whose
  longest context is ``max_context`` tokens and whose longest query is ``max_query_len`` tokens,
  with the any-query-length contract (``paged_attention(query, key_cache, value_cache,
  block_tables, seq_lens, query_start_loc, ...)``): decodes, speculative decodes, prefill chunks
  and mixed batches alike. It is looked up per (batch, context, query length) bucket in the
  database and compiled once per bucket; for a decode step (``max_query_len=1``) the record may be
  of either family, whichever was measured faster (a decode-family kernel then runs behind the
  same contract);
- :meth:`AttentionPlan.decode_kernel`: the decode family's ``paged_attention_decode`` for a step
  in which every sequence has one query token (decode records only).

Imports stay light (no torch, triton, optuna or pandas): torch and triton load with the first
kernel.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from kgen.shape import AttentionShape
from kgen.workload import bucket, query_bucket


@dataclass(eq=False)
class AttentionPlan:
    """One layer shape's plan on one GPU (see the module docstring).

    Attributes
    ----------
    shape : AttentionShape
        The layer's shape with its block size set.
    gpu : str
        The normalized GPU name whose records are used.
    problem : str or None
        Why kgen's kernels cannot serve the shape here; None when they can.
    block_size_source : str
        ``shape`` (given by the caller), ``database`` (the tuned preference) or ``default`` (16).
    """

    shape: AttentionShape
    gpu: str
    problem: str | None
    block_size_source: str
    _resolve: Callable = field(repr=False)  # (shape, num_seqs, max_context, q, kernel) -> LookupResult
    _steps: dict = field(default_factory=dict, repr=False)  # (contract, buckets) -> kernel

    @property
    def block_size(self) -> int:
        """Tokens per KV page the cache should use (and the kernels are compiled for)."""
        return self.shape.block_size

    @property
    def supported(self) -> bool:
        return self.problem is None

    def lookup(self, num_seqs: int, max_context: int, max_query_len: int = 1,
               kernel: str | None = None):
        """Which variant a step of this size gets, and why (a
        :class:`kgen.db.lookup.LookupResult`; nothing is compiled). ``kernel`` restricts the
        records to one family (None: either)."""
        if self.problem is not None:
            raise ValueError(self.problem)
        return self._resolve(self.shape, num_seqs, max_context, max_query_len, kernel)

    def kernel(self, num_seqs: int, max_context: int, max_query_len: int = 1) -> Callable:
        """The ``paged_attention`` callable (any query length) for a step (compiled on first use).

        Parameters
        ----------
        num_seqs : int
            Sequences in the step (>= 1).
        max_context : int
            The longest ``seq_lens`` entry in the step, in tokens (>= 1), new tokens included.
        max_query_len : int
            The most query tokens of one sequence in the step (1: a decode step).

        Raises
        ------
        ValueError
            With :attr:`problem` when kgen cannot serve the shape; naming a non-positive size.
        """
        step = ("any", bucket(num_seqs, "num_seqs"), bucket(max_context, "max_context"),
                query_bucket(max_query_len))
        found = self._steps.get(step)
        if found is None:
            from kgen.build import load_kernel  # torch and triton load with the first kernel

            config = self.lookup(num_seqs, max_context, max_query_len).config
            module = load_kernel(config)
            found = (module.paged_attention if config.family == "attention"
                     else decode_as_attention(module.paged_attention_decode))
            self._steps[step] = found
        return found

    def decode_kernel(self, num_seqs: int, max_context: int) -> Callable:
        """The decode family's ``paged_attention_decode`` callable for a step in which every
        sequence has one query token (decode records only; compiled on first use).

        Parameters and errors as :meth:`kernel`.
        """
        step = ("decode", bucket(num_seqs, "num_seqs"), bucket(max_context, "max_context"))
        found = self._steps.get(step)
        if found is None:
            from kgen.build import load_kernel  # torch and triton load with the first kernel

            config = self.lookup(num_seqs, max_context, kernel="decode").config
            found = self._steps[step] = load_kernel(config).paged_attention_decode
        return found


def variant_key(kernel: Callable) -> str | None:
    """The variant key of a kernel callable a plan handed out (a module's launcher, or a decode
    launcher behind the any-length contract)."""
    return getattr(kernel, "VARIANT_KEY", None) or getattr(kernel, "__globals__", {}).get("VARIANT_KEY")


def decode_as_attention(decode: Callable) -> Callable:
    """A decode-family kernel behind the any-query-length contract (for steps of one query token
    per sequence: ``query`` has one row per sequence, in order).

    The rows must be sequence i's only token for every i; the shapes say so (``query.shape[0] ==
    seq_lens.shape[0]``) and ``validate=True`` also checks ``query_start_loc`` is ``0, 1, .., n``
    (a device sync). ``max_seq_len`` (a bound) plans the decode kernel's split-K as it does there,
    so with the bound given the launches depend on shapes and the bound only.
    """

    def paged_attention(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, *,
                        max_query_len=None, max_seq_len=None, scale=None, k_scale=None,
                        v_scale=None, sliding_window=None, logits_soft_cap=None,
                        alibi_slopes=None, sinks=None, out=None, validate=False):
        rows, seqs = query.shape[0], seq_lens.shape[0]
        variant = decode.__globals__.get("VARIANT_KEY", "a decode variant")
        if rows != seqs or (max_query_len is not None and max_query_len != 1):
            raise ValueError(f"query.shape[0]={rows} rows for {seqs} sequences (max_query_len="
                             f"{max_query_len}): {variant} serves one query token per sequence")
        if validate:
            import torch

            want = torch.arange(seqs + 1, dtype=query_start_loc.dtype, device=query_start_loc.device)
            if query_start_loc.shape != want.shape or not bool((query_start_loc == want).all()):
                raise ValueError(f"query_start_loc={query_start_loc.tolist()} is not 0..{seqs}: "
                                 f"{variant} serves one query token per sequence")
        extra = {name: value for name, value in (
            ("k_scale", k_scale), ("v_scale", v_scale), ("sliding_window", sliding_window),
            ("logits_soft_cap", logits_soft_cap), ("alibi_slopes", alibi_slopes),
            ("sinks", sinks)) if value is not None}
        return decode(query, key_cache, value_cache, block_tables, seq_lens, scale=scale, out=out,
                      max_seq_len=max_seq_len, validate=validate, **extra)

    paged_attention.VARIANT_KEY = decode.__globals__.get("VARIANT_KEY")
    return paged_attention
