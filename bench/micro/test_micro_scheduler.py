"""One ``Scheduler.schedule()`` call with 256 running sequences decoding (no admission).

Setup (not timed) appends each running sequence's sampled token, as the engine does after a
forward; the timed call plans the next step: 256 ``append_slot`` calls (a new block for the
sequences crossing a block edge, full blocks registered in the prefix cache).
"""

import random

from runtime.kv_manager import KVCacheManager
from runtime.scheduler import Scheduler
from runtime.sequence import Sequence, SequenceGroup

RUNNING = 256
ROUNDS = 300


def test_schedule_256_running(benchmark):
    """One ``Scheduler.schedule()`` with 256 running sequences, each decoding one token."""
    rng = random.Random(0)
    kv = KVCacheManager(16384, 16)
    sched = Scheduler(kv, max_num_seqs=RUNNING, max_num_batched_tokens=65536)
    for r in range(RUNNING):
        prompt = [rng.randrange(3, 32000) for _ in range(rng.randrange(16, 200))]
        sched.add(SequenceGroup(r, [Sequence(r, prompt)]))
    first = sched.schedule()
    assert len(first.prefill_seqs) == RUNNING

    def after_forward():
        for group in sched.running:
            for seq in group.unfinished_seqs():
                seq.num_computed_tokens = len(seq)
                seq.append_token(rng.randrange(3, 32000))

    def step():
        out = sched.schedule()
        assert len(out.decode_seqs) == RUNNING and not out.preempted and not out.prefill_seqs

    benchmark.pedantic(step, setup=after_forward, rounds=ROUNDS, warmup_rounds=5)
