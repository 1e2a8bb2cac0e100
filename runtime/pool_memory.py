"""Whether a KV pool can exist on its device, checked before anything of it is allocated.

A pool costs its KV tensor (``num_blocks * bytes_per_block``, on the model's device) and the
block pool's Python bookkeeping (reference counts and the free queue's links: about
:data:`HOST_BYTES_PER_BLOCK` of host memory per block, measured by ``tests/test_pool_memory.py``).
A pool larger than the memory the device has free would end in the kernel's out-of-memory killer,
a bare ``MemoryError`` or torch's allocator error; :func:`check_pool_fits` refuses it first, by
name. Free memory is, on the CPU, ``MemAvailable`` from ``/proc/meminfo`` (else ``os.sysconf``'s
available pages), lowered to the cgroup's limit minus its usage where a cgroup caps the process;
on CUDA, ``torch.cuda.mem_get_info`` of the device (its host part is checked against the CPU's).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["HOST_BYTES_PER_BLOCK", "available_bytes", "check_pool_fits", "check_engine_pool"]

HOST_BYTES_PER_BLOCK = 80
"""Host bytes per block of the block pool and free queue (CPython 3.11 measures 64)."""

_CGROUP_FILES = (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),                # v2
                 ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"))


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _cgroup_room() -> int | None:
    """The cgroup's memory limit minus its usage, or None without a limit."""
    for limit_file, usage_file in _CGROUP_FILES:
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:  # "max" or a huge number: no limit
            return max(0, int(limit) - usage)
    return None


def available_bytes(device) -> int | None:
    """Bytes free for a new allocation on ``device`` (a torch.device), or None when unknown."""
    if getattr(device, "type", None) == "cuda":
        import torch

        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    known = [b for b in (_meminfo_available(), _cgroup_room()) if b is not None]
    return min(known) if known else None


def _gb(n: int) -> str:
    """Bytes in the largest unit (decimal) that keeps the number at least 1: ``2.05 TB``."""
    for unit, scale in (("PB", 1e15), ("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} bytes"


def check_pool_fits(num_blocks: int, block_size: int, bytes_per_block: int, device, *, given: str) -> None:
    """Raise ValueError (naming ``given``, the argument that sized the pool) when a pool of
    ``num_blocks`` blocks of ``bytes_per_block`` KV bytes does not fit the free memory of
    ``device`` (its KV tensor) and of the host (its Python bookkeeping, and the tensor on the CPU).
    ``bytes_per_block=0`` checks the bookkeeping alone (:class:`runtime.block_pool.BlockPool`).
    """
    device_type = getattr(device, "type", str(device).split(":")[0])
    kv = num_blocks * bytes_per_block
    host = num_blocks * HOST_BYTES_PER_BLOCK
    kv_text = f"{_gb(kv)} of KV cache ({num_blocks} blocks x {bytes_per_block} bytes, block_size={block_size})"
    host_text = f"{_gb(host)} of block bookkeeping ({num_blocks} blocks x {HOST_BYTES_PER_BLOCK} bytes)"
    needs = {"cpu": (host + kv, f"{kv_text} and {host_text}") if device_type == "cpu" and kv else (host, host_text)}
    if device_type != "cpu" and kv:
        needs[device_type] = (kv, kv_text)
    for where, (need, what) in needs.items():
        free = available_bytes(_device(where, device))
        if free is not None and need > free:
            raise ValueError(f"{given}: the KV pool needs {what} on {where}, but only {_gb(free)} is free there; "
                             f"give a smaller num_blocks / kv_cache_bytes / block_size")


def _device(where: str, device):
    import torch

    return torch.device("cpu") if where == "cpu" else torch.device(device)


def check_engine_pool(model, num_blocks, block_size, kv_cache_dtype: str) -> None:
    """The engine's pool of ``model`` (a :class:`runtime.model.decoder.DecoderModel`): sizes
    checked, then its memory (CUDA graphs' one scratch block is left to the margin)."""
    for name, value in (("num_blocks", num_blocks), ("block_size", block_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive int")
    check_pool_fits(num_blocks, block_size, model.bytes_per_block(block_size, kv_cache_dtype),
                    model.device, given=f"num_blocks={num_blocks}, block_size={block_size}")
