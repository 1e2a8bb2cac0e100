"""BlockPool and FreeBlockQueue: O(1) linked-list queue against a list model, reference counts."""

import pytest
from hypothesis import given, settings, strategies as st

from runtime.block_pool import BlockPool, FreeBlockQueue, NoFreeBlocksError

N = 12
ops = st.lists(st.tuples(st.sampled_from(["push", "pop", "remove"]), st.integers(0, N - 1)), max_size=60)


@settings(max_examples=150, deadline=None)
@given(initial=st.permutations(range(N)).map(lambda p: p[: N // 2]), ops=ops)
def test_free_queue_matches_list_model(initial, ops):
    q = FreeBlockQueue(N, initial)
    model = list(initial)
    for op, b in ops:
        if op == "push":
            if b in model:
                with pytest.raises(ValueError, match=f"block={b}"):
                    q.push(b)
            else:
                q.push(b)
                model.append(b)
        elif op == "pop":
            if model:
                assert q.pop() == model.pop(0)
            else:
                with pytest.raises(NoFreeBlocksError):
                    q.pop()
        else:
            if b in model:
                q.remove(b)
                model.remove(b)
            else:
                with pytest.raises(ValueError, match=f"block={b}"):
                    q.remove(b)
        assert list(q) == model
        assert len(q) == len(model)
        assert all((x in q) == (x in model) for x in range(N))


def test_pool_allocates_lru_and_counts_references():
    pool = BlockPool(4)
    assert pool.num_free == 4 and pool.num_used == 0
    a, b = pool.allocate(), pool.allocate()
    assert (a, b) == (0, 1) and pool.ref_count(a) == 1 and not pool.is_free(a)
    pool.incref(a)
    assert pool.ref_count(a) == 2
    assert pool.decref(a) == 1 and not pool.is_free(a)
    assert pool.decref(b) == 0 and pool.is_free(b)
    # free queue order: 2, 3 (never used), then 1 (just freed): LRU reuse order
    assert pool.free_blocks() == [2, 3, 1]
    assert [pool.allocate() for _ in range(3)] == [2, 3, 1]
    with pytest.raises(NoFreeBlocksError, match="all 4 blocks"):
        pool.allocate()


def test_pool_revives_free_block_and_calls_evict_hook():
    pool = BlockPool(3)
    evicted = []
    pool.on_evict = evicted.append
    blocks = [pool.allocate() for _ in range(3)]
    assert evicted == [0, 1, 2]
    for b in blocks:
        pool.decref(b)
    pool.incref(1)  # revive from the middle of the free queue
    assert pool.ref_count(1) == 1 and pool.free_blocks() == [0, 2]
    assert pool.allocate() == 0 and evicted[-1] == 0


def test_pool_rejects_bad_input():
    with pytest.raises(ValueError, match="num_blocks"):
        BlockPool(0)
    pool = BlockPool(2)
    with pytest.raises(ValueError, match="block=5"):
        pool.incref(5)
    with pytest.raises(ValueError, match="block=0 is already free"):
        pool.decref(0)
    with pytest.raises(ValueError, match="block=-1"):
        pool.ref_count(-1)
