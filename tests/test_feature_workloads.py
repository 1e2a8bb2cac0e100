"""Workloads, records, lookup, dispatch and tuning keyed by KV dtype and attention features.

A plain record must keep its key and its dict (records written before the feature axes stay
valid), a feature workload must find only its own records (never a plain one), and the runtime's
door (kgen.dispatch) answers for feature sets and fp8 caches.
"""

import json

import pytest
import torch

from kgen.build import load_kernel
from kgen.cli import main
from kgen.db import lookup as lk
from kgen.db.check import check_db
from kgen.db.schema import DbFormatError, check_entry, make_entry, make_provenance
from kgen.db.store import TuningStore
from kgen.device import pseudo_device
from kgen.dispatch import Dispatcher
from kgen.shape import AttentionShape
from kgen.reference import make_paged_inputs, paged_attention_reference, within_tolerance
from kgen.variant import VariantConfig
from kgen.workload import Workload, expand_workloads

SHAPE = dict(dtype="fp16", head_dim=64, block_size=16, group_size=2)
PLAIN = VariantConfig(**SHAPE, split_k=2, tile_tokens=32, num_warps=2, num_stages=1)
FP8_SWA = dict(kv_dtype="fp8_e5m2", features=("sliding_window", "sinks"))
FEATURED = PLAIN.replace(split_k=4, **FP8_SWA)


@pytest.fixture(autouse=True)
def _fresh_log_once():
    lk._logged.clear()
    yield
    lk._logged.clear()


@pytest.fixture
def db(tmp_path):
    """A plain record at (1, 512) and an fp8 + window + sinks record at (1, 512), same shape."""
    prov = make_provenance(pseudo_device("interpreter"), method="test")
    plain = Workload(gpu="interpreter", batch=1, context=512, **SHAPE)
    feat = Workload(gpu="interpreter", batch=1, context=512, **SHAPE, **FP8_SWA)
    entries = {w.key: make_entry(w, c, time_ms=t, default_time_ms=2.0, provenance=prov, trials=3)
               for w, c, t in ((plain, PLAIN, 1.0), (feat, FEATURED, 0.5))}
    TuningStore(tmp_path, "interpreter", prov).update_best(entries)
    return tmp_path


def test_workload_keys_grow_suffixes_only_when_not_default():
    plain = Workload("h100", "fp16", 128, 16, 4, 32, 4096)
    assert plain.key == "h100-fp16-d128-b16-g4-n32-c4096"
    assert plain.to_dict() == {"gpu": "h100", "dtype": "fp16", "head_dim": 128, "block_size": 16,
                               "group_size": 4, "batch": 32, "context": 4096}
    assert Workload.from_key(plain.key) == plain and plain.head_key == "fp16-d128"
    feat = plain.replace(kv_dtype="fp8_e4m3", features=("soft_cap", "sliding_window"))
    assert feat.key == "h100-fp16-d128-b16-g4-n32-c4096-kvfp8e4m3-swa-cap"
    assert Workload.from_key(feat.key) == feat == Workload.from_dict(json.loads(json.dumps(feat.to_dict())))
    assert feat.family_key == "fp16-d128-b16-g4-kvfp8e4m3-swa-cap" != plain.family_key
    assert feat.shape != plain.shape and feat.head_key == "fp16-d128-kvfp8e4m3-swa-cap"
    with pytest.raises(ValueError, match="not canonical"):
        Workload.from_key("h100-fp16-d128-b16-g4-n32-c4096-cap-swa")
    with pytest.raises(ValueError, match="kv_dtype='int4'"):
        Workload("h100", "fp16", 128, 16, 4, 32, 4096, kv_dtype="int4")
    found = expand_workloads(gpu="h100", dtypes=["bf16"], head_dims=[128], block_sizes=[16],
                             group_sizes=[1], batches=[1], contexts=[512],
                             kv_dtypes=["auto", "fp8_e5m2"], feature_sets=[("alibi",)])
    assert [w.key for w in found] == ["h100-bf16-d128-b16-g1-n1-c512-alibi",
                                      "h100-bf16-d128-b16-g1-n1-c512-kvfp8e5m2-alibi"]


def test_lookup_serves_feature_records_only_to_their_feature_set(db):
    reader = lk.DbReader(db)
    got = reader.lookup("interpreter", AttentionShape(**SHAPE, **FP8_SWA), num_seqs=1, max_context=500)
    assert got.source == "exact" and got.config == FEATURED
    got = reader.lookup("interpreter", AttentionShape(**SHAPE), num_seqs=1, max_context=500)
    assert got.source == "exact" and got.config == PLAIN
    # same shape, another feature set: the heuristic with that feature set, not a plain record
    other = reader.lookup("interpreter", AttentionShape(**SHAPE, features=("alibi",)), num_seqs=1,
                          max_context=500)
    assert other.source == "heuristic" and other.config.features == ("alibi",)
    assert other.config.kv_dtype == "auto" and other.workload.key.endswith("-c512-alibi")
    fp8_only = reader.lookup("interpreter", AttentionShape(**SHAPE, kv_dtype="fp8_e5m2"),
                             num_seqs=1, max_context=500)
    assert fp8_only.source == "heuristic" and fp8_only.config.kv_fp8 and not fp8_only.config.features


def test_check_and_block_size_defaults_keep_feature_records_apart(db):
    assert all(r.problem is None for r in check_db(db))
    table = TuningStore(db, "interpreter").load_best()
    assert set(table["block_size_defaults"]) == {"fp16-d64", "fp16-d64-kvfp8e5m2-swa-sinks"}
    assert lk.DbReader(db).preferred_block_size("interpreter", AttentionShape("fp16", 64)) == 16
    assert lk.DbReader(db).preferred_block_size(
        "interpreter", AttentionShape("fp16", 64, features=("alibi",))) is None
    key, entry = next((k, e) for k, e in table["entries"].items() if "kvfp8" in k)
    bad = {**entry, "config": PLAIN.to_dict(), "config_key": PLAIN.key}
    with pytest.raises(DbFormatError, match="config differs from the workload in kv_dtype, features"):
        check_entry(key, bad, "best.json")


def _kernel(dispatcher, **shape):
    return dispatcher.plan(AttentionShape(**SHAPE, **shape)).decode_kernel(num_seqs=1, max_context=500)


def test_dispatch_plans_for_features(db):
    dispatcher = Dispatcher(gpu="interpreter", db_dir=db)
    kernel = _kernel(dispatcher, kv_dtype="fp8_e5m2", features=["sinks", "sliding_window"])
    assert kernel is load_kernel(FEATURED).paged_attention_decode
    # a comma string names the same feature set (and the same plan)
    assert _kernel(dispatcher, kv_dtype="fp8_e5m2", features="sliding_window, sinks") is kernel
    plain = _kernel(dispatcher)
    assert plain is load_kernel(PLAIN).paged_attention_decode
    capped = _kernel(dispatcher, features=("soft_cap",))
    assert capped.__module__.endswith("_fp16_cap")
    sources = {key: r.source for key, r in dispatcher.chosen().items()}
    assert sources == {"interpreter-fp16-d64-b16-g2-n1-c512-kvfp8e5m2-swa-sinks[decode]": "exact",
                       "interpreter-fp16-d64-b16-g2-n1-c512[decode]": "exact",
                       "interpreter-fp16-d64-b16-g2-n1-c512-cap[decode]": "heuristic"}
    # the dispatched feature kernel is correct on random paged data
    inputs = make_paged_inputs(3, 4, 2, 64, 16, [40, 16, 300], "fp16", seed=1, kv_dtype="fp8_e5m2",
                               scale_kind="head", features=FP8_SWA["features"], sliding_window=50)
    out = kernel(**inputs, max_seq_len=300)
    assert within_tolerance(out, paged_attention_reference(**inputs), "fp16")
    with pytest.raises(ValueError, match="'rope' is not a feature"):
        _kernel(dispatcher, features=("rope",))


def test_plan_problems_name_fp8_and_feature_values(db):
    a100, h100 = Dispatcher(gpu="a100", db_dir=db), Dispatcher(gpu="h100", db_dir=db)
    shape = dict(dtype="bf16", head_dim=128, block_size=16, group_size=4)

    def problem(dispatcher, **more):
        return dispatcher.plan(AttentionShape(**shape, **more)).problem

    assert "fp8_e4m3 is not supported on a100" in problem(a100, kv_dtype="fp8_e4m3")
    assert problem(a100, kv_dtype=torch.float8_e5m2) is None
    assert problem(h100, kv_dtype="fp8_e4m3",
                   features=("sliding_window", "soft_cap", "alibi", "sinks")) is None
    with pytest.raises(ValueError, match="kv_dtype='int8'"):
        AttentionShape(**shape, kv_dtype="int8")  # malformed, not merely unsupported
    with pytest.raises(ValueError, match="'yarn' is not a feature"):
        AttentionShape(**shape, features=["yarn"])


def test_db_show_and_explain_print_kv_dtype_and_features(db, capsys):
    import pandas  # noqa: F401 - a core dependency: a broken import must fail, not skip
    assert main(["db", "show", "--db", str(db)]) == 0
    out = capsys.readouterr().out
    assert "fp8_e5m2" in out and "sliding_window,sinks" in out
    assert main(["db", "explain", "--db", str(db), "--gpu", "interpreter", "--batch", "1",
                 "--context", "500", "--head-dim", "64", "--group-size", "2",
                 "--kv-dtype", "fp8_e5m2", "--features", "sinks,sliding_window"]) == 0
    out = capsys.readouterr().out
    assert "workload: interpreter-fp16-d64-b16-g2-n1-c512-kvfp8e5m2-swa-sinks" in out
    assert "source: exact" in out and f"variant: {FEATURED.key}" in out


def test_interpreter_tuning_of_a_feature_workload(tmp_path, capsys):
    code = main(["tune", "--gpu", "interpreter", "--trials", "2", "--head-dim", "64",
                 "--block-size", "16", "--group-size", "2", "--batch", "1", "--context", "64",
                 "--kv-dtype", "fp8_e4m3", "--features", "sliding_window,soft_cap",
                 "--db", str(tmp_path), "--quiet"])
    assert code == 0, capsys.readouterr().err
    entries = TuningStore(tmp_path, "interpreter").load_best()["entries"]
    (key, entry), = entries.items()
    assert key == "interpreter-fp16-d64-b16-g2-n1-c64-kvfp8e4m3-swa-cap"
    config = VariantConfig.from_key(entry["config_key"])
    assert config.kv_dtype == "fp8_e4m3" and config.features == ("sliding_window", "soft_cap")
    assert entry["default_time_ms"] > 0
