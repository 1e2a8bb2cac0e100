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
  longest context is ``max_context`` tokens, looked up per (batch, context) bucket in the database
  and compiled once per bucket.

Imports stay light (no torch, triton, optuna or pandas): torch and triton load with the first
kernel.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from kgen.shape import AttentionShape
from kgen.workload import bucket


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
    _resolve: Callable = field(repr=False)  # (shape, num_seqs, max_context) -> LookupResult
    _steps: dict = field(default_factory=dict, repr=False)  # (batch, context) bucket -> kernel

    @property
    def block_size(self) -> int:
        """Tokens per KV page the cache should use (and the kernels are compiled for)."""
        return self.shape.block_size

    @property
    def supported(self) -> bool:
        return self.problem is None

    def lookup(self, num_seqs: int, max_context: int):
        """Which variant a step of this size gets, and why (a
        :class:`kgen.db.lookup.LookupResult`; nothing is compiled)."""
        if self.problem is not None:
            raise ValueError(self.problem)
        return self._resolve(self.shape, num_seqs, max_context)

    def kernel(self, num_seqs: int, max_context: int) -> Callable:
        """The ``paged_attention_decode`` callable for a decode step (compiled on first use).

        Parameters
        ----------
        num_seqs : int
            Sequences in the step (>= 1).
        max_context : int
            The longest context in the step, in tokens (>= 1).

        Raises
        ------
        ValueError
            With :attr:`problem` when kgen cannot serve the shape; naming a non-positive size.
        """
        step = (bucket(num_seqs, "num_seqs"), bucket(max_context, "max_context"))
        kernel = self._steps.get(step)
        if kernel is None:
            from kgen.build import load_kernel  # torch and triton load with the first kernel

            kernel = load_kernel(self.lookup(num_seqs, max_context).config).paged_attention_decode
            self._steps[step] = kernel
        return kernel
