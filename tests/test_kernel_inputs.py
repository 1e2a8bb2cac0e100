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
    # 3 seqs x 2 KV heads = 6 programs; 132 SMs x 2 waves wants 44 splits; 40 tokens = 3 tiles.
    assert sink[0][1] == (3, 2, 3)
    assert module.choose_num_splits(64, 8, 4096) == 1  # enough programs already
    assert module.choose_num_splits(1, 1, 100_000) == 256  # capped at MAX_SPLIT_K
    assert module.choose_num_splits(1, 1, 0) == 1
    _, sink = _record(CONFIG, inputs, monkeypatch)
    assert [(name, grid) for name, grid, _, _ in sink] == [("_decode_kernel", (3, 2))]
