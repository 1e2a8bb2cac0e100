"""Dispatch: the cost of asking a plan for the kernel of a decode step whose bucket was seen."""

from kgen.dispatch import Dispatcher
from kgen.paths import default_db_dir
from kgen.shape import AttentionShape

SHAPE = AttentionShape(dtype="bf16", head_dim=128, group_size=8, block_size=16)
STEP = dict(num_seqs=37, max_context=3000)


def test_dispatch_hit(benchmark):
    """``AttentionPlan.kernel`` on a cached step: bucket the sizes, one dict lookup."""
    plan = Dispatcher("h200", default_db_dir()).plan(SHAPE)  # the committed H200 records
    first = plan.kernel(**STEP)  # miss: lookup + render + import (not timed)
    assert benchmark(plan.kernel, **STEP) is first


def test_dispatch_hit_other_step_same_bucket(benchmark):
    """A different batch and context in the same buckets is also a hit (no lookup, no build)."""
    plan = Dispatcher("h200", default_db_dir()).plan(SHAPE)
    first = plan.kernel(**STEP)
    other = dict(STEP, num_seqs=33, max_context=2100)
    assert benchmark(plan.kernel, **other) is first
