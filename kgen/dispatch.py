"""The one door into kgen for engines (kgen's runtime, the vLLM adapter): ``plan(shape)`` once per
kind of attention layer, then ``plan.kernel(num_seqs, max_context, max_query_len)`` per step.

A :class:`Dispatcher` holds one GPU name and one database reader, shared by all its plans.
:meth:`Dispatcher.plan` takes a :class:`kgen.shape.AttentionShape` (normalised once, by the
caller) and returns a :class:`kgen.plan.AttentionPlan`: whether kgen serves the shape on this GPU
(``problem``), which block size the cache should use, and the kernel of each step, looked up per
(batch, context) bucket in the tuning database (:mod:`kgen.db.lookup`, with its logged fallbacks)
and compiled once. Plans are cached per shape, lookups per workload bucket, so every layer and
engine asking about the same shape shares them.

:func:`get_dispatcher` returns one shared dispatcher per (GPU, database folder).

Imports here stay light (no torch, triton, jinja2, optuna or pandas): the first kernel loads them.
"""

from __future__ import annotations

import dataclasses
import functools

from kgen.db.lookup import DbReader, LookupResult
from kgen.device import compute_capability_of, default_gpu_name, family_or_none, normalize_gpu_name
from kgen.paths import default_db_dir
from kgen.plan import AttentionPlan
from kgen.shape import BLOCK_SIZES, DEFAULT_BLOCK_SIZE, AttentionShape
from kgen.workload import Workload

__all__ = ["Dispatcher", "get_dispatcher", "AttentionShape", "AttentionPlan"]


class Dispatcher:
    """Plans kgen's kernels for one GPU; caches plans, lookups and (through them) kernels.

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
        self._plans: dict[AttentionShape, AttentionPlan] = {}
        self._lookups: dict[str, LookupResult] = {}

    def plan(self, shape: AttentionShape) -> AttentionPlan:
        """The plan for attention layers of ``shape`` on this GPU (made once per shape).

        Parameters
        ----------
        shape : AttentionShape
            The layer's static shape; with ``block_size`` None the plan picks it (the database's
            preference for this dtype, head dim, KV dtype and feature set, else 16).

        Returns
        -------
        AttentionPlan
            ``problem`` is None when kgen's kernels serve the shape here, else the reason (an e4m3
            cache on a GPU older than sm_89 included); ``block_size``; ``kernel(num_seqs,
            max_context)`` per step.
        """
        if not isinstance(shape, AttentionShape):
            raise ValueError(f"shape={shape!r} is not a kgen.shape.AttentionShape")
        if shape.block_size is None:  # asked each time: the database may have learnt since
            preferred = self._reader.preferred_block_size(self.gpu, shape)
            source = "database" if preferred in BLOCK_SIZES else "default"
            plan = self.plan(shape.with_block_size(preferred if source == "database"
                                                   else DEFAULT_BLOCK_SIZE))
            return dataclasses.replace(plan, block_size_source=source)  # shares its kernel cache
        found = self._plans.get(shape)
        if found is None:
            cc = compute_capability_of(self.gpu)
            problem = shape.problem(cc, f"{self.gpu} ({family_or_none(self.gpu)}, sm_{cc})")
            found = self._plans[shape] = AttentionPlan(shape, self.gpu, problem, "shape",
                                                       self._resolve)
        return found

    def _resolve(self, shape: AttentionShape, num_seqs: int, max_context: int,
                 max_query_len: int = 1, kernel: str | None = None) -> LookupResult:
        """The database's answer for one step bucket (cached per workload key and family)."""
        key = (Workload.for_step(self.gpu, shape, num_seqs=num_seqs, max_context=max_context,
                                 max_query_len=max_query_len).key, kernel)
        found = self._lookups.get(key)
        if found is None:
            found = self._lookups[key] = self._reader.lookup(
                self.gpu, shape, num_seqs=num_seqs, max_context=max_context,
                max_query_len=max_query_len, kernel=kernel)
        return found

    def chosen(self) -> dict[str, LookupResult]:
        """Workload key -> lookup result, for every bucket planned so far (a family-restricted
        lookup's key says so: ``<key>[decode]``)."""
        return {key + (f"[{kernel}]" if kernel else ""): found
                for (key, kernel), found in self._lookups.items()}


@functools.lru_cache(maxsize=16)
def _shared(gpu: str, db_dir: str | None) -> Dispatcher:
    return Dispatcher(gpu, db_dir)


def get_dispatcher(gpu: str | None = None, db_dir=None) -> Dispatcher:
    """The process-wide dispatcher for ``gpu`` (None: the device here) and ``db_dir``.

    Every engine and layer asking about the same GPU and database shares one reader, one plan per
    shape and one kernel per bucket.
    """
    name = normalize_gpu_name(gpu) if gpu else default_gpu_name()
    return _shared(name, str(db_dir if db_dir is not None else default_db_dir()))
