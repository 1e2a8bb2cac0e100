"""The float64 reference and the random paged-data helper the kernel tests trust."""

import math

import pytest
import torch

from kgen.reference import (make_paged_inputs, max_abs_error, paged_attention_reference,
                            within_tolerance)


def _naive(inputs):
    """Token by token, with math.exp: an independent check of the reference."""
    q, k, v = inputs["query"], inputs["key_cache"], inputs["value_cache"]
    tables, lens = inputs["block_tables"], inputs["seq_lens"]
    num_seqs, num_heads, dim = q.shape
    bs, kv_heads = k.shape[1], k.shape[2]
    out = torch.zeros(num_seqs, num_heads, dim, dtype=torch.float64)
    for s in range(num_seqs):
        for h in range(num_heads):
            kh = h // (num_heads // kv_heads)
            rows = [(int(tables[s, t // bs]), t % bs) for t in range(int(lens[s]))]
            scores = [float(q[s, h].double() @ k[b, j, kh].double()) / math.sqrt(dim) for b, j in rows]
            if not scores:
                continue
            top = max(scores)
            weights = [math.exp(x - top) for x in scores]
            for w, (b, j) in zip(weights, rows):
                out[s, h] += w / sum(weights) * v[b, j, kh].double()
    return out


def test_reference_matches_naive_loop():
    inputs = make_paged_inputs(3, 6, 2, 64, 8, [0, 9, 20], "fp32", seed=1, poison_unused=True)
    ref = paged_attention_reference(**inputs)
    assert ref.dtype == torch.float64 and ref.shape == (3, 6, 64)
    assert max_abs_error(ref, _naive(inputs)) < 1e-10
    assert torch.all(ref[0] == 0)


def test_inputs_have_permuted_shared_blocks_and_garbage_past_the_end():
    lens = [64, 64, 64, 64, 30, 0]
    data = make_paged_inputs(6, 4, 2, 64, 16, lens, "bf16", seed=3, poison_unused=True)
    tables, num_blocks = data["block_tables"], data["key_cache"].shape[0]
    assert tables.dtype == torch.int32 and data["seq_lens"].dtype == torch.int32
    assert data["query"].dtype == torch.bfloat16 and data["key_cache"].shape[1:] == (16, 2, 64)
    used = [int(tables[s, j]) for s, n in enumerate(lens) for j in range(-(-n // 16))]
    assert len(set(used)) < len(used), "some blocks must be shared between sequences"
    assert used != sorted(used), "physical blocks must be permuted"
    unused_entries = [int(tables[s, j]) for s, n in enumerate(lens)
                      for j in range(-(-n // 16), tables.shape[1])]
    assert any(not 0 <= b < num_blocks for b in unused_entries), "garbage past the end"
    assert torch.isnan(data["key_cache"][tables[4, 1].long(), 14:].float()).all()  # past len 30
    assert not torch.isnan(data["key_cache"][tables[4, 1].long(), :14].float()).any()


def test_inputs_are_reproducible_and_checked():
    a = make_paged_inputs(2, 2, 1, 64, 8, [5, 9], "fp16", seed=4)
    b = make_paged_inputs(2, 2, 1, 64, 8, [5, 9], "fp16", seed=4)
    assert all(torch.equal(a[n], b[n]) for n in ("query", "key_cache", "block_tables"))
    with pytest.raises(ValueError, match="num_seqs=3"):
        make_paged_inputs(3, 2, 1, 64, 8, [5, 9], "fp16", seed=4)
    with pytest.raises(ValueError, match="num_heads=3"):
        make_paged_inputs(2, 3, 2, 64, 8, [5, 9], "fp16", seed=4)


def test_tolerance_helpers():
    ref = torch.ones(4, dtype=torch.float64)
    assert within_tolerance(ref + 1e-3, ref, "fp16")
    assert not within_tolerance(ref + 1e-2, ref, "fp16")
    assert not within_tolerance(torch.full((4,), float("nan")), ref, "bf16")
    assert max_abs_error(torch.full((4,), float("nan")), ref) == float("inf")
