"""Large CPU buffers on 2 MB pages, where Linux gives transparent huge pages on request.

The KV pool and the packed weights of the native GEMM are read in 64-byte lines scattered over
hundreds of megabytes (blocks anywhere in the pool, panels of every layer in turn); on 4 KB pages
nearly every block or panel is a TLB miss and a page walk on top of the DRAM read. Linux's default
``transparent_hugepage=madvise`` gives 2 MB pages only to memory marked ``MADV_HUGEPAGE``, and
torch marks none (unless ``THP_MEM_ALLOC_ENABLE=1``), so :func:`empty` marks its buffer before the
first touch. Elsewhere (another OS, THP off, a buffer under 2 MB, ``KGEN_HUGE_PAGES=0``) it is a
plain ``torch.empty``; the contents and the API are the same either way.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from pathlib import Path

import torch

HUGE = 2 << 20
_MADV_HUGEPAGE = 14
_THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
_state: dict = {}


def _madvise():
    """libc's madvise where THP can be asked for, else None."""
    if "fn" not in _state:
        fn = None
        try:
            if (sys.platform.startswith("linux") and os.environ.get("KGEN_HUGE_PAGES", "1") != "0"
                    and "[never]" not in _THP.read_text()):
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
                fn = libc.madvise
                fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
        except (OSError, AttributeError):
            fn = None
        _state["fn"] = fn
    return _state["fn"]


def empty(shape, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized contiguous CPU tensor, on 2 MB pages where the OS gives them (see the top)."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    numel = 1
    for size in shape:
        numel *= size
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    madvise = _madvise() if nbytes >= HUGE else None
    if madvise is None:
        return torch.empty(shape, dtype=dtype)
    raw = torch.empty(nbytes + HUGE, dtype=torch.uint8)       # untouched, so not yet backed by any page
    start = -raw.data_ptr() % HUGE
    if madvise(raw.data_ptr() + start, nbytes, _MADV_HUGEPAGE) != 0:  # the kernel rounds to pages
        return raw[:nbytes].view(dtype).view(shape)            # refused: 4 KB pages, still correct
    return raw[start:start + nbytes].view(dtype).view(shape)  # the view keeps `raw`'s storage alive


def zeros(shape, dtype: torch.dtype, device=None) -> torch.Tensor:
    """:func:`empty`, zeroed (the first touch, after the pages were asked for); on another device
    plain ``torch.zeros``."""
    if torch.device(device or "cpu").type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    return empty(shape, dtype).zero_()
