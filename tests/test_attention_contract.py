"""``paged_attention``'s contract beyond the matrix: decode equivalence, CUDA-graph safety (launches
depend on shapes and bounds only, no host read), many segments, and misuse named by argument."""

import contextlib

import pytest
import torch

from helpers_attention import DEVICE, run_varlen, varlen_inputs
from kgen.build import load_kernel
from kgen.reference import make_paged_inputs, paged_attention_reference, within_tolerance
from kgen.reference_varlen import paged_attention_varlen_reference
from kgen.space import default_config
from kgen.space_attention import default_attention_config
from kgen.variant import SPLIT_AUTO
from kgen.variant_attention import AttentionVariantConfig

ALL = ("sliding_window", "soft_cap", "alibi", "sinks")


# ---- a decode batch is the q_i = 1 case -------------------------------------------------------
@pytest.mark.parametrize("dtype, kv, split, feats, group", [
    ("fp16", "auto", SPLIT_AUTO, (), 4),
    ("bf16", "fp8_e5m2", 1, ALL, 3),
    ("fp32", "auto", 3, ("sinks", "alibi"), 8),
])
def test_every_q_len_one_equals_the_decode_kernel(dtype, kv, split, feats, group):
    kv_heads, lens = 2, [1, 15, 16, 17, 130]
    window = 20 if "sliding_window" in feats else None
    inputs = make_paged_inputs(len(lens), kv_heads * group, kv_heads, 64, 16, lens, dtype, seed=31,
                               device=DEVICE, poison_unused=True, kv_dtype=kv,
                               scale_kind="head" if kv != "auto" else None, features=feats,
                               sliding_window=window)
    decode = load_kernel(default_config(head_dim=64, block_size=16, group_size=group, dtype=dtype,
                                        split_k=split, kv_dtype=kv, features=feats))
    attention = load_kernel(default_attention_config(head_dim=64, block_size=16, group_size=group,
                                                     dtype=dtype, split_k=split, kv_dtype=kv,
                                                     features=feats))
    starts = torch.arange(len(lens) + 1, dtype=torch.int32, device=DEVICE)
    out = attention.paged_attention(**inputs, query_start_loc=starts, validate=True)
    ref = paged_attention_reference(**inputs)
    assert within_tolerance(out, ref, dtype)
    assert within_tolerance(out, decode.paged_attention_decode(**inputs, validate=True), dtype)
    assert torch.equal(ref, paged_attention_varlen_reference(**inputs, query_start_loc=starts))


# ---- CUDA graphs: launches from shapes and bounds only --------------------------------------------
class _Recorder:
    """Stands in for a jit kernel: records the grid and every argument (tensors by shape, dtype
    and strides; other values as they are)."""

    def __init__(self, name, sink):
        self.name, self.sink = name, sink

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.sink.append((self.name, grid, [_describe(a) for a in args],
                              {k: _describe(v) for k, v in sorted(kwargs.items())}))
        return launch


def _describe(value):
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype, value.stride())
    return value


class HostRead(AssertionError):
    pass


@contextlib.contextmanager
def no_host_reads():
    """Inside, any tensor read back to the host raises HostRead."""
    def refuse(self, *args, **kwargs):
        raise HostRead("a tensor was read to the host")

    with pytest.MonkeyPatch.context() as patch:
        for name in ("item", "tolist", "cpu", "numpy", "__int__", "__bool__", "__float__",
                     "__index__"):
            patch.setattr(torch.Tensor, name, refuse)
        yield


def _same_shapes(inputs, num_blocks, columns):
    """Pad the caches to ``num_blocks`` pages and the tables to ``columns`` (garbage ids)."""
    for name in ("key_cache", "value_cache"):
        t = inputs[name]
        pad = torch.full((num_blocks - t.shape[0], *t.shape[1:]), float("nan")).to(t.dtype)
        inputs[name] = torch.cat([t, pad.to(t.device)])
    tables = inputs["block_tables"]
    extra = torch.full((tables.shape[0], columns - tables.shape[1]), 10**6, dtype=torch.int32)
    inputs["block_tables"] = torch.cat([tables, extra.to(tables.device)], dim=1)
    return inputs


@pytest.mark.parametrize("batches, max_query_len, max_seq_len, segmented", [
    (([1, 3, 0, 2], [2, 0, 3, 1]), 4, 4096, True),  # decode / speculative: the segmented path
    (([40, 1, 0, 9], [5, 33, 12, 0]), 40, 160, False),  # prefill chunks: the 2D path
])
def test_launches_depend_only_on_shapes_and_bounds(monkeypatch, batches, max_query_len,
                                                   max_seq_len, segmented):
    config = AttentionVariantConfig(head_dim=64, block_size=16, group_size=4, q_tile=32,
                                    split_k=SPLIT_AUTO, tile_tokens=16, dtype="fp16",
                                    kv_dtype="fp8_e5m2", features=ALL)
    module = load_kernel(config)
    records = []
    for name in module.KERNELS:
        monkeypatch.setattr(module, name, _Recorder(name, records))
    contexts = ([10, 50, 7, 90], [70, 3, 20, 33])
    inputs = [_same_shapes(varlen_inputs(config, q, c, seed=i, scales="head", window=2000), 40, 12)
              for i, (q, c) in enumerate(zip(batches, contexts))]
    assert inputs[0]["query"].shape == inputs[1]["query"].shape
    assert not torch.equal(inputs[0]["seq_lens"], inputs[1]["seq_lens"])
    bounds = dict(max_query_len=max_query_len, max_seq_len=max_seq_len)
    calls = []
    for call in inputs:
        records.clear()
        with no_host_reads():
            module.paged_attention(**call, **bounds)
        calls.append(list(records))
    assert calls[0] == calls[1]
    names = [r[0] for r in calls[0]]
    assert names == (["_attention_segment_kernel", "_merge_kernel"] if segmented
                     else ["_attention_kernel"])
    if segmented:
        assert calls[0][0][1][2] == module.plan_launch(4, 2, 4, 4096, window=2000)[2] > 1
    with pytest.raises(HostRead), no_host_reads():  # without the bounds: a sync, and it is seen
        module.paged_attention(**inputs[0])


# ---- segments: many, and more rows per sequence -------------------------------------------------
def test_more_than_64_segments_merge_correctly():
    """A few long decodes get well over 64 segments (the merge's widest step), not a small cap."""
    config = AttentionVariantConfig(head_dim=64, block_size=16, group_size=2, q_tile=16,
                                    split_k=SPLIT_AUTO, tile_tokens=16, dtype="fp32",
                                    features="sinks")
    module = load_kernel(config)
    q_lens, contexts = [3, 1], [1100, 60]
    block_m, block_q, segments = module.plan_launch(2, 1, 3, 1103)
    assert (block_m, block_q) == (16, 8) and 64 < segments <= 256
    out, ref, _ = run_varlen(config, q_lens, contexts, seed=5, max_query_len=3, max_seq_len=1103)
    assert within_tolerance(out, ref, "fp32")


def test_queries_of_many_chunks_on_the_segmented_path_and_bounds_only_plan():
    """A 24-token query (3 chunks of 8 tokens) after a longer context is segmented, and right; a
    max_query_len bound that understates it (1) changes the plan, never the result."""
    config = AttentionVariantConfig(head_dim=64, block_size=16, group_size=2, q_tile=16,
                                    split_k=SPLIT_AUTO, tile_tokens=16, dtype="fp32",
                                    features="sinks")
    module = load_kernel(config)
    q_lens, contexts = [24, 0, 3], [200, 7, 20]
    assert module.plan_launch(3, 1, 24, 224)[2] > 1 and module.plan_launch(3, 1, 1, 224)[2] > 1
    for bound in (24, 1):
        out, ref, _ = run_varlen(config, q_lens, contexts, seed=9, validate=False,
                                 max_query_len=bound, max_seq_len=224)
        assert within_tolerance(out, ref, "fp32"), bound


def test_planner_is_a_cost_model_not_a_cap():
    module = load_kernel(default_attention_config(head_dim=128, block_size=16, group_size=4,
                                                  dtype="bf16"))
    plan = module.plan_segments  # (num_seqs, kv heads, max_query_len, tokens, SMs, per SM)
    assert plan(1, 1, 1, 131072, 132, 2) == 256  # one long decode: every segment the merge takes
    assert plan(1, 8, 1, 131072, 132, 2) == 33  # 8 KV heads x 33 segments fill one wave of 264
    assert plan(264, 1, 1, 32768, 132, 2) == 1  # the batch fills the GPU: one pass
    by_batch = [plan(b, 8, 1, 32768, 132, 2) for b in (1, 2, 4, 8, 16, 33, 64)]
    assert by_batch == sorted(by_batch, reverse=True) and by_batch[0] > 16 and by_batch[-1] == 1
    # speculative rows write more partials per segment: fewer, longer segments, never dropped
    spec = [plan(2, 8, q, 32768, 132, 2) for q in (1, 4, 8, 16)]
    assert spec == sorted(spec, reverse=True) and spec[-1] > 1
    assert plan(4, 8, 8, 8192, 132, 2) > 1  # q_len 8 at 8k stays on the segmented path
    # the row tile follows the query length: 16 rows for decode, the q tile for long queries
    assert module.row_tile(1) == (16, 4) and module.row_tile(5) == (32, 8)
    assert module.row_tile(16) == (64, 16) and module.row_tile(17) == (64, 16)
    # queries longer than one tile stay segmented while that pays (a few long sequences) ...
    assert module.plan_launch(2, 8, 17, 32768)[2] > 1 and module.plan_launch(1, 8, 64, 50000)[2] > 1
    # ... and prefill chunks, whose q tiles fill the GPU, or a full batch, take the 2D kernel
    assert module.plan_launch(1, 8, 2048, 34816)[2] == 1 and module.plan_launch(64, 8, 17, 32768)[2] == 1
    window = module.plan_launch(1, 8, 1, 100000, window=100)[2]
    assert window == module.plan_segments(1, 8, 1, 100 + 64, 132, 2) < plan(1, 8, 1, 100000, 132, 2)


# ---- misuse ------------------------------------------------------------------------------------
MISUSE = [
    # (name, mutate(inputs) -> call kwargs, message)
    ("start", lambda i: i["query_start_loc"].add_(1), "query_start_loc[0]=1 must be 0"),
    ("decreasing", lambda i: i["query_start_loc"].__setitem__(2, 0), "query_start_loc[2]=0 is less than query_start_loc[1]=1: it must not decrease"),
    ("end", lambda i: i["query_start_loc"].__setitem__(4, 7), "query_start_loc[4]=7 must equal num_tokens=6"),
    ("q_gt_len", lambda i: i["seq_lens"].__setitem__(1, 1), "seq_lens[1]=1 is less than its query length"),
    ("bound_q", lambda i: {"max_query_len": 2}, "max_query_len=2 is less than sequence 2's query length 3"),
    ("bound_len", lambda i: {"max_seq_len": 20}, "seq_lens[1]=40 exceeds the bound max_seq_len=20"),
]


@pytest.mark.parametrize("name, mutate, message", MISUSE, ids=[m[0] for m in MISUSE])
def test_bad_contents_are_named_with_validate(name, mutate, message):
    config = AttentionVariantConfig(head_dim=64, block_size=16, group_size=2, q_tile=16,
                                    dtype="fp32")
    inputs = varlen_inputs(config, [1, 2, 3, 0], [4, 38, 0, 9], seed=3)
    extra = mutate(inputs)
    extra = extra if isinstance(extra, dict) else {}
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_kernel(config).paged_attention(**inputs, **extra, validate=True)


SHAPE_MISUSE = [
    ("qsl_dtype", lambda i: i.update(query_start_loc=i["query_start_loc"].long()), "query_start_loc.dtype=torch.int64 must be torch.int32"),
    ("qsl_len", lambda i: i.update(query_start_loc=i["query_start_loc"][:-1]), r"query_start_loc.shape=\(4,\) must be \(5,\)"),
    ("qsl_2d", lambda i: i.update(query_start_loc=i["query_start_loc"][None]), "query_start_loc.shape=.* must have 1 dimensions"),
    ("query_dtype", lambda i: i.update(query=i["query"].half()), "query.dtype=torch.float16 must be torch.float32"),
    ("query_2d", lambda i: i.update(query=i["query"][:, 0]), "query.shape=.* must have 3 dimensions"),
    ("tables", lambda i: i.update(block_tables=i["block_tables"][:3]), "block_tables.shape=.* must have num_seqs=4 rows"),
    ("heads", lambda i: i.update(query=i["query"][:, :3]), "num_heads // num_kv_heads=3//2"),
    ("window", lambda i: i.update(sliding_window=8), "sliding_window=8 was given, but this variant is compiled without feature 'sliding_window'"),
    ("k_scale", lambda i: i.update(k_scale=0.5), "k_scale=0.5 was given, but this variant's kv_dtype is auto"),
    ("bound", lambda i: i.update(max_query_len=-1), "max_query_len=-1 must be an integer >= 0"),
    ("bound_type", lambda i: i.update(max_seq_len="many"), "max_seq_len='many' is not an integer"),
    ("out", lambda i: i.update(out=torch.empty(2, 4, 64)), r"out=\(\(2, 4, 64\)"),
    ("scale", lambda i: i.update(scale=torch.tensor(0.1)), "scale=Tensor must be a Python number"),
]


@pytest.mark.parametrize("name, mutate, message", SHAPE_MISUSE, ids=[m[0] for m in SHAPE_MISUSE])
def test_bad_arguments_are_named_without_validate(name, mutate, message):
    config = AttentionVariantConfig(head_dim=64, block_size=16, group_size=2, q_tile=16,
                                    dtype="fp32")
    inputs = varlen_inputs(config, [1, 2, 3, 0], [4, 38, 0, 9], seed=3)
    mutate(inputs)
    with pytest.raises(ValueError, match=message):
        load_kernel(config).paged_attention(**inputs)


def test_required_feature_argument_is_named():
    config = AttentionVariantConfig(head_dim=64, block_size=16, group_size=2, q_tile=16,
                                    dtype="fp32", features="soft_cap")
    inputs = varlen_inputs(config, [1, 2], [4, 8], seed=3)
    del inputs["logits_soft_cap"]
    with pytest.raises(ValueError, match="logits_soft_cap=None is required: this variant is "
                                         "compiled with feature 'soft_cap'"):
        load_kernel(config).paged_attention(**inputs)


def test_empty_batches_return_out_untouched():
    config = AttentionVariantConfig(head_dim=64, block_size=16, group_size=2, q_tile=16,
                                    dtype="fp16")
    module = load_kernel(config)
    inputs = varlen_inputs(config, [0, 0], [3, 0], seed=1)  # no rows at all
    assert module.paged_attention(**inputs, validate=True).shape == (0, 4, 64)
    inputs = varlen_inputs(config, [], [], seed=1)  # no sequences
    assert module.paged_attention(**inputs).shape == (0, 4, 64)
