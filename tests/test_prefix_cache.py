"""Prefix cache: chained keys, reuse of the longest cached prefix, LRU eviction of free cached blocks."""

import random

import pytest

from runtime.block_pool import BlockPool
from runtime.kv_manager import KVCacheManager
from runtime.prefix_cache import PrefixCache, extend_block_hashes, hash_block
from runtime.sequence import Sequence


def test_keys_chain_over_the_whole_prefix():
    a = extend_block_hashes([], [1, 2, 3, 4, 5, 6], 2, 3)
    b = extend_block_hashes([], [9, 9, 3, 4, 5, 6], 2, 3)
    assert a[0] != b[0]
    # same tokens in blocks 1 and 2, different first block: different keys all along the chain
    assert a[1].token_ids == b[1].token_ids and a[1] != b[1] and a[2] != b[2]
    assert a == extend_block_hashes(a[:1], [1, 2, 3, 4, 5, 6], 2, 3)
    assert hash_block(a[0], (3, 4)) == a[1]
    with pytest.raises(ValueError, match="num_full_blocks=4"):
        extend_block_hashes([], [1, 2, 3], 1, 4)


def test_insert_lookup_and_eviction_hook():
    pool = BlockPool(2)
    cache = PrefixCache(pool)
    key = hash_block(None, (1, 2))
    with pytest.raises(ValueError, match="block=0 is free"):
        cache.insert(key, 0)
    b = pool.allocate()
    assert cache.insert(key, b) and cache.lookup(key) == b and cache.hash_of(b) == key
    assert not cache.insert(key, pool.allocate())  # duplicate content stays unregistered
    pool.decref(b)
    assert cache.lookup(key) == b and cache.num_evictable() == 1  # free but still reusable
    assert pool.allocate() == b  # allocation reaches it: evicted
    assert cache.lookup(key) is None and cache.num_evictions == 1


def _computed_seq(kv, seq_id, tokens):
    s = Sequence(seq_id, tokens)
    kv.allocate(s)
    s.num_computed_tokens = len(s)  # as if the prefill ran
    return s


def test_longest_cached_prefix_is_reused_and_last_token_recomputed():
    rng = random.Random(1)
    bs = 4
    kv = KVCacheManager(32, bs)
    prompt = [rng.randrange(1000) for _ in range(4 * bs)]  # exactly 4 full blocks
    a = _computed_seq(kv, 0, prompt)
    kv.free(a)  # registers the 4 computed full blocks
    # same prompt: only 3 blocks may come from the cache (the last token must be recomputed)
    b = Sequence(1, prompt)
    kv.allocate(b)
    assert b.num_cached_tokens == 3 * bs == b.num_computed_tokens
    assert b.block_table[:3] == a_blocks_of(prompt, kv)[:3]
    # diverging inside block 2: blocks 0 and 1 shared, the rest new
    c_tokens = prompt[: 2 * bs + 1] + [rng.randrange(1000) for _ in range(10)]
    c = Sequence(2, c_tokens)
    kv.allocate(c)
    assert c.num_cached_tokens == 2 * bs and c.block_table[:2] == b.block_table[:2]
    assert kv.pool.ref_count(b.block_table[0]) == 2
    assert set(c.block_table[2:]).isdisjoint(b.block_table)
    st = kv.stats()
    assert st["prefix_cache_hit_blocks"] == 5 and st["prefix_cache_hit_tokens"] == 5 * bs


def a_blocks_of(tokens, kv):
    keys = extend_block_hashes([], tokens, kv.block_size, len(tokens) // kv.block_size)
    return [kv.prefix_cache.lookup(k) for k in keys]


def test_uncomputed_blocks_are_never_cached_and_caching_can_be_off():
    prompt = list(range(40))
    kv = KVCacheManager(16, 8)
    a = Sequence(0, prompt)
    kv.allocate(a)  # engine never reports computed tokens
    kv.free(a)
    b = Sequence(1, prompt)
    kv.allocate(b)
    assert b.num_cached_tokens == 0
    off = KVCacheManager(16, 8, enable_prefix_caching=False)
    a = _computed_seq(off, 0, prompt)
    off.free(a)
    b = Sequence(1, prompt)
    off.allocate(b)
    assert b.num_cached_tokens == 0 and off.stats()["cached_blocks"] == 0


def test_freed_cached_blocks_are_evicted_least_recently_used_first():
    bs = 2
    kv = KVCacheManager(6, bs, watermark=0.0)
    old = _computed_seq(kv, 0, [1, 2, 3, 4, 5])   # 3 blocks: 2 full cached + 1 partial
    new = _computed_seq(kv, 1, [7, 8, 9, 10, 11])  # 3 blocks
    kv.free(old)
    kv.free(new)
    assert kv.stats()["evictable_cached_blocks"] == 4
    # a fresh 2-block sequence takes the two least recently freed blocks: old's tail first
    # (its partial block, then its second full block); everything else stays cached
    x = _computed_seq(kv, 2, [20, 21, 22])
    assert x.num_cached_tokens == 0
    old_blocks, new_blocks = a_blocks_of([1, 2, 3, 4], kv), a_blocks_of([7, 8, 9, 10], kv)
    assert old_blocks[0] is not None and old_blocks[1] is None
    assert None not in new_blocks
    assert kv.stats()["prefix_cache_evictions"] == 1
    again_new = Sequence(3, [7, 8, 9, 10, 11])
    kv.allocate(again_new)
    assert again_new.num_cached_tokens == 4 and again_new.block_table[:2] == new_blocks
