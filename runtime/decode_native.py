"""Paged decode on the CPU with a small C kernel that reads each K/V row once, in place.

The ``torch`` backend (:mod:`runtime.decode_torch`) must gather every decode sequence's context
into a contiguous copy before SDPA reads it again: three passes over the K/V bytes. This backend
calls ``kgen_paged_decode`` (``runtime/native/paged_decode.c``, built on first use by
:mod:`runtime.native_build`), which walks each sequence's block table and reads every live K and
V row from memory once, straight from its block: on one layer of the mixed benchmark's 64-sequence
batch it is 3.12x (one thread) and 4.63x (two) faster than the grouped gather + SDPA path, reading
14.7 and 31.1 GB/s of K/V (``bench/results/cpu_kernels.md``).

Inputs are those of the other backends: queries in the model's dtype (float32, bfloat16 or
float16), the layer's NHD caches (the model's dtype, or fp8 codes decoded through a 256-entry
table), int32 block tables and sequence lengths; a layer's soft-cap is applied to its scores. The
kernel computes in float32 and rounds its output to the model's dtype; on a CPU with AVX512-BF16
a bfloat16 model's scores are VDPBF16PS dot products (:func:`runtime.native_build.native_info`).
Only positions ``[max(0, len - window), len)`` are read (all with no window), so freed
(out-of-window) table entries are never touched. What the kernel must not read is refused before
it reads anything, naming the value: a cache of another shape, dtype or layout (non-contiguous),
queries of another shape or dtype, a length beyond the block table's capacity, a block id outside
the pool. Threads: ``torch.get_num_threads()``. A build with OpenMP (the
usual one) hands the sequences out one at a time to torch's own OpenMP threads (the library binds
to the ``libgomp`` torch loaded), so the threads that just ran a matmul, still spinning, pick up
the attention; without OpenMP the sequences are cut into chunks of about equal work run on Python
threads (ctypes releases the GIL while the C code runs).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

from runtime.config import layer_windows
from runtime.native_build import FP8_CODE, TYPE_CODES, load_native, load_paged_decode, why_unavailable

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
    if dtype not in TYPE_CODES:
        return f"dtype={dtype}: the native decode kernel takes float32, bfloat16 or float16 (use backend='torch')"
    if num_heads > 256 or head_dim > 1024:
        return f"num_heads={num_heads}, head_dim={head_dim}: the native kernel takes at most 256 heads of 1024"
    if head_dim % 16:
        return f"head_dim={head_dim}: the native kernel needs a multiple of 16 (it works in 16-float vectors)"
    if load_paged_decode() is None:
        return why_unavailable()
    if dtype == torch.float16 and not load_native().float16:
        return "dtype=torch.float16: this C compiler has no _Float16, so the native kernels were built without it"
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
        if num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(f"backend='native': num_heads={num_heads} is not a multiple of "
                             f"num_kv_heads={num_kv_heads}")
        self.fn = load_paged_decode()
        self.dtype = dtype
        self.block_size, self.num_kv_heads, self.num_heads = block_size, num_kv_heads, num_heads
        self.head_dim, self.num_blocks = head_dim, num_blocks
        self.windows = layer_windows(layers)
        self._pool: ThreadPoolExecutor | None = None
        self._checked: set = set()  # (key, value) data pointers of caches already checked

    @property
    def kernel(self) -> str:
        """What decodes: the element types and, for bfloat16, how the scores are taken."""
        info = load_native().info
        dot = " (VDPBF16PS scores)" if self.dtype == torch.bfloat16 and info["bf16_dot"] else ""
        return f"native paged decode, {str(self.dtype)[6:]}{dot}, {info['isa']}"

    def prepare(self, meta) -> None:
        """Per window: int32 starts, the thread split and the scratch buffers."""
        lens = meta.seq_lens.to(torch.int32).contiguous()
        tables = meta.block_tables.to(torch.int32).contiguous()
        if tables.dim() != 2 or tables.shape[0] != lens.shape[0]:
            raise ValueError(f"block_tables {tuple(tables.shape)} must be [num_decodes={lens.shape[0]}, max_blocks]")
        threads = max(1, min(torch.get_num_threads(), meta.num_decodes))
        meta.extra["native_tables"] = tables
        meta.extra["native_threads"] = threads
        if threads > 1 and not self.fn.openmp and (self._pool is None or self._pool._max_workers != threads):
            self._pool = ThreadPoolExecutor(threads, thread_name_prefix="kgen-decode")
        for window in self.windows:
            self._plan(meta, lens, window)

    def _plan(self, meta, lens: torch.Tensor, window: int | None) -> tuple:
        """(starts, lens, chunks, work): with an OpenMP build one chunk of every sequence and one
        scratch area per thread; else one chunk of about equal work, and its scratch, per thread.
        A scratch area holds a head's scores over the longest live context, plus q and the
        output in float32 (for a bfloat16/float16 model)."""
        starts = (lens - window).clamp_(min=0) if window is not None else torch.zeros_like(lens)
        counts = (lens - starts).tolist()
        threads = meta.extra["native_threads"]
        per_head = 2 * self.head_dim
        if self.fn.openmp:
            chunks = [(0, len(counts))]
            work = [torch.empty(threads, self.num_heads * (max(counts) + per_head))]
        else:
            chunks = split_work(counts, threads)
            work = [torch.empty(1, self.num_heads * (max(counts[b:e]) + per_head)) for b, e in chunks]
        plan = meta.extra[("native_decode", window)] = (starts.contiguous(), lens, chunks, work)
        return plan

    def _check_cache(self, layer) -> None:
        """Refuse, naming it, a cache the kernel would misread: another shape, dtype or layout."""
        key, value = layer.key, layer.value
        ident = (key.data_ptr(), value.data_ptr(), key.dtype, tuple(key.shape), key.stride(), value.stride())
        if ident in self._checked:
            return
        want = (self.num_blocks, self.block_size, self.num_kv_heads, self.head_dim)
        for name, cache in (("key", key), ("value", value)):
            if cache.device.type != "cpu" or tuple(cache.shape[1:]) != want[1:] or cache.shape[0] < self.num_blocks:
                raise ValueError(f"native decode: the {name} cache {tuple(cache.shape)} on {cache.device} must be a "
                                 f"CPU tensor [num_blocks>={want[0]}, {want[1]}, {want[2]}, {want[3]}]")
            if not cache.is_contiguous():
                raise ValueError(f"native decode: the {name} cache {tuple(cache.shape)} has strides {cache.stride()}; "
                                 f"the kernel reads contiguous NHD blocks only")
        if value.dtype != key.dtype:
            raise ValueError(f"native decode: key cache {key.dtype} and value cache {value.dtype} differ")
        if layer.quantized:
            if key.element_size() != 1:
                raise ValueError(f"native decode: a cache of {key.dtype} for a {layer.dtype} model; the kernel "
                                 f"reads the model's dtype or fp8")
        elif key.dtype != self.dtype:
            raise ValueError(f"native decode: the cache holds {key.dtype} but the model computes in {self.dtype}")
        self._checked.add(ident)

    def decode(self, q: torch.Tensor, layer, meta, scale: float, *, sliding_window: int | None = None,
               logits_soft_cap: float | None = None) -> torch.Tensor:
        """q: ``[B, num_heads, head_dim]`` in the model's dtype -> the same shape and dtype;
        ``layer`` a ``LayerKV``."""
        plan = meta.extra.get(("native_decode", sliding_window))
        if plan is None:  # a window no layer announced: plan it now
            plan = self._plan(meta, meta.seq_lens.to(torch.int32).contiguous(), sliding_window)
        starts, lens, chunks, work = plan
        tables = meta.extra["native_tables"]
        if tuple(q.shape) != (lens.shape[0], self.num_heads, self.head_dim) or q.dtype != self.dtype:
            raise ValueError(f"native decode: q {tuple(q.shape)} {q.dtype} must be [{lens.shape[0]}, "
                             f"{self.num_heads}, {self.head_dim}] of {self.dtype}")
        self._check_cache(layer)
        q = q.contiguous()
        out = torch.empty_like(q)
        lut = fp8_table(layer.key.dtype).data_ptr() if layer.quantized else None
        types = TYPE_CODES[self.dtype] + 16 * (FP8_CODE if layer.quantized else TYPE_CODES[self.dtype])
        args = (q.data_ptr(), layer.key.data_ptr(), layer.value.data_ptr(), lut, tables.data_ptr(), tables.shape[1],
                starts.data_ptr(), lens.data_ptr())
        tail = (self.num_heads, self.num_kv_heads, self.head_dim, self.block_size, self.num_blocks,
                scale * layer.k_scale, logits_soft_cap or 0.0, layer.v_scale, out.data_ptr())
        if len(chunks) == 1:  # one chunk: all sequences, on OpenMP threads or this one
            threads = meta.extra["native_threads"] if self.fn.openmp else 1
            codes = [self.fn(*args, 0, chunks[0][1], *tail, work[0].data_ptr(), work[0].shape[1], threads, types)]
        else:
            futures = [self._pool.submit(self.fn, *args, b, e, *tail, w.data_ptr(), w.shape[1], 1, types)
                       for (b, e), w in zip(chunks, work)]
            codes = [f.result() for f in futures]
        for rc in codes:
            if rc:
                raise ValueError(self._error(rc, meta, starts, lens, tables))
        return out

    def _error(self, rc: int, meta, starts, lens, tables) -> str:
        """The message of a kernel's refusal code (``paged_decode.c``: E_SHAPE, E_TYPE, E_SEQ)."""
        if rc == 1:
            return (f"native decode: num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                    f"head_dim={self.head_dim}, block_size={self.block_size}: a shape the kernel cannot run")
        if rc == 2:
            return f"native decode: dtype={self.dtype} with this cache: element types this library lacks"
        s, kind = divmod(rc - 16, 4)
        start, n = int(starts[s]), int(lens[s])
        if kind == 1:
            return (f"decode sequence {s}: live range [{start}, {n}) does not fit its block table "
                    f"({tables.shape[1]} blocks of {self.block_size} = {tables.shape[1] * self.block_size} positions)")
        if kind == 2:
            return f"decode sequence {s}: length {n} needs more scratch than was planned for this step"
        return (f"decode sequence {s} has a block id outside [0, {self.num_blocks}) in its live range: "
                f"{meta.block_tables[s].tolist()}")
