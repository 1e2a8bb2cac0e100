"""Sliding windows and logit soft-caps in the torch and native (C) attention paths, against
float64 references.

Lengths sit at window and block edges (W - 1, W, W + 1, multiples of the block size); block
tables are permuted pool blocks with a shared one, and cache slots outside every sequence hold
large garbage, so reading a slot the window excludes shows up.
"""

import pytest
import torch

from runtime.attention import AttentionMetadata, PrefillSpan, prefill_attention
from runtime.config import LayerAttention
from runtime.kv_cache import LayerKV
from test_model_parity import cpu_backend, random_paged_case


def reference(q, k, v, q_pos, scale, window, cap):
    """float64 attention of queries at positions q_pos over keys at positions 0..len(k)-1.

    q: [n, H, D]; k, v: [ctx, H, D] (KV heads already expanded). Returns [n, H, D] float64.
    """
    q, k, v = q.double(), k.double(), v.double()
    s = torch.einsum("nhd,thd->hnt", q, k) * scale
    if cap is not None:
        s = cap * torch.tanh(s / cap)
    j = torch.arange(k.shape[0])[None, :]
    p = torch.as_tensor(q_pos)[:, None]
    visible = (j <= p) & ((j > p - window) if window is not None else True)
    s = s.masked_fill(~visible, float("-inf"))
    return torch.einsum("hnt,thd->nhd", torch.softmax(s, dim=-1), v)


def gather_context(cache, table, n, bs):
    """Positions 0..n-1 of one sequence from a paged cache [blocks, bs, kvh, D] -> [n, kvh, D]."""
    blocks = table[: -(-n // bs)].long()
    return cache[blocks].reshape(-1, *cache.shape[2:])[:n]


@pytest.mark.parametrize("name", ["torch", "native"])
@pytest.mark.parametrize("window,cap", [(5, None), (8, None), (None, 0.7), (5, 0.7), (64, 0.7)])
def test_cpu_decode_window_and_soft_cap(name, window, cap):
    bs, kvh, group, d = 4, 2, 3, 16
    lens = [1, 4, 5, 6, 8, 9, 13, 23]   # around W = 5 and 8 and the block edges
    q, kc, vc, tables, seq_lens = random_paged_case(bs, kvh, group, d, lens, seed=window or 1)
    q = q * 3  # scores of a few units, so that a cap of 0.7 really bends them
    meta = AttentionMetadata(slot_mapping=None, prefills=[], num_prefill_tokens=0, block_tables=tables,
                             seq_lens=seq_lens, max_seq_len=max(lens))
    layers = [LayerAttention(0.25, window, cap), LayerAttention(0.25)]
    backend = cpu_backend(name, bs, kvh, kvh * group, d, kc.shape[0], layers=layers)
    backend.prepare(meta)
    tag = "torch_decode" if name == "torch" else "native_decode"
    assert {key[1] for key in meta.extra if key[0] == tag} == {window, None}  # one plan per distinct window
    out = backend.decode(q, LayerKV(kc, vc, 1.0, 1.0, kc.dtype), meta, 0.25, sliding_window=window,
                         logits_soft_cap=cap)
    for i, n in enumerate(lens):
        k = gather_context(kc, tables[i], n, bs).repeat_interleave(group, dim=1)
        v = gather_context(vc, tables[i], n, bs).repeat_interleave(group, dim=1)
        ref = reference(q[i:i + 1], k, v, [n - 1], 0.25, window, cap)[0]
        torch.testing.assert_close(out[i].double(), ref, rtol=1e-5, atol=1e-5)
    if name == "torch" and window is not None and window < max(lens):  # only the window's slots are read
        assert max(g.length for g in meta.extra[("torch_decode", window)]) == window


@pytest.mark.parametrize("cached", [0, 3, 9])
@pytest.mark.parametrize("window,cap", [(4, None), (6, 0.5), (None, 0.5)])
def test_prefill_window_and_soft_cap_over_a_cached_prefix(cached, window, cap):
    g = torch.Generator().manual_seed(cached * 7 + (window or 0))
    bs, kvh, group, d, n = 4, 2, 2, 8, 7
    ctx = cached + n
    num_blocks = 12
    key_cache = torch.rand(num_blocks, bs, kvh, d, generator=g) * 2e4 - 1e4   # garbage
    value_cache = torch.rand(num_blocks, bs, kvh, d, generator=g) * 2e4 - 1e4
    table = torch.randperm(num_blocks, generator=g)[: -(-ctx // bs)]
    slots = table.repeat_interleave(bs)[:ctx] * bs + torch.arange(ctx) % bs
    k_all = torch.randn(ctx, kvh, d, generator=g)
    v_all = torch.randn(ctx, kvh, d, generator=g)
    key_cache.view(-1, kvh, d)[slots] = k_all          # prefix and new tokens, as write_kv leaves them
    value_cache.view(-1, kvh, d)[slots] = v_all
    q = torch.randn(n, kvh * group, d, generator=g) * 2
    span = PrefillSpan(0, n, cached, ctx, slots[:cached] if cached else None)
    layer = LayerKV(key_cache, value_cache, 1.0, 1.0, torch.float32)
    out = prefill_attention(q, k_all[cached:], v_all[cached:], layer, span, 0.5,
                            sliding_window=window, logits_soft_cap=cap)
    ref = reference(q, k_all.repeat_interleave(group, 1), v_all.repeat_interleave(group, 1),
                    torch.arange(cached, ctx), 0.5, window, cap)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_triton_backend_routes_each_layer_to_its_feature_kernel():
    """The wiring for kgen's feature kernels: one plan per distinct feature set, asked for the
    step's kernel with the step's buckets, called with the layer's scale, ``sliding_window`` and
    ``logits_soft_cap`` and the step's varlen batch."""
    from runtime.attention import TritonAttention, VarlenBatch

    asked, called = [], []

    class FeaturePlan:  # answers as a plan of a dispatcher with feature kernels will
        problem = None

        def __init__(self, shape):
            self.features = shape.features

        def kernel(self, num_seqs, max_context, max_query_len):
            asked.append((self.features, num_seqs, max_context, max_query_len))
            features = self.features

            def kernel(q, kc, vc, bt, sl, qsl, *, max_query_len, max_seq_len, scale, **extra):
                called.append((features, scale, extra))
                return torch.full_like(q, float(len(called)))
            return kernel

    class FeatureDispatcher:
        def plan(self, shape):
            return FeaturePlan(shape)

    layers = [LayerAttention(0.2, 8, 0.5), LayerAttention(0.3, None, 0.5), LayerAttention(0.2, 8, 0.5)]
    backend = TritonAttention(16, 2, 4, 64, torch.float32, torch.device("cpu"), FeatureDispatcher(),
                              layers=layers)
    q, kc, vc, tables, seq_lens = random_paged_case(16, 2, 2, 64, [3, 20], seed=3)
    starts = torch.tensor([0, 1, 2], dtype=torch.int32)
    meta = AttentionMetadata(slot_mapping=None, prefills=[], num_prefill_tokens=0,
                             varlen=VarlenBatch(starts, seq_lens, tables, max_query_len=1, max_seq_len=20))
    backend.prepare(meta)
    assert sorted(asked) == [(("sliding_window", "soft_cap"), 2, 20, 1), (("soft_cap",), 2, 20, 1)]
    layer = LayerKV(kc, vc, 1.0, 1.0, kc.dtype)
    for la in layers:
        backend.attend(q, layer, meta, la)
    assert called == [(("sliding_window", "soft_cap"), 0.2, {"sliding_window": 8, "logits_soft_cap": 0.5}),
                      (("soft_cap",), 0.3, {"logits_soft_cap": 0.5}),
                      (("sliding_window", "soft_cap"), 0.2, {"sliding_window": 8, "logits_soft_cap": 0.5})]
    with pytest.raises(ValueError, match=r"not prepared for features \('sliding_window',\)"):
        backend.attend(q, layer, meta, LayerAttention(0.2, 8))
