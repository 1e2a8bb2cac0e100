"""Dispatch: the runtime's door picks the database's record, compiles it once, caches lookups."""

import pytest
import torch

from kgen.build import load_kernel
from kgen.db.schema import make_entry, make_provenance
from kgen.db.store import TuningStore
from kgen.device import pseudo_device
from kgen.dispatch import Dispatcher
from kgen.reference import make_paged_inputs, paged_attention_reference, within_tolerance
from kgen.space import default_config
from kgen.workload import Workload
from kgen.variant import VariantConfig

SHAPE = dict(dtype="fp16", head_dim=64, block_size=16, group_size=2)
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
    kernel = dispatcher.kernel_for(num_seqs=3, max_context=600, **SHAPE)  # (4, 512) -> (1, 512)
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
    first = dispatcher.kernel_for(num_seqs=8, max_context=2000, **SHAPE)
    assert first is load_kernel(TUNED.replace(split_k=4)).paged_attention_decode
    assert dispatcher.kernel_for(num_seqs=7, max_context=1900, **SHAPE) is first  # same bucket
    assert len(calls) == 1
    # a repeated step is one dict lookup: it neither buckets nor looks up again
    import kgen.dispatch

    monkeypatch.setattr(kgen.dispatch.Workload, "for_step",
                        lambda **_: pytest.fail("a repeated step was bucketed again"))
    for _ in range(100):
        assert dispatcher.kernel_for(num_seqs=8, max_context=2000, **SHAPE) is first
    assert len(calls) == 1  # (its cost, ~1 us, is a benchmark number, not a test assertion)


def test_decode_steps_of_one_bucket_share_one_cache_entry(db, monkeypatch):
    """A decode run grows max_context by one every step: those steps must neither build a
    workload each (slow) nor leave one cache entry each behind (unbounded growth)."""
    import kgen.dispatch

    dispatcher = Dispatcher(gpu="interpreter", db_dir=db)
    first = dispatcher.kernel_for(num_seqs=8, max_context=1500, **SHAPE)  # bucket (8, 2048)
    built = []
    real = kgen.dispatch.Workload.for_step
    monkeypatch.setattr(kgen.dispatch.Workload, "for_step",
                        lambda **k: built.append(k) or real(**k))
    for context in range(1501, 2800):  # all in bucket 2048
        assert dispatcher.kernel_for(num_seqs=8, max_context=context, **SHAPE) is first
    assert built == []
    assert len(dispatcher._by_step) == 1


def test_without_records_the_default_variant_is_used(tmp_path):
    dispatcher = Dispatcher(gpu="interpreter", db_dir=tmp_path / "none")
    kernel = dispatcher.kernel_for(num_seqs=2, max_context=100, **SHAPE)
    assert kernel is load_kernel(default_config(**SHAPE)).paged_attention_decode
    assert [r.source for r in dispatcher.chosen().values()] == ["heuristic"]


def test_corrupted_database_does_not_crash_dispatch(db):
    (db / "interpreter" / "best.json").write_text('{"schema": "kgen.best", "schema_ver')
    dispatcher = Dispatcher(gpu="interpreter", db_dir=db)
    with pytest.warns(RuntimeWarning, match="best.json"):
        kernel = dispatcher.kernel_for(num_seqs=1, max_context=512, **SHAPE)
    assert kernel is load_kernel(default_config(**SHAPE)).paged_attention_decode


def test_bad_step_values_are_named(db):
    dispatcher = Dispatcher(gpu="interpreter", db_dir=db)
    with pytest.raises(ValueError, match="num_seqs=0"):
        dispatcher.kernel_for(num_seqs=0, max_context=512, **SHAPE)
    with pytest.raises(ValueError, match="head_dim=65"):
        dispatcher.kernel_for(num_seqs=1, max_context=512, **{**SHAPE, "head_dim": 65})


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
    assert seen and all(r.config == odd and r.source in ("exact", "nearest") for r in seen)
    assert all(r.path == str(tmp_path / "db" / "interpreter" / "best.json") for r in seen)
    ref = runtime.generate(tmp_path / "m", prompts, SamplingParams(max_tokens=4), block_size=16,
                           backend="torch")
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in ref]
