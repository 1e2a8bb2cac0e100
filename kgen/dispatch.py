"""(workload) -> compiled decode kernel: the one door the runtime uses.

Per decode step the runtime asks :meth:`Dispatcher.kernel_for` with the step's shape. The step is
bucketed (powers of two of batch and longest context), the bucket's variant is looked up in the
tuning database (:mod:`kgen.db.lookup`, with its logged fallbacks) and compiled once. The kernel is
cached by the step's bucketed arguments, so a step (whose context grows by one token each time)
costs two bucket computations and a dict lookup, and the cache holds one entry per bucket.

Imports here stay light (no optuna, no pandas); torch/triton load with the first kernel.
"""

from __future__ import annotations

import functools
from typing import Callable

from kgen.db.lookup import DbReader, LookupResult
from kgen.device import default_gpu_name, normalize_gpu_name
from kgen.tune.workload import Workload, bucket


class Dispatcher:
    """Picks and caches a compiled kernel per workload.

    Parameters
    ----------
    gpu : str or None
        GPU name whose tuning records to use (normalized: ``"NVIDIA H100 80GB HBM3"`` -> h100);
        None means the device present, or ``interpreter`` without a GPU (``$KGEN_GPU`` overrides).
    db_dir : path or None
        Tuning database folder; None means :func:`kgen.paths.default_db_dir`.
    """

    def __init__(self, gpu: str | None = None, db_dir=None) -> None:
        self.gpu = normalize_gpu_name(gpu) if gpu else default_gpu_name()
        self.db_dir = db_dir
        self._reader = DbReader(db_dir)
        self._by_step: dict[tuple, Callable] = {}
        self._by_bucket: dict[str, tuple[LookupResult, Callable]] = {}

    def why_unsupported(self, *, dtype, head_dim: int, block_size: int,
                        group_size: int) -> str | None:
        """None when kgen has kernels for this layer shape, else why not (naming the value).

        (Stand-in on branch vllm for the lead's version on main, which replaces it at merge.)
        """
        from kgen.variant import BLOCK_SIZES, GROUP_SIZES, HEAD_DIMS, normalize_dtype

        try:
            normalize_dtype(dtype)
        except ValueError as exc:
            return str(exc)
        if head_dim not in HEAD_DIMS:
            return f"head_dim={head_dim} is not supported (kgen has {', '.join(map(str, HEAD_DIMS))})"
        if block_size not in BLOCK_SIZES:
            return f"block_size={block_size} is not supported (kgen has {', '.join(map(str, BLOCK_SIZES))})"
        if group_size not in GROUP_SIZES:
            return f"group_size={group_size} is not supported (kgen has {GROUP_SIZES[0]}..{GROUP_SIZES[-1]})"
        return None

    def lookup(self, *, dtype, head_dim: int, block_size: int, group_size: int, num_seqs: int,
               max_context: int) -> LookupResult:
        """Which variant a step of this shape gets, and why (no compilation)."""
        return self._reader.lookup(self.gpu, dtype=dtype, head_dim=head_dim,
                                   block_size=block_size, group_size=group_size,
                                   num_seqs=num_seqs, max_context=max_context)

    def kernel_for(self, *, dtype, head_dim: int, block_size: int, group_size: int,
                   num_seqs: int, max_context: int) -> Callable:
        """The ``paged_attention_decode`` callable to use for this decode step's shape.

        Parameters
        ----------
        dtype : str or torch.dtype
            Query / KV-cache dtype.
        head_dim, block_size, group_size : int
            Head size, tokens per KV page, query heads per KV head.
        num_seqs : int
            Sequences in the step (batch).
        max_context : int
            Longest context length in the step, in tokens.
        """
        step = (str(dtype), head_dim, block_size, group_size, bucket(num_seqs, "num_seqs"),
                bucket(max_context, "max_context"))
        kernel = self._by_step.get(step)
        if kernel is not None:
            return kernel
        bucket_key = Workload.for_step(gpu=self.gpu, dtype=dtype, head_dim=head_dim,
                                       block_size=block_size, group_size=group_size,
                                       num_seqs=num_seqs, max_context=max_context).key
        cached = self._by_bucket.get(bucket_key)
        if cached is None:
            from kgen.build import load_kernel

            result = self.lookup(dtype=dtype, head_dim=head_dim, block_size=block_size,
                                 group_size=group_size, num_seqs=num_seqs, max_context=max_context)
            cached = (result, load_kernel(result.config).paged_attention_decode)
            self._by_bucket[bucket_key] = cached
        self._by_step[step] = cached[1]
        return cached[1]

    def chosen(self) -> dict[str, LookupResult]:
        """Workload key -> lookup result, for every bucket dispatched so far."""
        return {key: value[0] for key, value in self._by_bucket.items()}


@functools.lru_cache(maxsize=16)
def _shared(gpu: str, db_dir: str | None) -> Dispatcher:
    return Dispatcher(gpu, db_dir)


def get_dispatcher(gpu: str | None = None, db_dir=None) -> Dispatcher:
    """The process-wide dispatcher for ``gpu`` (None: the device here) and ``db_dir``.

    (Stand-in on branch vllm for the lead's version on main, which replaces it at merge.)
    """
    name = normalize_gpu_name(gpu) if gpu else default_gpu_name()
    return _shared(name, None if db_dir is None else str(db_dir))
