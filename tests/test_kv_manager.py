"""KVCacheManager: a hypothesis state machine over allocate / append / fork / COW / free / prefix
reuse / sliding-window release with a simulated KV cache, sharing savings for n > 1 and beam
search, in-group sharing on recompute, bad input, no torch."""

import random
import subprocess
import sys

import pytest
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from runtime.block_pool import NoFreeBlocksError
from runtime.kv_layout import NULL_BLOCK, window_blocks, window_start
from runtime.kv_manager import KVCacheManager
from runtime.sequence import Sequence

BS = 4
NUM_BLOCKS = 24
POISON = -1
BASE_PROMPTS = [[random.Random(k).randrange(1, 1000) for _ in range(14)] for k in range(3)]


class KVMachine(RuleBasedStateMachine):
    """Drives the manager like an engine would and keeps a fake KV cache (one token id per slot).

    Invariants: reference counts equal table references, a block is free iff unreferenced, the
    cache holds exactly each live sequence's computed tokens at its slots (so COW and prefix reuse
    gave the right data), cached blocks hold their key's tokens, and stats agree with the tables.
    With a sliding window: the tokens inside each sequence's window are readable and right, every
    entry wholly below it is freed, and no sequence holds more than ``window_blocks`` blocks.
    """

    @initialize(caching=st.booleans(), window=st.sampled_from([None, None, 1, 3, 5, 8]))
    def setup(self, caching, window):
        self.window = window
        self.kv = KVCacheManager(NUM_BLOCKS, BS, enable_prefix_caching=caching, watermark=0.0,
                                 sliding_window=window)
        self.kv_cache = [POISON] * (NUM_BLOCKS * BS)
        self.live: list[Sequence] = []
        self.next_id = 0
        self.rng = random.Random(0)

    def _new_id(self):
        self.next_id += 1
        return self.next_id

    def _prefill(self, seq):
        """Allocate and 'run' the prefill over the uncached tokens, then sample one token."""
        if not self.kv.can_allocate(seq):
            with pytest.raises(NoFreeBlocksError):
                self.kv.allocate(seq)
            return False
        self.kv.allocate(seq)
        cached = seq.num_cached_tokens
        for pos in range(window_start(cached, self.window), cached):  # the reused prefix the prefill reads
            assert self.kv_cache[self.kv.slot(seq, pos)] == seq.token_ids[pos]
        for pos in range(cached, len(seq)):  # a windowed prefill stores only what the window keeps
            if seq.block_table[pos // BS] != NULL_BLOCK:
                self.kv_cache[self.kv.slot(seq, pos)] = seq.token_ids[pos]
        seq.num_computed_tokens = len(seq)
        seq.append_token(self.rng.randrange(1, 1000))
        self.kv.release_out_of_window(seq)  # what the scheduler does before the next step
        self.live.append(seq)
        return True

    @rule(base=st.integers(0, 2), keep=st.integers(1, 14), extra=st.lists(st.integers(1, 999), max_size=6))
    def add(self, base, keep, extra):
        self._prefill(Sequence(self._new_id(), BASE_PROMPTS[base][:keep] + extra))

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 99), token=st.integers(1, 999))
    def decode(self, i, token):
        seq = self.live[i % len(self.live)]
        if not self.kv.can_append([seq]):
            with pytest.raises(NoFreeBlocksError):
                self.kv.append_slot(seq)
            return
        for src, dst in self.kv.append_slot(seq):
            assert self.kv.pool.ref_count(src) >= 1 and self.kv.pool.ref_count(dst) == 1
            self.kv_cache[dst * BS:(dst + 1) * BS] = self.kv_cache[src * BS:(src + 1) * BS]
        pos = len(seq) - 1
        self.kv_cache[self.kv.slot(seq, pos)] = seq.token_ids[pos]
        seq.num_computed_tokens = len(seq)
        seq.append_token(token)
        self.kv.release_out_of_window(seq)

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 99), token=st.integers(1, 999))
    def fork(self, i, token):
        parent = self.live[i % len(self.live)]
        child = parent.fork(self._new_id())
        child.token_ids[-1] = token  # a beam choosing another candidate for the uncomputed token
        self.kv.fork(parent, child)
        self.live.append(child)

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 99))
    def free(self, i):
        self.kv.free(self.live.pop(i % len(self.live)))

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 99))
    def preempt_and_recompute(self, i):
        seq = self.live.pop(i % len(self.live))
        self.kv.free(seq)
        seq.reset_for_recompute()
        seq.token_ids.pop()  # recompute prefills every token; it then samples the next one again
        self._prefill(seq)

    @invariant()
    def refcounts_match_tables(self):
        refs = [0] * NUM_BLOCKS
        for s in self.live:
            for b in s.block_table:
                if b != NULL_BLOCK:
                    refs[b] += 1
        free = set(self.kv.pool.free_blocks())
        for b in range(NUM_BLOCKS):
            assert self.kv.pool.ref_count(b) == refs[b]
            assert (b in free) == (refs[b] == 0)  # never both free and used
        st_ = self.kv.stats()
        assert st_["blocks_in_use"] == sum(r > 0 for r in refs)
        assert st_["shared_blocks"] == sum(r > 1 for r in refs)
        assert st_["logical_blocks"] == sum(refs)
        assert st_["blocks_saved_by_sharing"] == sum(refs) - st_["blocks_in_use"]

    @invariant()
    def cache_holds_each_sequences_tokens(self):
        for s in self.live:
            assert len(s.block_table) == self.kv.num_blocks_for(len(s) - 1)
            start = window_start(s.num_computed_tokens, self.window)
            got = [self.kv_cache[self.kv.slot(s, p)] for p in range(start, s.num_computed_tokens)]
            assert got == s.token_ids[start:s.num_computed_tokens]
            if self.window is not None:
                freed = start // BS
                assert all(b == NULL_BLOCK for b in s.block_table[:min(freed, len(s.block_table) - 1)])
                held = sum(b != NULL_BLOCK for b in s.block_table)
                assert held == self.kv.num_held_blocks(s) <= window_blocks(self.window, BS)
        cache = self.kv.prefix_cache
        for key, b in cache.entries() if cache else []:
            assert tuple(self.kv_cache[b * BS:(b + 1) * BS]) == key.token_ids
        # poison free blocks that hold no cached prefix: a wrongly reused block shows up as garbage
        cached = {b for _, b in cache.entries()} if cache else set()
        for b in self.kv.pool.free_blocks():
            if b not in cached:
                self.kv_cache[b * BS:(b + 1) * BS] = [POISON] * BS

    def teardown(self):
        if not hasattr(self, "kv"):
            return
        for s in self.live:
            self.kv.free(s)
        assert self.kv.pool.num_free == NUM_BLOCKS
        assert all(self.kv.pool.ref_count(b) == 0 for b in range(NUM_BLOCKS))
        assert self.kv.stats()["blocks_in_use"] == 0


KVMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=30, deadline=None)
TestKVMachine = KVMachine.TestCase


def _decode_all(kv, seqs, rng, lengths):
    """Decode each unfinished seq one token per step until it reaches its output length."""
    while any(len(s.output_token_ids) < lengths[s.seq_id] for s in seqs):
        for s in seqs:
            if len(s.output_token_ids) < lengths[s.seq_id]:
                kv.append_slot(s)
                s.num_computed_tokens = len(s)
                s.append_token(rng.randrange(1, 1000))
        yield


@pytest.mark.parametrize("n", [2, 4])
def test_parallel_sampling_shares_full_prompt_blocks(n):
    bs, prompt_len = 8, 37  # 4 full prompt blocks + a partial one that each sample copies on write
    rng = random.Random(n)
    prompt = [rng.randrange(1, 1000) for _ in range(prompt_len)]
    lengths = {i: rng.randrange(10, 40) for i in range(n)}
    shared = KVCacheManager(200, bs, enable_prefix_caching=False)
    parent = Sequence(0, prompt)
    shared.allocate(parent)
    parent.num_computed_tokens = prompt_len
    seqs = [parent] + [parent.fork(i) for i in range(1, n)]
    for child in seqs[1:]:
        shared.fork(parent, child)
    for s in seqs:
        s.append_token(rng.randrange(1, 1000))  # each sample draws its own first token
    alone = KVCacheManager(200, bs, enable_prefix_caching=False)
    for _ in _decode_all(shared, seqs, rng, lengths):
        st_ = shared.stats()
        # the same live token streams without sharing: one private table each
        for s in alone.tracked_seqs():
            alone.free(s)
        for s in seqs:
            alone.allocate(Sequence(100 + s.seq_id, s.token_ids[:-1]))
        without = alone.stats()["blocks_in_use"]
        assert without == st_["logical_blocks"]
        assert without - st_["blocks_in_use"] == st_["blocks_saved_by_sharing"] == (n - 1) * (prompt_len // bs)
    assert shared.stats()["cow_copies"] == n - 1  # the partial prompt block, once per extra sample


def test_beam_search_shares_more_than_sampling():
    bs, width, steps = 4, 4, 40
    rng = random.Random(7)
    kv = KVCacheManager(400, bs, enable_prefix_caching=False)
    root = Sequence(0, [rng.randrange(1, 1000) for _ in range(10)])
    kv.allocate(root)
    root.num_computed_tokens = len(root)
    root.append_token(1)
    beams, next_id, saved = [root], 1, []
    for _ in range(steps):
        for b in beams:
            kv.append_slot(b)
            b.num_computed_tokens = len(b)
        cands = sorted(((b.cumulative_logprob - rng.expovariate(1.0), b, t)
                        for b in beams for t in range(1, width + 1)), key=lambda c: -c[0])[:width]
        new_beams = []
        for score, b, t in cands:
            child = b.fork(next_id)
            next_id += 1
            kv.fork(b, child)
            child.append_token(t, score - child.cumulative_logprob)
            new_beams.append(child)
        for b in beams:
            kv.free(b)
        beams = new_beams
        st_ = kv.stats()
        assert st_["logical_blocks"] == sum(len(b.block_table) for b in beams)
        saved.append(st_["blocks_saved_by_sharing"])
    assert min(saved) > 0 and kv.stats()["cow_copies"] > 0
    for b in beams:
        kv.free(b)
    assert kv.pool.num_free == 400


def test_group_allocation_shares_what_its_sequences_agree_on():
    """Recomputing a preempted n=3 request: the prompt's full blocks and the blocks two beams
    agree on are allocated once; later sequences skip them in their prefill."""
    bs = 4
    prompt = list(range(1, 11))                                # 2 full blocks + 2 tokens
    a = Sequence(0, prompt + [20, 21, 22, 23, 24])             # 15 tokens: blocks 0-2 full
    b = Sequence(1, prompt + [20, 21, 22, 23, 25, 26])         # agrees with a on blocks 0-1 and 2
    c = Sequence(2, prompt + [30])                             # agrees on blocks 0-1 only
    for caching in (False, True):
        kv = KVCacheManager(16, bs, enable_prefix_caching=caching, watermark=0.0)
        alone = sum(kv.num_blocks_for(len(s)) for s in (a, b, c))
        assert kv.blocks_to_admit([a, b, c]) == alone - 2 * 2 - 1 == 6
        kv.allocate_all([a, b, c])
        assert a.block_table[:3] == b.block_table[:3] and a.block_table[:2] == c.block_table[:2]
        assert c.block_table[2] != a.block_table[2] and a.block_table[3] != b.block_table[3]
        assert [s.num_cached_tokens for s in (a, b, c)] == [0, 12, 8]
        assert kv.pool.num_used == 6 and kv.pool.ref_count(a.block_table[0]) == 3
        assert kv.pool.ref_count(a.block_table[2]) == 2
        for s in (a, b, c):
            kv.free(s)
            s.reset_for_recompute()
        assert kv.pool.num_free == 16


def test_windowed_admission_in_a_tight_pool_allocates_only_the_window_and_reuses_a_cached_window():
    bs, window = 4, 5
    kv = KVCacheManager(4, bs, watermark=0.0, sliding_window=window)  # too small to store a whole prompt
    long = Sequence(0, list(range(1, 31)))                      # 30 tokens, blocks 0..7
    kv.allocate(long)
    # after the prefill the next query (position 30) sees 26..30: only blocks 6 and 7 are stored
    assert long.block_table[:6] == [NULL_BLOCK] * 6 and NULL_BLOCK not in long.block_table[6:]
    assert kv.num_held_blocks(long) == 2 == kv.pool.num_used
    long.num_computed_tokens = 30
    long.append_token(99)
    kv.free(long)                                  # block 6 (positions 24..27, computed) stays cached
    cached_block = kv.prefix_cache.entries()[0][1]
    again = Sequence(1, list(range(1, 31)) + [99, 5, 6])        # 33 tokens, blocks 0..8
    kv.allocate(again)
    # a prefill from position 28 reads 24..27 only: block 6 is enough, blocks 0..5 are never needed
    assert again.num_cached_tokens == 28 and again.block_table[6] == cached_block
    assert again.block_table[:6] == [NULL_BLOCK] * 6 and kv.num_held_blocks(again) == 3
    assert kv.stats()["prefix_cache_hit_blocks"] == 1 and kv.stats()["prefill_tokens_skipped"] == 28
    again.num_computed_tokens = 33
    again.append_token(7)
    assert kv.release_out_of_window(again) == 1                 # the cached block leaves the window
    assert kv.num_held_blocks(again) == 2 == window_blocks(window, bs)
    assert kv.stats()["window_freed_blocks"] == 1 and kv.pool.ref_count(cached_block) == 0


def test_windowed_admission_with_room_stores_the_prompt_for_the_prefix_cache():
    """As vLLM: the prefill stores every prompt block, its full blocks enter the prefix cache, the
    out-of-window ones are freed after the step and stay cached, so a later request with the same
    long prefix skips it; while decoding a sequence still holds at most window_blocks."""
    bs, window = 4, 5
    kv = KVCacheManager(32, bs, watermark=0.0, sliding_window=window)
    first = Sequence(0, list(range(1, 31)))                     # 30 tokens, blocks 0..7
    kv.allocate(first)
    assert NULL_BLOCK not in first.block_table and kv.num_held_blocks(first) == 8
    first.num_computed_tokens = 30
    first.append_token(99)
    assert kv.release_out_of_window(first) == 6                 # positions 26.. still seen
    assert kv.num_held_blocks(first) == 2 and len(kv.prefix_cache) == 7
    kv.append_slot(first)
    assert kv.stats()["peak_blocks_per_seq"] == 2 <= window_blocks(window, bs)
    second = Sequence(1, list(range(1, 31)) + [7])              # the same 30 tokens, then another
    kv.allocate(second)
    assert second.num_cached_tokens == 28                       # blocks 0..6 computed: prefill from 28
    assert second.block_table[:6] == [NULL_BLOCK] * 6           # never read by a prefill from 28


def test_bad_input_names_the_value():
    with pytest.raises(ValueError, match="block_size"):
        KVCacheManager(4, 0)
    with pytest.raises(ValueError, match="watermark"):
        KVCacheManager(4, 4, watermark=1.5)
    kv = KVCacheManager(4, 4)
    s = Sequence(3, [1, 2, 3])
    with pytest.raises(ValueError, match="seq_id=3 holds no blocks"):
        kv.append_slot(s)
    kv.allocate(s)
    with pytest.raises(ValueError, match="seq_id=3 already has blocks"):
        kv.allocate(s)
    with pytest.raises(ValueError, match="pos=4"):
        kv.slot(s, 4)
    with pytest.raises(NoFreeBlocksError):
        kv.allocate(Sequence(4, list(range(1, 20))))
    with pytest.raises(ValueError, match="prompt_token_ids"):
        Sequence(5, [])


def test_memory_manager_imports_without_torch_or_kgen():
    code = ("import sys; sys.modules['torch'] = None; sys.modules['kgen'] = None\n"
            "import runtime.sequence, runtime.block_pool, runtime.prefix_cache, runtime.kv_manager, "
            "runtime.scheduler\n"
            "assert 'triton' not in sys.modules\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
