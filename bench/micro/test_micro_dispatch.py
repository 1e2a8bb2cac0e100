"""Dispatch: the cost of asking for the kernel of a decode step whose bucket was seen before."""

from kgen.dispatch import Dispatcher
from kgen.paths import default_db_dir

STEP = dict(dtype="bf16", head_dim=128, block_size=16, group_size=8, num_seqs=37, max_context=3000)


def test_dispatch_hit(benchmark):
    """``Dispatcher.kernel_for`` on a cached step: bucket the shape, one dict lookup."""
    dispatcher = Dispatcher("h200", default_db_dir())  # the committed H200 records
    first = dispatcher.kernel_for(**STEP)  # miss: lookup + render + import (not timed)
    assert benchmark(dispatcher.kernel_for, **STEP) is first


def test_dispatch_hit_other_step_same_bucket(benchmark):
    """A different batch and context in the same buckets is also a hit (no lookup, no build)."""
    dispatcher = Dispatcher("h200", default_db_dir())
    first = dispatcher.kernel_for(**STEP)
    other = dict(STEP, num_seqs=33, max_context=2100)
    assert benchmark(dispatcher.kernel_for, **other) is first
