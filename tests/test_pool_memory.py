"""A KV pool that cannot exist on its device is refused by name before anything is allocated.

Before: ``num_blocks=10**9`` grew the block pool's Python lists until the kernel's OOM killer
ended the process; ``kv_cache_bytes=10**15`` raised a bare ``MemoryError`` from block_pool.py;
huge ``num_blocks`` / ``block_size`` raised torch's raw allocator error. The pool's bytes (KV
tensor and bookkeeping) are now checked against the device's free memory first. The absurd sizes
run in a child process under an address-space limit, so a regression fails there with a
MemoryError instead of taking this machine's memory.
"""

import subprocess
import sys
import textwrap
import tracemalloc

import pytest
import torch

import runtime
from helpers_checkpoint import make_llama
from runtime import pool_memory
from runtime.kv_manager import KVCacheManager

ABSURD = {  # what generate() is given -> the argument the error names
    "num_blocks=10**9": "num_blocks=1000000000, block_size=16",
    "kv_cache_bytes=10**15": "kv_cache_bytes=1000000000000000, block_size=16",
    "num_blocks=2 * 10**6, block_size=10**9": "num_blocks=2000000, block_size=1000000000",
    "block_size=10**10": "block_size=10000000000",
}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("poolmem")
    make_llama(path, hidden=32, heads=2, kv_heads=1, layers=1, vocab=64, max_pos=64)
    return path


def test_absurd_pools_are_refused_by_name_before_allocating(ckpt):
    calls = "\n".join(f"""
        try:
            runtime.generate(model, [[3, 4, 5]], runtime.SamplingParams(max_tokens=2), {args})
            print("accepted", {args!r})
        except ValueError as err:
            print("refused", err)
        except BaseException as err:
            print("raw", type(err).__name__, {args!r})""" for args in ABSURD)
    script = textwrap.dedent(f"""
        import resource, runtime
        model = runtime.load_model({str(ckpt)!r}, device="cpu")
        vm = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) << 10
        resource.setrlimit(resource.RLIMIT_AS, (vm + (3 << 30),) * 2)  # a regression: MemoryError here
        """) + textwrap.dedent(calls)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    lines = out.stdout.splitlines()
    assert len(lines) == len(ABSURD), out.stderr
    for line, given in zip(lines, ABSURD.values()):
        assert line.startswith(f"refused {given}: the KV pool needs "), line
        assert "is free there" in line


def test_the_check_counts_the_kv_tensor_and_the_bookkeeping(ckpt, monkeypatch):
    loaded = runtime.load_model(ckpt, device="cpu")
    per_block = loaded.model.bytes_per_block(4)
    need = 100 * (per_block + pool_memory.HOST_BYTES_PER_BLOCK)
    monkeypatch.setattr(pool_memory, "available_bytes", lambda device: need - 1)
    with pytest.raises(ValueError, match=r"num_blocks=100, block_size=4: the KV pool needs .* of KV cache "
                                         rf"\(100 blocks x {per_block} bytes, block_size=4\) and 8 kB of block "
                                         r"bookkeeping .* on cpu"):
        runtime.Engine(loaded, num_blocks=100, block_size=4)
    with pytest.raises(ValueError, match=r"num_blocks=100, block_size=4: the KV pool needs"):
        runtime.generate(loaded, [[3, 4]], num_blocks=100, block_size=4)
    monkeypatch.setattr(pool_memory, "available_bytes", lambda device: need)
    assert runtime.Engine(loaded, num_blocks=100, block_size=4).kv_cache.nbytes == 100 * per_block


def test_a_gpu_pool_is_checked_against_the_gpus_free_memory(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 << 20, 80 << 30))
    pool_memory.check_pool_fits(1000, 16, 10_000, "cuda:0", given="num_blocks=1000")  # 10 MB: fits
    with pytest.raises(ValueError, match=r"num_blocks=2000: the KV pool needs 20 MB of KV cache .* on cuda, "
                                         r"but only 10.5 MB is free there"):
        pool_memory.check_pool_fits(2000, 16, 10_000, "cuda:0", given="num_blocks=2000")


def test_the_block_pool_checks_its_own_lists():
    with pytest.raises(ValueError, match=r"num_blocks=10000000000000: the KV pool needs 800 TB of block bookkeeping"):
        runtime.block_pool.BlockPool(10 ** 13)


def test_host_bytes_per_block_covers_what_the_pool_really_takes():
    tracemalloc.start()
    try:
        manager = KVCacheManager(100_000, 16, enable_prefix_caching=True, watermark=0.01)
        used, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert manager.pool.num_free == 100_000
    assert 16 < used / 100_000 <= pool_memory.HOST_BYTES_PER_BLOCK
