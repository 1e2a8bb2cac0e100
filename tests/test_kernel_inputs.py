"""The launcher's input checks (each a ValueError naming the argument and the value) and its
launches as seen by a recorder (what the static audit relies on)."""

import pytest
import torch

from kgen.build import load_kernel
from kgen.reference import make_paged_inputs
from kgen.variant import SPLIT_AUTO, VariantConfig

CONFIG = VariantConfig(head_dim=64, block_size=16, group_size=2, split_k=1, tile_tokens=16,
                       dtype="fp16")
SPLIT = CONFIG.replace(split_k=SPLIT_AUTO)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(device):
    data = make_paged_inputs(3, 4, 2, 64, 16, [0, 17, 40], "fp16", seed=5, device=device)
    data.pop("scale")
    return data


@pytest.fixture
def inputs():
    return _inputs(DEVICE)


@pytest.fixture
def cpu_inputs():
    """The static audit records launches from CPU tensors, even on a machine with a GPU."""
    return _inputs("cpu")


def _call(config=CONFIG, **kwargs):
    return load_kernel(config).paged_attention_decode(**kwargs)


def _cases(inputs):
    q, k = inputs["query"], inputs["key_cache"]
    return {
        "query.dtype=torch.float32": dict(query=q.float()),
        "key_cache.dtype=torch.bfloat16": dict(key_cache=k.bfloat16()),
        "query.shape=(3, 256)": dict(query=q.reshape(3, 256)),
        "query.shape[2] (head_dim)=80": dict(query=q.new_zeros(3, 4, 80)),
        "key_cache.shape[1] (block_size)=8": dict(key_cache=k.reshape(-1, 8, 2, 64),
                                                  value_cache=k.reshape(-1, 8, 2, 64)),
        "value_cache.shape=": dict(value_cache=k[:-1]),
        "num_heads // num_kv_heads=6//2": dict(query=q.new_zeros(3, 6, 64)),
        "block_tables.dtype=torch.int64": dict(block_tables=inputs["block_tables"].long()),
        "seq_lens.dtype=torch.int64": dict(seq_lens=inputs["seq_lens"].long()),
        "seq_lens.shape=(2,)": dict(seq_lens=inputs["seq_lens"][:2]),
        "block_tables.shape=(2, ": dict(block_tables=inputs["block_tables"][:2]),
        "out=((3, 4, 32)": dict(out=q.new_empty(3, 4, 32)),
        "out=((3, 4, 64), torch.float32": dict(out=q.new_empty(3, 4, 64, dtype=torch.float32)),
        "block_tables=list": dict(block_tables=[[0]]),
        "scale=inf": dict(scale=float("inf")),
        "scale='half'": dict(scale="half"),
        "scale=[0.5]": dict(scale=[0.5]),
    }


@pytest.mark.parametrize("name", list(_cases(_inputs("cpu"))))
def test_bad_input_names_argument_and_value(inputs, name):
    bad = {**inputs, **_cases(inputs)[name]}
    with pytest.raises(ValueError) as info:
        _call(**bad)
    assert name in str(info.value)
    assert CONFIG.key in str(info.value)


def test_validate_catches_length_beyond_table(inputs):
    capacity = inputs["block_tables"].shape[1] * 16
    inputs["seq_lens"][1] = capacity + 1
    with pytest.raises(ValueError, match=rf"seq_lens\[1\]={capacity + 1} is outside 0..{capacity}"):
        _call(**inputs, validate=True)
    inputs["seq_lens"][1] = -1
    with pytest.raises(ValueError, match=r"seq_lens\[1\]=-1"):
        _call(**inputs, validate=True)


def test_validate_catches_block_past_cache_but_ignores_unused_entries(inputs):
    num_blocks = inputs["key_cache"].shape[0]
    tables = inputs["block_tables"]
    tables[0, :] = num_blocks + 7  # sequence 0 has length 0: its entries are all unused
    tables[2, 3:] = -5  # past sequence 2's last block (40 tokens = 3 blocks)
    _call(**inputs, validate=True)
    tables[2, 1] = num_blocks
    with pytest.raises(ValueError, match=rf"block_tables\[2, 1\]={num_blocks} is outside the cache"):
        _call(**inputs, validate=True)


def test_num_splits_errors(inputs):
    with pytest.raises(ValueError, match="num_splits=2 needs a split-K variant"):
        _call(**inputs, num_splits=2)
    with pytest.raises(ValueError, match="num_splits=0 must be an int"):
        _call(SPLIT, **inputs, num_splits=0)
    with pytest.raises(ValueError, match="num_splits=2.0"):
        _call(SPLIT, **inputs, num_splits=2.0)
    with pytest.raises(ValueError, match=r"max_seq_len='40' is not an integer \(variant"):
        _call(SPLIT, **inputs, max_seq_len="40")


class _Recorder:
    def __init__(self, sink, name):
        self.sink, self.name = sink, name

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.sink.append((self.name, grid, args, kwargs))


def _record(config, inputs, monkeypatch, **kwargs):
    module = load_kernel(config)
    sink = []
    for name in module.KERNELS:
        monkeypatch.setattr(module, name, _Recorder(sink, name))
    module.paged_attention_decode(**inputs, **kwargs)
    return module, sink


def test_launches_go_through_module_globals(cpu_inputs, monkeypatch):
    inputs = cpu_inputs
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # as the audit does: a GPU compile, not interpreted
    module, sink = _record(SPLIT.replace(dtype="bf16"), {
        **inputs, **{n: inputs[n].bfloat16() for n in ("query", "key_cache", "value_cache")}},
        monkeypatch, num_splits=3)
    assert module.KERNELS == ("_decode_kernel", "_decode_partial_kernel", "_merge_kernel")
    assert [(name, grid) for name, grid, _, _ in sink] == [
        ("_decode_partial_kernel", (3, 2, 3)), ("_merge_kernel", (3, 4))]
    partial_kwargs = sink[0][3]
    assert partial_kwargs["DOT_FP32"] is False  # real bf16 tensor-core dots on a GPU
    assert partial_kwargs["num_warps"] == 4 and partial_kwargs["TILE"] == 16
    assert all(t.device.type == "cpu" for t in sink[0][2] if isinstance(t, torch.Tensor))


def test_split_auto_picks_partitions_from_shape(cpu_inputs, monkeypatch):
    inputs = cpu_inputs
    module, sink = _record(SPLIT, inputs, monkeypatch, max_seq_len=40)
    # 40 tokens are 3 tiles of 16, too few to pay for partials (3 tiles per partition): one pass.
    assert module._MIN_TILES_PER_SPLIT == 3
    assert [(name, grid) for name, grid, _, _ in sink] == [("_decode_kernel", (3, 2))]
    # 3 seqs x 2 KV heads = 6 programs; a wave off-GPU is 132 SMs x 2; 4096 tokens = 256 tiles:
    # 43 partitions of 6 tiles fill one wave (258 programs).
    _, sink = _record(SPLIT, inputs, monkeypatch, max_seq_len=4096)
    assert [(name, grid) for name, grid, _, _ in sink] == [
        ("_decode_partial_kernel", (3, 2, 43)), ("_merge_kernel", (3, 4))]
    assert sink[1][3]["SPLIT_CHUNK"] == 64 and sink[1][3]["num_warps"] == 4  # one merge step
    assert module.choose_num_splits(64, 8, 4096) == 1  # enough programs already
    # 6250 tiles over at most MAX_SPLIT_K=256 partitions: 25 tiles each, so 250 partitions suffice
    assert module.choose_num_splits(1, 1, 100_000) == 250
    assert module.choose_num_splits(1, 1, 0) == 1
    _, sink = _record(CONFIG, inputs, monkeypatch)
    assert [(name, grid) for name, grid, _, _ in sink] == [("_decode_kernel", (3, 2))]


# ---- feature arguments ---------------------------------------------------------------------------
FEATURED = CONFIG.replace(kv_dtype="fp8_e5m2", features="sliding_window,soft_cap,alibi,sinks")


def _featured_inputs(device):
    data = make_paged_inputs(3, 4, 2, 64, 16, [0, 17, 40], "fp16", seed=5, device=device,
                             kv_dtype="fp8_e5m2", scale_kind="head",
                             features=FEATURED.features, sliding_window=8)
    data.pop("scale")
    return data


def _featured_cases(inputs):
    slopes, kv = inputs["alibi_slopes"], inputs["k_scale"]
    return {
        "key_cache.dtype=torch.float16": dict(key_cache=inputs["key_cache"].half()),
        "k_scale.dtype=torch.float64": dict(k_scale=kv.double()),
        "k_scale.shape=(3,)": dict(k_scale=kv.new_ones(3)),
        "v_scale.shape=(2, 1)": dict(v_scale=kv.new_ones(2, 1)),
        "k_scale=-1.0 must be finite and > 0": dict(k_scale=-1.0),
        "v_scale='big' is not a number": dict(v_scale="big"),
        "k_scale=True is not a number (a bool)": dict(k_scale=True),
        "k_scale='1' is not a number (a str)": dict(k_scale="1"),  # float('1') was accepted silently
        "logits_soft_cap='30' is not a number (a str)": dict(logits_soft_cap="30"),
        "sliding_window=0 must be an integer >= 1": dict(sliding_window=0),
        "sliding_window=2.5 is not an integer": dict(sliding_window=2.5),
        "sliding_window=True must be an integer >= 1": dict(sliding_window=True),
        "logits_soft_cap=0.0 must be finite and > 0": dict(logits_soft_cap=0.0),
        "logits_soft_cap=nan": dict(logits_soft_cap=float("nan")),
        "alibi_slopes.shape=(2,)": dict(alibi_slopes=slopes[:2]),
        "alibi_slopes.dtype=torch.float16": dict(alibi_slopes=slopes.half()),
        "alibi_slopes=list is not a torch.Tensor": dict(alibi_slopes=[0.5] * 4),
        "sinks.shape=(4, 1)": dict(sinks=inputs["sinks"][:, None]),
        "sinks.dtype=torch.bfloat16": dict(sinks=inputs["sinks"].bfloat16()),
        "sliding_window=None is required: this variant is compiled with feature 'sliding_window'":
            dict(sliding_window=None),
        "logits_soft_cap=None is required: this variant is compiled with feature 'soft_cap'":
            dict(logits_soft_cap=None),
        "alibi_slopes=None is required: this variant is compiled with feature 'alibi'":
            dict(alibi_slopes=None),
        "sinks=None is required: this variant is compiled with feature 'sinks'": dict(sinks=None),
    }


@pytest.mark.parametrize("name", list(_featured_cases(_featured_inputs("cpu"))))
def test_bad_feature_argument_names_argument_and_value(name):
    inputs = _featured_inputs(DEVICE)
    with pytest.raises(ValueError) as info:
        _call(FEATURED, **{**inputs, **_featured_cases(inputs)[name]})
    assert name in str(info.value)
    assert FEATURED.key in str(info.value)


@pytest.mark.parametrize("argument, value, feature", [
    ("sliding_window", 4096, "sliding_window"), ("logits_soft_cap", 30.0, "soft_cap"),
    ("alibi_slopes", "tensor", "alibi"), ("sinks", "tensor", "sinks")])
def test_feature_argument_to_a_variant_without_it_names_both(inputs, argument, value, feature):
    value = torch.zeros(4, device=DEVICE) if value == "tensor" else value
    with pytest.raises(ValueError, match=rf"{argument}=.* this variant is compiled without feature "
                                         rf"'{feature}' \(features: none\)"):
        _call(**inputs, **{argument: value})


@pytest.mark.parametrize("argument", ["k_scale", "v_scale"])
def test_scale_to_a_variant_without_fp8_cache_names_both(inputs, argument):
    with pytest.raises(ValueError, match=rf"{argument}=0.5 was given, but this variant's kv_dtype "
                                         r"is auto"):
        _call(**inputs, **{argument: 0.5})


def test_validate_checks_feature_values_and_ignores_entries_before_the_window():
    inputs = _featured_inputs(DEVICE)
    tables = inputs["block_tables"]
    tables[2, 0] = 10_000  # sequence 2 (40 tokens, window 8) reads only block 2
    tables[2, 1] = -3
    _call(FEATURED, **inputs, validate=True)
    tables[2, 2] = 10_000
    with pytest.raises(ValueError, match=r"block_tables\[2, 2\]=10000 is outside the cache"):
        _call(FEATURED, **inputs, validate=True)
    tables[2, 2] = 0
    inputs["sinks"][3] = float("inf")
    with pytest.raises(ValueError, match=r"sinks\[3\]=inf must be finite"):
        _call(FEATURED, **inputs, validate=True)
    inputs["sinks"][3] = 0.0
    inputs["v_scale"][1] = 0.0
    with pytest.raises(ValueError, match=r"v_scale\[1\]=0.0 must be finite and > 0"):
        _call(FEATURED, **inputs, validate=True)


def test_feature_launch_passes_feature_arguments_by_name(cpu_inputs, monkeypatch):
    """Plain variants launch without any feature parameter; featured ones name theirs."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    _, sink = _record(CONFIG, cpu_inputs, monkeypatch)
    plain_kwargs = set(sink[0][3])
    assert not plain_kwargs & {"k_scale_ptr", "window", "cap_log2", "alibi_ptr", "sinks_ptr"}
    assert sink[0][3]["KV_FP8"] is False and sink[0][3]["SINKS"] is False
    inputs = _featured_inputs("cpu")
    module, sink = _record(FEATURED.replace(split_k=SPLIT_AUTO), inputs, monkeypatch, num_splits=2)
    kwargs = sink[0][3]
    assert sink[0][0] == "_decode_partial_kernel"
    assert kwargs["window"] == 8 and kwargs["KV_FP8"] and kwargs["SLIDING_WINDOW"]
    assert kwargs["k_scale_ptr"] is inputs["k_scale"] and kwargs["stride_ksc"] == 1
    assert kwargs["alibi_ptr"] is inputs["alibi_slopes"] and kwargs["sinks_ptr"] is inputs["sinks"]
    assert kwargs["cap_log2"] == pytest.approx(2.0 * 1.4426950408889634)
    assert sink[0][1] == (3, 2, 2)
    # the window bounds split-K auto: 200 + 16 tokens are 14 tiles of 16, two partitions of at
    # least _MIN_TILES_PER_SPLIT (5 for fp8 partials), not the ~43 of 4096 tokens
    assert module._MIN_TILES_PER_SPLIT == 5
    _, sink = _record(FEATURED.replace(split_k=SPLIT_AUTO), {**inputs, "sliding_window": 200},
                      monkeypatch, max_seq_len=4096)
    assert sink[0][1] == (3, 2, 2)
