"""Paged decode on the CPU with a small C kernel that reads each K/V row once, in place.

The ``torch`` backend (:mod:`runtime.decode_torch`) must gather every decode sequence's context
into a contiguous copy before SDPA reads it again: three passes over the K/V bytes. This backend
calls ``kgen_paged_decode`` (``runtime/native/paged_decode.c``, built on first use by
:mod:`runtime.native_build`), which walks each sequence's block table and reads every live K and
V row from memory once, straight from its block: on one layer of the mixed benchmark's 64-sequence
batch it is 3.12x (one thread) and 4.63x (two) faster than the grouped gather + SDPA path, reading
14.7 and 31.1 GB/s of K/V (``bench/results/cpu_kernels.md``).

Inputs are those of the other backends: the layer's NHD caches (fp32, or fp8 codes decoded
through a 256-entry table), int32 block tables and sequence lengths; a layer's soft-cap is
applied to its scores. Only positions ``[max(0, len - window), len)`` are read (all with no
window), so freed (out-of-window) table entries are never touched; a block id outside the pool
raises an error naming the sequence. Threads: ``torch.get_num_threads()``. A build with OpenMP (the
usual one) hands the sequences out one at a time to torch's own OpenMP threads (the library binds
to the ``libgomp`` torch loaded), so the threads that just ran a matmul, still spinning, pick up
the attention; without OpenMP the sequences are cut into chunks of about equal work run on Python
threads (ctypes releases the GIL while the C code runs).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

from runtime.config import layer_windows
from runtime.native_build import load_paged_decode, why_unavailable

_LUTS: dict = {}


def fp8_table(dtype: torch.dtype) -> torch.Tensor:
    """float32 ``[256]``: the value of every fp8 code of ``dtype``."""
    if dtype not in _LUTS:
        _LUTS[dtype] = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dtype).float().contiguous()
    return _LUTS[dtype]


def native_lacks(dtype: torch.dtype, num_heads: int, head_dim: int, device: torch.device) -> str | None:
    """Why the C kernel cannot decode this model here (a message naming the value), or None."""
    if device.type != "cpu":
        return f"device={str(device)!r}: the native decode kernel runs on the CPU only"
    if dtype != torch.float32:
        return f"dtype={dtype}: the native decode kernel computes in float32 only (use backend='torch')"
    if num_heads > 256 or head_dim > 1024:
        return f"num_heads={num_heads}, head_dim={head_dim}: the native kernel takes at most 256 heads of 1024"
    if head_dim % 16:
        return f"head_dim={head_dim}: the native kernel needs a multiple of 16 (it works in 16-float vectors)"
    if load_paged_decode() is None:
        return why_unavailable()
    return None


def split_work(counts: list[int], parts: int) -> list[tuple[int, int]]:
    """Cut sequences ``[0, len(counts))`` into at most ``parts`` runs of about equal total count."""
    total = sum(counts)
    bounds, acc, begin = [], 0, 0
    for i, c in enumerate(counts):
        acc += c
        if len(bounds) < parts - 1 and acc * parts >= total * (len(bounds) + 1) and i + 1 < len(counts):
            bounds.append((begin, i + 1))
            begin = i + 1
    bounds.append((begin, len(counts)))
    return bounds


class NativeDecode:
    """Decode backend over :func:`runtime.native_build.load_paged_decode` (see the module docstring).

    Parameters
    ----------
    block_size, num_kv_heads, num_heads, head_dim : int
    num_blocks : int
        Blocks in the pool (the kernel refuses ids outside it).
    layers : sequence of LayerAttention
        Each layer's settings; the starts are built once per distinct window.
    dtype, device
        The model's; what the kernel cannot serve is a ValueError naming it (:func:`native_lacks`).
    """

    name = "native"

    def __init__(self, block_size: int, num_kv_heads: int, num_heads: int, head_dim: int, num_blocks: int,
                 layers=(), dtype: torch.dtype = torch.float32, device=torch.device("cpu")) -> None:
        missing = native_lacks(dtype, num_heads, head_dim, torch.device(device))
        if missing:
            raise ValueError(f"backend='native': {missing}")
        self.fn = load_paged_decode()
        self.block_size, self.num_kv_heads, self.num_heads = block_size, num_kv_heads, num_heads
        self.head_dim, self.num_blocks = head_dim, num_blocks
        self.windows = layer_windows(layers)
        self._pool: ThreadPoolExecutor | None = None

    def prepare(self, meta) -> None:
        """Per window: int32 starts, the thread split and the scratch buffers."""
        lens = meta.seq_lens.to(torch.int32).contiguous()
        threads = max(1, min(torch.get_num_threads(), meta.num_decodes))
        meta.extra["native_tables"] = meta.block_tables.to(torch.int32).contiguous()
        meta.extra["native_threads"] = threads
        if threads > 1 and not self.fn.openmp and (self._pool is None or self._pool._max_workers != threads):
            self._pool = ThreadPoolExecutor(threads, thread_name_prefix="kgen-decode")
        for window in self.windows:
            self._plan(meta, lens, window)

    def _plan(self, meta, lens: torch.Tensor, window: int | None) -> tuple:
        """(starts, lens, chunks, work): with an OpenMP build one chunk of every sequence and one
        scratch area per thread; else one chunk of about equal work, and its scratch, per thread."""
        starts = (lens - window).clamp_(min=0) if window is not None else torch.zeros_like(lens)
        counts = (lens - starts).tolist()
        threads = meta.extra["native_threads"]
        if self.fn.openmp:
            chunks = [(0, len(counts))]
            work = [torch.empty(threads, self.num_heads * max(counts))]
        else:
            chunks = split_work(counts, threads)
            work = [torch.empty(1, self.num_heads * max(counts[b:e])) for b, e in chunks]
        plan = meta.extra[("native_decode", window)] = (starts.contiguous(), lens, chunks, work)
        return plan

    def decode(self, q: torch.Tensor, layer, meta, scale: float, *, sliding_window: int | None = None,
               logits_soft_cap: float | None = None) -> torch.Tensor:
        """q: float32 [B, num_heads, head_dim] -> [B, num_heads, head_dim]; ``layer`` a ``LayerKV``."""
        plan = meta.extra.get(("native_decode", sliding_window))
        if plan is None:  # a window no layer announced: plan it now
            plan = self._plan(meta, meta.seq_lens.to(torch.int32).contiguous(), sliding_window)
        starts, lens, chunks, work = plan
        tables = meta.extra["native_tables"]
        q = q.contiguous()
        out = torch.empty_like(q)
        lut = fp8_table(layer.key.dtype).data_ptr() if layer.quantized else None
        args = (q.data_ptr(), layer.key.data_ptr(), layer.value.data_ptr(), lut, tables.data_ptr(), tables.stride(0),
                starts.data_ptr(), lens.data_ptr())
        tail = (self.num_heads, self.num_kv_heads, self.head_dim, self.block_size, self.num_blocks,
                scale * layer.k_scale, logits_soft_cap or 0.0, layer.v_scale, out.data_ptr())
        if len(chunks) == 1:  # one chunk: all sequences, on OpenMP threads or this one
            threads = meta.extra["native_threads"] if self.fn.openmp else 1
            codes = [self.fn(*args, 0, chunks[0][1], *tail, work[0].data_ptr(), work[0].shape[1], threads)]
        else:
            futures = [self._pool.submit(self.fn, *args, b, e, *tail, w.data_ptr(), w.shape[1], 1)
                       for (b, e), w in zip(chunks, work)]
            codes = [f.result() for f in futures]
        for rc in codes:
            if rc:
                s = -1 - rc
                raise RuntimeError(f"decode sequence {s} has a block id outside [0, {self.num_blocks}) in its live "
                                   f"range: {meta.block_tables[s].tolist()}")
        return out
