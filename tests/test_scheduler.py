"""Scheduler: continuous batching, limits, preemption by recompute (same outputs), aborts.

A fake engine keeps a KV cache of token ids per slot and picks each next token from the context
it *reads back through the block table*, so wrong blocks, a missed copy-on-write or a bad prefix
reuse change the outputs.
"""

import random

import pytest

from runtime.kv_layout import NULL_BLOCK, window_blocks, window_start
from runtime.kv_manager import KVCacheManager
from runtime.scheduler import Scheduler
from runtime.sequence import Sequence, SequenceGroup, SequenceStatus

VOCAB = 500


class FakeEngine:
    """With ``window``, the next token depends on the last ``window`` tokens only (a windowed
    model), read back through the block table; out-of-window entries must never be read."""

    def __init__(self, num_blocks, block_size, *, caching=True, max_num_seqs=64, budget=2048, window=None):
        self.window = window
        self.kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching=caching, sliding_window=window)
        self.max_held = 0
        self.sched = Scheduler(self.kv, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget)
        self.cache = [None] * (num_blocks * block_size)
        self.max_tokens, self.n, self.salt = {}, {}, {}
        self.next_seq = 10_000
        self.outputs = []
        self.chunks = []  # per step: (seq_id, tokens scheduled, tokens uncomputed) of each prefill
        self.unfinished_decodes = []  # per step: decoding seq ids still unfinished after it

    def add(self, request_id, prompt, max_tokens, n=1):
        seq = Sequence(request_id, prompt)
        self.max_tokens[request_id], self.n[request_id], self.salt[request_id] = max_tokens, n, 0
        self.sched.add(SequenceGroup(request_id, [seq]))

    def _next_token(self, seq, fresh_from):
        """Like the engine: a prefill's own tokens (positions >= ``fresh_from``) come from the
        batch, everything before them from the cache."""
        start = window_start(len(seq) - 1, self.window)
        ctx = tuple(self.cache[self.kv.slot(seq, p)] if p < fresh_from else seq.token_ids[p]
                    for p in range(start, len(seq)))
        assert ctx == tuple(seq.token_ids[start:]), f"seq {seq.seq_id} reads a wrong KV context"
        return hash((self.salt[seq.seq_id], ctx)) % VOCAB

    def step(self):
        out = self.sched.schedule()
        self.outputs.append(out)
        self.chunks.append([(s.seq_id, s.num_scheduled_tokens, s.num_uncomputed_tokens)
                            for s in out.prefill_seqs])
        for g in out.preempted:  # back in the queue with no KV state, not re-admitted this step
            assert g in self.sched.waiting and not any(g is r for r in self.sched.running)
            assert all(s.status is SequenceStatus.WAITING and not s.block_table for s in g.unfinished_seqs())
        bs = self.kv.block_size
        for src, dst in out.copies:
            self.cache[dst * bs:(dst + 1) * bs] = self.cache[src * bs:(src + 1) * bs]
        for s in out.prefill_seqs:  # this step's chunk of each prefill
            for p in range(s.num_computed_tokens, s.num_computed_tokens + s.num_scheduled_tokens):
                if s.block_table[p // bs] != NULL_BLOCK:  # a windowed prefill skips what it will not read
                    self.cache[self.kv.slot(s, p)] = s.token_ids[p]
        for s in out.decode_seqs:  # after this step's releases and appends
            self.max_held = max(self.max_held, self.kv.num_held_blocks(s))
        for s in out.decode_seqs:
            self.cache[self.kv.slot(s, len(s) - 1)] = s.token_ids[-1]
        fresh = {s.seq_id: s.num_computed_tokens for s in out.prefill_seqs}
        for s in out.prefill_seqs + out.decode_seqs:
            s.num_computed_tokens += s.num_scheduled_tokens
            if s.num_computed_tokens < len(s):  # a chunk short of the prompt's end: no token yet
                continue
            tok = self._next_token(s, fresh.get(s.seq_id, len(s)))
            s.append_token(tok)
            # n > 1: the first prefill's seq (seq_id == request_id) forks the other samples
            if self.n.get(s.seq_id, 1) > 1 and len(s.output_token_ids) == 1:
                self._fork_samples(s)
        for g in self.sched.running:
            for s in g.unfinished_seqs():
                if len(s.output_token_ids) >= self.max_tokens[g.request_id]:
                    self.sched.finish_seq(s, "length")
        self.unfinished_decodes.append({s.seq_id for s in out.decode_seqs if not s.is_finished()})
        return out, self.sched.free_finished()

    def _fork_samples(self, parent):
        group = next(g for g in self.sched.running if parent in g.seqs)
        for k in range(1, self.n[group.request_id]):
            child = parent.fork(self.next_seq)
            self.salt[child.seq_id] = k
            self.next_seq += 1
            self.kv.fork(parent, child)
            child.token_ids[-1] = hash((k, tuple(child.token_ids[:-1]))) % VOCAB
            group.seqs.append(child)

    def run(self, max_steps=5000):
        finished = {}
        for _ in range(max_steps):
            if not self.sched.has_unfinished():
                return finished
            _, done = self.step()
            for g in done:
                finished[g.request_id] = [s.output_token_ids for s in g.seqs]
        raise AssertionError("did not finish")


def _requests(seed, count, n=1):
    rng = random.Random(seed)
    return [(r, [rng.randrange(VOCAB) for _ in range(rng.randrange(1, 30))], rng.randrange(1, 40), n)
            for r in range(count)]


def _run(requests, num_blocks, bs, **kw):
    eng = FakeEngine(num_blocks, bs, **kw)
    for req in requests:
        eng.add(*req)
    return eng, eng.run()


@pytest.mark.parametrize("caching", [True, False])
@pytest.mark.parametrize("n", [1, 3])
def test_preemption_by_recompute_gives_the_same_outputs(caching, n):
    reqs = _requests(seed=n, count=14, n=n)
    _, ample = _run(reqs, 2000, 4, caching=caching)
    tight, out = _run(reqs, 48, 4, caching=caching)
    assert tight.kv.stats()["preemptions"] > 0
    assert sum(len(o.preempted) for o in tight.outputs) == tight.kv.stats()["preemptions"]
    assert out == ample
    assert all(len(o) == n and all(len(x) == reqs[r][2] for x in o) for r, o in out.items())
    assert tight.kv.pool.num_free == 48 and tight.kv.stats()["blocks_in_use"] == 0


@pytest.mark.parametrize("caching", [True, False])
@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("window", [3, 9])
def test_sliding_window_frees_blocks_and_keeps_outputs_under_preemption(caching, n, window):
    reqs = [(r, p, 20 + 3 * (r % 4) + m, k) for r, p, m, k in _requests(seed=11 + window, count=12, n=n)]
    _, want = _run(reqs, 4000, 4, caching=caching, window=window)  # never short of blocks
    _, full = _run(reqs, 4000, 4, caching=caching)
    assert want != full  # the window changes what the fake model sees
    bs = 4
    # per sequence: a fresh admission takes at most window_blocks; cached hits can add a few
    # for one step, so give the small pool room for one such admission beside the others
    eng, got = _run(reqs, 3 * n * window_blocks(window, bs) + 6, bs, caching=caching, window=window)
    assert got == want
    assert eng.kv.stats()["preemptions"] > 0 and eng.kv.stats()["window_freed_blocks"] > 0
    assert eng.max_held <= window_blocks(window, bs)
    assert eng.kv.pool.num_free == eng.kv.num_blocks


@pytest.mark.parametrize("window,num_blocks,preempts", [(None, 2000, False), (None, 40, True),
                                                        (5, 2000, False), (5, 18, True)])
def test_chunked_prefill_gives_the_same_outputs_and_never_stalls_decodes(window, num_blocks, preempts):
    """A 6-token budget chunks prompts of up to 29 tokens over several steps: the outputs (read
    back through the block tables) equal one-step prefills', with and without a window and under
    preemption, and every running decode runs in every step while prompts are chunked."""
    reqs = _requests(seed=5, count=10, n=2)
    _, want = _run(reqs, 4000, 4, window=window, max_num_seqs=6)
    eng, got = _run(reqs, num_blocks, 4, window=window, max_num_seqs=6, budget=6)
    assert got == want
    assert any(n < left for step in eng.chunks for _, n, left in step), "no prompt was chunked"
    assert all(sum(n for _, n, _ in step) <= 6 for step in eng.chunks)
    for still, after in zip(eng.unfinished_decodes, eng.outputs[1:]):
        if not after.preempted:
            assert still <= {s.seq_id for s in after.decode_seqs}, "a running decode was stalled"
    assert (eng.kv.stats()["preemptions"] > 0) == preempts
    assert eng.kv.pool.num_free == eng.kv.num_blocks


def test_continuous_batching_admits_while_others_decode_and_frees_at_once():
    eng = FakeEngine(60, 4, max_num_seqs=4)
    for req in _requests(seed=3, count=10):
        eng.add(*req)
    mixed = 0
    while eng.sched.has_unfinished():
        out, done = eng.step()
        mixed += bool(out.prefill_seqs and out.decode_seqs)
        assert eng.sched.num_running_seqs <= 4
        for g in done:  # finished requests leave at once, blocks freed
            assert g not in eng.sched.running
            assert all(not eng.kv.is_tracked(s) and s.block_table == [] for s in g.seqs)
        tracked = {s.seq_id for s in eng.kv.tracked_seqs()}
        assert tracked == {s.seq_id for g in eng.sched.running for s in g.unfinished_seqs()}
    assert mixed > 0


def test_parallel_samples_share_prompt_blocks_in_the_scheduler():
    prompt = list(range(1, 34))  # 8 full blocks of 4 + 1 token
    eng = FakeEngine(200, 4, caching=False)
    eng.add(0, prompt, 12, n=4)
    eng.step()  # prefill one seq, fork 3 samples
    eng.step()  # decode: the partial prompt block is copied for 3 of the 4 samples
    st = eng.kv.stats()
    assert st["cow_copies"] == 3
    assert st["blocks_saved_by_sharing"] == 3 * (len(prompt) // 4)
    assert eng.run() and eng.kv.pool.num_free == 200


def test_admission_respects_watermark_and_token_budget():
    kv = KVCacheManager(100, 4, watermark=0.1)  # keeps 10 blocks free
    sched = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=64)
    for r in range(4):  # 10 blocks, 40 tokens each, no common prefix
        sched.add(SequenceGroup(r, [Sequence(r, list(range(100 * r + 1, 100 * r + 41)))]))
    out = sched.schedule()  # 40 + 24 = the 64-token budget: the second prompt is chunked
    assert [(s.seq_id, s.num_scheduled_tokens) for s in out.prefill_seqs] == [(0, 40), (1, 24)]
    for s in out.prefill_seqs:  # as the engine does after the forward
        s.num_computed_tokens += s.num_scheduled_tokens
    out.prefill_seqs[0].append_token(7)
    out = sched.schedule()  # the decode first, then the rest of prompt 1, then prompt 2 (chunked)
    assert [s.seq_id for s in out.decode_seqs] == [0]
    assert [(s.seq_id, s.num_scheduled_tokens) for s in out.prefill_seqs] == [(1, 16), (2, 40), (3, 7)]
    assert out.num_batched_tokens == 64
    big = KVCacheManager(40, 4, watermark=0.1)
    sched = Scheduler(big, max_num_seqs=8, max_num_batched_tokens=4096)
    for r in range(4):
        sched.add(SequenceGroup(r, [Sequence(r, list(range(1, 41)))]))
    assert len(sched.schedule().prefill_seqs) == 3  # a fourth would leave 0 < 4 watermark blocks


def test_requests_too_big_for_the_pool_are_aborted():
    eng = FakeEngine(8, 4)
    eng.add(0, list(range(1, 40)), 5)  # 10 blocks > 8: can never be admitted
    eng.add(1, list(range(1, 20)), 30)  # fits, but cannot grow past 32 tokens alone
    steps = [eng.step()[0] for _ in range(20)]
    aborted = [g.request_id for o in steps for g in o.aborted]
    assert aborted == [0, 1]
    g0, g1 = (next(g for o in steps for g in o.aborted if g.request_id == r) for r in (0, 1))
    s1 = g1.seqs[0]
    assert s1.status is SequenceStatus.FINISHED and s1.finish_reason == "abort"  # never "length"
    assert g0.seqs[0].finish_reason == "abort"
    assert g0.error.startswith("request_id=0 needs 10 KV blocks of 4 tokens to be admitted")
    assert g1.error.startswith("request_id=1 needs 9 KV blocks of 4 tokens to grow")
    assert "num_blocks=8" in g1.error
    # 32 tokens filled the pool; the 33rd was sampled from them but has no slot
    assert len(s1) == 8 * 4 + 1 and not eng.sched.has_unfinished() and eng.kv.pool.num_free == 8


def test_bad_arguments():
    kv = KVCacheManager(8, 4)
    with pytest.raises(ValueError, match="max_num_seqs"):
        Scheduler(kv, max_num_seqs=0)
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=4)
    sched = Scheduler(kv)
    sched.add(SequenceGroup(1, [Sequence(1, [1])]))
    with pytest.raises(ValueError, match="request_id=1"):
        sched.add(SequenceGroup(1, [Sequence(2, [1])]))
    with pytest.raises(ValueError, match="reason"):
        sched.finish_seq(Sequence(3, [1]), "done")
