"""Helpers shared by the kernel tests: non-contiguous copies of the contract's tensors."""

import torch

# L18 orthogonal array, levels 1..3 (column 1 has two): the pairwise design of the feature suites.
# Columns: window, dtype, kv dtype, split, scale form, soft cap, alibi, sinks; a 3-level column
# drives a 2-level factor as 1 -> off, 2/3 -> on.
L18 = ("11111111 11222222 11333333 12112233 12223311 12331122 13121323 13232131 13313212 "
       "21133221 21211332 21322113 22123132 22231213 22312321 23132312 23213123 23321231").split()


def strided(t: torch.Tensor) -> torch.Tensor:
    """The same values in a non-contiguous view: the two dims before head_dim swapped in storage
    (HND pages for caches, head-major for query/out) and 8 padding elements after each row."""
    perm = list(range(t.dim()))
    perm[-3], perm[-2] = perm[-2], perm[-3]
    storage_shape = [t.shape[p] for p in perm]
    storage_shape[-1] += 8
    big = torch.full(storage_shape, float("nan"), dtype=t.dtype, device=t.device)
    view = big.permute(*perm)[..., : t.shape[-1]]  # permute is its own inverse here
    view.copy_(t)
    return view


def strided_index_view(t: torch.Tensor, garbage: int) -> torch.Tensor:
    """An integer tensor (seq_lens [n] or block_tables [n, m]) as a view with non-unit strides:
    every other element of a larger buffer along each dim, the others holding ``garbage`` (a value
    that gives a wrong result, or an out-of-range block id, if a kernel reads it)."""
    big = torch.full([2 * s + 1 for s in t.shape], garbage, dtype=t.dtype, device=t.device)
    view = big[tuple(slice(1, None, 2) for _ in t.shape)]
    view.copy_(t)
    assert not view.is_contiguous() and all(s % 2 == 0 for s in view.stride())
    return view
