"""The one door into kgen for engines (kgen's runtime, the vLLM adapter): supported?, which block
size, which kernel.

A :class:`Dispatcher` holds one GPU name and one database reader, shared by all its questions:

- :meth:`Dispatcher.why_unsupported` -- None when kgen's kernel space covers a layer's shape and
  dtype, else a reason naming the value (callers fall back to their own attention and say why);
- :meth:`Dispatcher.preferred_block_size` -- the KV block size the tuning database recorded as
  fastest for this GPU, dtype and head dim;
- :meth:`Dispatcher.kernel_for` -- the compiled ``paged_attention_decode`` for one decode step.
  The step is bucketed (powers of two of batch and longest context), the bucket's variant is
  looked up in the tuning database (:mod:`kgen.db.lookup`, with its logged fallbacks) and compiled
  once. Kernels are cached by the step's bucketed arguments, so a step (whose context grows by one
  token each time) costs two bucket computations and a dict lookup.

:func:`get_dispatcher` returns one shared dispatcher per (GPU, database folder), so an engine that
asks several questions reads the database and resolves the GPU once.

Imports here stay light (no optuna, no pandas, no torch); torch/triton load with the first kernel.
"""

from __future__ import annotations

import functools
from typing import Callable

from kgen.build import load_kernel
from kgen.db.lookup import DbReader, LookupResult
from kgen.device import default_gpu_name, family_or_none, normalize_gpu_name
from kgen.dtypes import DTYPES, KV_DTYPES, kv_torch_dtype, normalize_dtype, normalize_kv_dtype, torch_dtype
from kgen.features import FEATURES, normalize_features
from kgen.paths import default_db_dir
from kgen.space import FP8_E4M3_MIN_CC
from kgen.variant import BLOCK_SIZES, GROUP_SIZES, HEAD_DIMS
from kgen.workload import Workload, bucket

__all__ = ["Dispatcher", "get_dispatcher", "normalize_dtype", "torch_dtype", "kv_torch_dtype",
           "normalize_kv_dtype", "DTYPES",
           "HEAD_DIMS", "BLOCK_SIZES", "GROUP_SIZES", "KV_DTYPES", "FEATURES"]


# GPU families older than sm_89, where Triton has no e4m3 (fp8e4nv) conversion.
PRE_SM89_FAMILIES = ("volta", "turing", "ampere")


def _support_problem(*, dtype, head_dim: int, block_size: int, group_size: int,
                     kv_dtype="auto", features=()) -> str | None:
    """The first reason kgen's kernel space does not cover a shape, or None."""
    try:
        normalize_dtype(dtype)
        normalize_kv_dtype(kv_dtype)
        normalize_features(features)
    except ValueError as exc:
        return str(exc)
    if head_dim not in HEAD_DIMS:
        return f"head_dim={head_dim} is not supported (kgen has {', '.join(map(str, HEAD_DIMS))})"
    if block_size not in BLOCK_SIZES:
        return (f"block_size={block_size} is not supported "
                f"(kgen has {', '.join(map(str, BLOCK_SIZES))})")
    if group_size not in GROUP_SIZES:
        return (f"group_size={group_size} (query heads per KV head) is not supported "
                f"(kgen has {GROUP_SIZES[0]}..{GROUP_SIZES[-1]})")
    return None


class Dispatcher:
    """Answers an engine's questions about kgen's kernels for one GPU; caches compiled kernels.

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

    # ---- questions that compile nothing -----------------------------------------------------
    def why_unsupported(self, *, dtype, head_dim: int, block_size: int, group_size: int,
                        kv_dtype="auto", features=()) -> str | None:
        """None when kgen has kernels for this layer shape, else why not (naming the value).

        Parameters
        ----------
        dtype : str or torch.dtype
            Query dtype (``fp16``, ``bf16``, ``fp32`` or a torch dtype); the KV cache's too with
            ``kv_dtype="auto"``.
        head_dim, block_size, group_size : int
            Head size, tokens per KV page, query heads per KV head.
        kv_dtype : str or torch.dtype
            ``auto``, ``fp8_e4m3`` (``torch.float8_e4m3fn``) or ``fp8_e5m2``. An e4m3 cache on a
            GPU older than sm_89 (A100 ...) is unsupported: Triton cannot convert e4m3 there.
        features : iterable of str
            Attention features the layer needs: any of ``sliding_window``, ``soft_cap``,
            ``alibi``, ``sinks``.
        """
        problem = _support_problem(dtype=dtype, head_dim=head_dim, block_size=block_size,
                                   group_size=group_size, kv_dtype=kv_dtype, features=features)
        if problem or normalize_kv_dtype(kv_dtype) != "fp8_e4m3":
            return problem
        if family_or_none(self.gpu) in PRE_SM89_FAMILIES:
            return (f"kv_dtype=fp8_e4m3 is not supported on {self.gpu} ({family_or_none(self.gpu)}): "
                    f"Triton converts e4m3 only on sm_{FP8_E4M3_MIN_CC}+; use fp8_e5m2")
        return None

    def supports(self, **shape) -> bool:
        """``why_unsupported(**shape) is None``."""
        return self.why_unsupported(**shape) is None

    def preferred_block_size(self, *, dtype, head_dim: int, kv_dtype="auto",
                             features=()) -> int | None:
        """The block size the database recorded as fastest for this GPU, dtype and head dim
        (and KV dtype / features: their records are kept apart from plain ones).

        None when nothing is recorded (callers then use their own default, usually 16).
        """
        found = self._reader.preferred_block_size(self.gpu, dtype=dtype, head_dim=head_dim,
                                                  kv_dtype=kv_dtype, features=features)
        return found if found in BLOCK_SIZES else None

    def lookup(self, *, dtype, head_dim: int, block_size: int, group_size: int, num_seqs: int,
               max_context: int, kv_dtype="auto", features=()) -> LookupResult:
        """Which variant a step of this shape gets, and why (no compilation)."""
        return self._reader.lookup(self.gpu, dtype=dtype, head_dim=head_dim,
                                   block_size=block_size, group_size=group_size,
                                   num_seqs=num_seqs, max_context=max_context,
                                   kv_dtype=kv_dtype, features=features)

    # ---- the kernel for a step --------------------------------------------------------------
    def kernel_for(self, *, dtype, head_dim: int, block_size: int, group_size: int,
                   num_seqs: int, max_context: int, kv_dtype="auto", features=()) -> Callable:
        """The ``paged_attention_decode`` callable to use for this decode step's shape.

        Parameters
        ----------
        dtype : str or torch.dtype
            Query dtype (and the KV cache's with ``kv_dtype="auto"``).
        head_dim, block_size, group_size : int
            Head size, tokens per KV page, query heads per KV head.
        num_seqs : int
            Sequences in the step (batch).
        max_context : int
            Longest context length in the step, in tokens.
        kv_dtype : str or torch.dtype
            ``auto``, ``fp8_e4m3`` or ``fp8_e5m2``: the cache's element type.
        features : iterable of str
            Attention features compiled into the kernel (``sliding_window``, ``soft_cap``,
            ``alibi``, ``sinks``); the callable then takes their arguments. Only records of this
            KV dtype and feature set are used (a plain record is never served here).

        Raises
        ------
        ValueError
            When the shape is outside kgen's space (the message is :meth:`why_unsupported`'s).
        """
        if not isinstance(features, tuple):  # a list or set is not hashable / not ordered
            features = tuple(features) if not isinstance(features, str) else (features,)
        step = (str(dtype), head_dim, block_size, group_size, bucket(num_seqs, "num_seqs"),
                bucket(max_context, "max_context"), str(kv_dtype), features)
        kernel = self._by_step.get(step)
        if kernel is not None:
            return kernel
        problem = self.why_unsupported(dtype=dtype, head_dim=head_dim, block_size=block_size,
                                       group_size=group_size, kv_dtype=kv_dtype,
                                       features=features)
        if problem:
            raise ValueError(problem)
        bucket_key = Workload.for_step(gpu=self.gpu, dtype=dtype, head_dim=head_dim,
                                       block_size=block_size, group_size=group_size,
                                       num_seqs=num_seqs, max_context=max_context,
                                       kv_dtype=kv_dtype, features=features).key
        cached = self._by_bucket.get(bucket_key)
        if cached is None:
            # torch and triton load here, with the first kernel's module, not at import
            result = self.lookup(dtype=dtype, head_dim=head_dim, block_size=block_size,
                                 group_size=group_size, num_seqs=num_seqs, max_context=max_context,
                                 kv_dtype=kv_dtype, features=features)
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

    Every engine and layer asking about the same GPU and database shares one reader and one
    kernel cache.
    """
    name = normalize_gpu_name(gpu) if gpu else default_gpu_name()
    return _shared(name, str(db_dir if db_dir is not None else default_db_dir()))
