"""The allocator (``runtime.kv_manager`` over ``runtime.block_pool``): one call per round.

Each round starts from a fresh state built by ``setup`` (not timed): a pool of 4096 blocks of 16
tokens with prefix caching on and one allocated sequence whose full blocks are already registered
in the prefix cache (the steady state of a decoding sequence).
"""

import random

import pytest

from runtime.kv_manager import KVCacheManager
from runtime.sequence import Sequence

ROUNDS = 2000
BS = 16


def _prompt(seed: int, n: int = 64) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 32000) for _ in range(n)]


def _allocated(seed: int, n: int = 64):
    kv = KVCacheManager(4096, BS)
    seq = Sequence(0, _prompt(seed, n))
    kv.allocate(seq)
    seq.num_computed_tokens = len(seq)
    kv.mark_computed(seq)  # register its full blocks now, as the previous steps would have
    return kv, seq


def _run(benchmark, fn, setup):
    counter = iter(range(10 ** 9))
    return benchmark.pedantic(fn, setup=lambda: setup(next(counter)), rounds=ROUNDS, warmup_rounds=20)


@pytest.mark.parametrize("length, what", [
    (65, "One decode token that lands in the sequence's last, private, block (65 -> 66 tokens)."),
    (64, "One decode token that starts a new block (64 -> 65 tokens): a block from the free queue."),
], ids=["same_block", "new_block"])
def test_append_slot(benchmark, length, what):
    benchmark.extra_info["what"] = what

    def setup(i):
        kv, seq = _allocated(i, length)
        seq.append_token(7)
        return (kv, seq), {}

    _run(benchmark, lambda kv, seq: kv.append_slot(seq), setup)


def test_fork(benchmark):
    """A child sharing all of a 70-token parent's 5 blocks (reference counts + 1)."""
    def setup(i):
        kv, seq = _allocated(i, 70)
        return (kv, seq, seq.fork(1)), {}

    _run(benchmark, lambda kv, parent, child: kv.fork(parent, child), setup)


def test_copy_on_write(benchmark):
    """A forked child's decode token in the shared, partly filled last block: a private copy."""
    def setup(i):
        kv, seq = _allocated(i, 70)
        child = seq.fork(1)
        kv.fork(seq, child)
        child.append_token(9)
        return (kv, child), {}

    def cow(kv, child):
        assert kv.append_slot(child)  # one (src, dst) copy

    _run(benchmark, cow, setup)


def test_free(benchmark):
    """Release a 70-token sequence: 5 reference counts dropped, its 4 full blocks kept in the
    prefix cache's LRU, the partial tail block freed."""
    def setup(i):
        return _allocated(i, 70), {}

    _run(benchmark, lambda kv, seq: kv.free(seq), setup)
