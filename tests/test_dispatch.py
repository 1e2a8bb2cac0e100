"""Dispatch: one plan per layer shape picks the database's record per step, compiles it once,
caches lookups; its block size comes from records of the shape's own KV dtype and features."""

import pytest
import torch

from kgen.build import load_kernel
from kgen.db.schema import make_entry, make_provenance
from kgen.db.store import TuningStore
from kgen.device import pseudo_device
from kgen.dispatch import Dispatcher
from kgen.shape import AttentionShape
from kgen.reference import make_paged_inputs, paged_attention_reference, within_tolerance
from kgen.space import default_config
from kgen.workload import Workload
from kgen.variant import VariantConfig

SHAPE = dict(dtype="fp16", head_dim=64, block_size=16, group_size=2)
LAYER = AttentionShape(**SHAPE)
TUNED = VariantConfig(head_dim=64, block_size=16, group_size=2, split_k=2, tile_tokens=32,
                      num_warps=2, num_stages=1, dtype="fp16")


@pytest.fixture
def db(tmp_path):
    prov = make_provenance(pseudo_device("interpreter"), method="test")
    entries = {}
    for batch, context, config in ((1, 512, TUNED), (8, 2048, TUNED.replace(split_k=4))):
        w = Workload(gpu="interpreter", batch=batch, context=context, **SHAPE)
        entries[w.key] = make_entry(w, config, time_ms=1.0, default_time_ms=2.0, provenance=prov,
                                    trials=4)
    TuningStore(tmp_path, "interpreter", prov).update_best(entries)
    return tmp_path


def test_dispatch_uses_the_database_record_and_it_is_correct(db):
    dispatcher = Dispatcher(gpu="interpreter", db_dir=db)
    plan = dispatcher.plan(LAYER)
    assert plan.problem is None and plan.block_size == 16 and plan.block_size_source == "shape"
    kernel = plan.decode_kernel(num_seqs=3, max_context=600)  # (4, 512) -> (1, 512)
    assert kernel is load_kernel(TUNED).paged_attention_decode
    chosen = dispatcher.chosen()
    assert [r.source for r in chosen.values()] == ["nearest"]
    # the dispatched kernel computes attention: random paged data with shared, permuted blocks
    lens = [40, 16, 17]  # past a page, exactly one page, one past a page
    inputs = make_paged_inputs(3, 4, 2, 64, 16, lens, "fp16", seed=11)
    out = torch.full_like(inputs["query"], float("nan"))
    kernel(**inputs, out=out)
    assert within_tolerance(out, paged_attention_reference(**inputs), "fp16")


def test_lookups_are_cached_per_bucket_and_per_step(db, monkeypatch):
    dispatcher = Dispatcher(gpu="interpreter", db_dir=db)
    calls = []
    real = dispatcher._reader.lookup
    monkeypatch.setattr(dispatcher._reader, "lookup", lambda *a, **k: calls.append(k) or real(*a, **k))
    plan = dispatcher.plan(LAYER)
    assert dispatcher.plan(AttentionShape(**SHAPE)) is plan  # one plan per shape
    first = plan.decode_kernel(num_seqs=8, max_context=2000)
    assert first is load_kernel(TUNED.replace(split_k=4)).paged_attention_decode
    assert plan.decode_kernel(num_seqs=7, max_context=1900) is first  # same bucket
    assert len(calls) == 1
    # a repeated step is one dict lookup: no workload is built, nothing is looked up again
    import kgen.dispatch

    monkeypatch.setattr(kgen.dispatch.Workload, "for_step",
                        lambda *a, **k: pytest.fail("a repeated step built its workload again"))
    for _ in range(100):
        assert plan.decode_kernel(num_seqs=8, max_context=2000) is first
    assert len(calls) == 1  # (its cost, ~1 us, is a benchmark number, not a test assertion)


def test_decode_steps_of_one_bucket_share_one_cache_entry(db, monkeypatch):
    """A decode run grows max_context by one every step: those steps must neither build a
    workload each (slow) nor leave one cache entry each behind (unbounded growth)."""
    import kgen.dispatch

    plan = Dispatcher(gpu="interpreter", db_dir=db).plan(LAYER)
    first = plan.decode_kernel(num_seqs=8, max_context=1500)  # bucket (8, 2048)
    built = []
    real = kgen.dispatch.Workload.for_step
    monkeypatch.setattr(kgen.dispatch.Workload, "for_step",
                        lambda *a, **k: built.append(k) or real(*a, **k))
    for context in range(1501, 2800):  # all in bucket 2048
        assert plan.decode_kernel(num_seqs=8, max_context=context) is first
    assert built == []
    assert len(plan._steps) == 1


def test_without_records_the_default_variant_is_used(tmp_path):
    dispatcher = Dispatcher(gpu="interpreter", db_dir=tmp_path / "none")
    kernel = dispatcher.plan(LAYER).decode_kernel(num_seqs=2, max_context=100)
    assert kernel is load_kernel(default_config(**SHAPE)).paged_attention_decode
    assert [r.source for r in dispatcher.chosen().values()] == ["heuristic"]


def test_corrupted_database_does_not_crash_dispatch(db):
    (db / "interpreter" / "best.json").write_text('{"schema": "kgen.best", "schema_ver')
    dispatcher = Dispatcher(gpu="interpreter", db_dir=db)
    with pytest.warns(RuntimeWarning, match="best.json"):
        kernel = dispatcher.plan(LAYER).decode_kernel(num_seqs=1, max_context=512)
    assert kernel is load_kernel(default_config(**SHAPE)).paged_attention_decode


def test_bad_step_values_are_named(db):
    dispatcher = Dispatcher(gpu="interpreter", db_dir=db)
    with pytest.raises(ValueError, match="num_seqs=0"):
        dispatcher.plan(LAYER).decode_kernel(num_seqs=0, max_context=512)
    odd = dispatcher.plan(AttentionShape(**{**SHAPE, "head_dim": 65}))
    assert "head_dim=65 is not supported" in odd.problem
    with pytest.raises(ValueError, match="head_dim=65"):
        odd.decode_kernel(num_seqs=1, max_context=512)
    with pytest.raises(ValueError, match="group_size=0"):
        AttentionShape(**{**SHAPE, "group_size": 0})
    with pytest.raises(ValueError, match="not a kgen.shape.AttentionShape"):
        dispatcher.plan(SHAPE)


def test_gpu_name_is_normalized_and_defaults_to_the_device(db, monkeypatch):
    assert Dispatcher(gpu="NVIDIA H100 80GB HBM3", db_dir=db).gpu == "h100"
    monkeypatch.setenv("KGEN_GPU", "interpreter")
    assert Dispatcher(db_dir=db).gpu == "interpreter"


def test_runtime_generate_uses_the_database_record(tmp_path, monkeypatch):
    """runtime.generate(backend="triton") dispatches to the DB's (unusual) variant, and decodes
    the same greedy tokens as the torch backend."""
    import runtime
    from helpers_checkpoint import make_llama, random_prompts
    from kgen.db.lookup import DbReader
    from runtime import SamplingParams

    shape = dict(dtype="fp32", head_dim=64, block_size=16, group_size=2)
    odd = VariantConfig(split_k=2, tile_tokens=16, num_warps=1, num_stages=1, **shape)
    prov = make_provenance(pseudo_device("interpreter"), method="test")
    entries = {}
    for batch in (1, 2):
        for context in (8, 16, 32):
            w = Workload(gpu="interpreter", batch=batch, context=context, **shape)
            entries[w.key] = make_entry(w, odd, time_ms=1.0, default_time_ms=2.0,
                                        provenance=prov, trials=1)
    TuningStore(tmp_path / "db", "interpreter", prov).update_best(entries)
    monkeypatch.setenv("KGEN_DB", str(tmp_path / "db"))
    monkeypatch.setenv("KGEN_GPU", "interpreter")
    make_llama(tmp_path / "m", hidden=128, heads=4, kv_heads=2, head_dim=64, layers=1, vocab=128,
               seed=4)
    prompts = random_prompts([5, 9], 128, seed=4)
    seen = []
    real_lookup = DbReader.lookup
    monkeypatch.setattr(DbReader, "lookup",
                        lambda self, *a, **k: seen.append(real_lookup(self, *a, **k)) or seen[-1])
    outs = runtime.generate(tmp_path / "m", prompts, SamplingParams(max_tokens=4), block_size=16,
                            backend="triton")
    decode = [r for r in seen if r.workload.decode]  # prefill steps: the attention family's
    assert decode and all(r.config == odd and r.source in ("exact", "nearest") for r in decode)
    assert all(r.path == str(tmp_path / "db" / "interpreter" / "best.json") for r in decode)
    prefill = [r for r in seen if not r.workload.decode]
    assert prefill and all(r.config.family == "attention" and r.source == "heuristic" for r in prefill)
    ref = runtime.generate(tmp_path / "m", prompts, SamplingParams(max_tokens=4), block_size=16,
                           backend="torch")
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in ref]


def _block_size_db(tmp_path, records):
    """A database whose records make ``block_size`` the fastest for each (kv_dtype, features)."""
    prov = make_provenance(pseudo_device("interpreter"), method="test")
    entries = {}
    for (kv_dtype, features), fast in records.items():
        for block_size in (16, 32):
            shape = dict(SHAPE, block_size=block_size, kv_dtype=kv_dtype, features=features)
            w = Workload(gpu="interpreter", batch=4, context=1024, **shape)
            config = default_config(**shape)
            entries[w.key] = make_entry(w, config, time_ms=1.0 if block_size == fast else 3.0,
                                        default_time_ms=3.0, provenance=prov, trials=1)
    TuningStore(tmp_path, "interpreter", prov).update_best(entries)
    return tmp_path


def test_the_plan_block_size_comes_from_records_of_its_own_kv_dtype_and_features(tmp_path):
    """Plain records prefer 16, fp8 + window records 32: each plan takes its own, and a shape
    with no records of its own falls back to 16, never to another shape's preference."""
    db = _block_size_db(tmp_path, {("auto", ()): 16, ("fp8_e5m2", ("sliding_window",)): 32})
    dispatcher = Dispatcher(gpu="interpreter", db_dir=db)
    free = dict(SHAPE)
    del free["block_size"]
    plain = dispatcher.plan(AttentionShape(**free))
    fp8_window = dispatcher.plan(AttentionShape(**free, kv_dtype="fp8", features="sliding_window"))
    assert (plain.block_size, plain.block_size_source) == (16, "database")
    assert fp8_window.shape.kv_dtype == "fp8_e4m3"  # vLLM's 'fp8' spelling is e4m3
    assert (fp8_window.block_size, fp8_window.block_size_source) == (16, "default")
    e5m2 = dispatcher.plan(AttentionShape(**free, kv_dtype="fp8_e5m2", features="sliding_window"))
    assert (e5m2.block_size, e5m2.block_size_source) == (32, "database")
    assert e5m2.lookup(4, 1024).config.block_size == 32  # its records are found at that size


def test_e4m3_is_refused_by_gpu_family_with_the_one_rule():
    fp8 = AttentionShape(**{**SHAPE, "kv_dtype": "fp8_e4m3"})
    assert "sm_89" in Dispatcher(gpu="a100").plan(fp8).problem
    assert Dispatcher(gpu="h100").plan(fp8).problem is None
    assert Dispatcher(gpu="a100").plan(fp8.__class__(**{**SHAPE, "kv_dtype": "fp8_e5m2"})).problem is None
