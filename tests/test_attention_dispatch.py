"""Both kernel families in the tuner, the database and dispatch: query-length buckets, the faster
family's record for a decode step, the any-length contract for every step."""

import pytest
import torch

from kgen.build import load_kernel
from kgen.cli import main
from kgen.db.check import check_db
from kgen.db.lookup import DbReader
from kgen.db.schema import make_entry, make_provenance
from kgen.db.store import TuningStore
from kgen.device import pseudo_device
from kgen.dispatch import Dispatcher
from kgen.families import default_variant
from kgen.plan import decode_as_attention, variant_key
from kgen.reference import within_tolerance
from kgen.reference_varlen import make_varlen_inputs, paged_attention_varlen_reference
from kgen.shape import AttentionShape
from kgen.space import default_config
from kgen.space_attention import default_attention_config
from kgen.workload import Workload, query_bucket

SHAPE = dict(dtype="fp16", head_dim=64, block_size=16, group_size=2)
LAYER = AttentionShape(**SHAPE)
PROV = make_provenance(pseudo_device("interpreter"), method="test")


def test_workload_keys_name_the_family_and_query_bucket():
    decode = Workload("h100", batch=8, context=4096, **SHAPE)
    assert decode.key == "h100-fp16-d64-b16-g2-n8-c4096" and decode.kernel == "decode"
    assert decode.to_dict() == Workload.from_key(decode.key).to_dict()
    assert "query_len" not in decode.to_dict()  # a decode record is written as it always was
    spec = Workload("h100", batch=8, context=4096, query_len=4, features="sliding_window", **SHAPE)
    assert spec.key == "h100-fp16-d64-b16-g2-n8-c4096-q4-swa" and spec.kernel == "attention"
    both = Workload("h100", batch=8, context=4096, kernel="attention", **SHAPE)
    assert both.key == "h100-fp16-d64-b16-g2-n8-c4096-q1" and Workload.from_key(both.key) == both
    assert [query_bucket(q) for q in (1, 2, 3, 5, 16, 17, 700, 5000)] == [1, 2, 4, 4, 16, 16, 512, 2048]
    with pytest.raises(ValueError, match="kernel=decode serves one query token"):
        Workload("h100", batch=8, context=4096, query_len=4, kernel="decode", **SHAPE)
    with pytest.raises(ValueError, match="query_len=4096 is above the largest bucket"):
        Workload("h100", batch=8, context=4096, query_len=4096, **SHAPE)
    assert default_variant(spec) == default_attention_config(**spec.variant_fields())
    assert default_variant(decode) == default_config(**decode.variant_fields())


def _db(tmp_path, records):
    """records: (query_len, kernel, config, time_ms) at batch 4, context 1024."""
    entries = {}
    for q, kernel, config, ms in records:
        w = Workload("interpreter", batch=4, context=1024, query_len=q, kernel=kernel, **SHAPE)
        entries[w.key] = make_entry(w, config, time_ms=ms, default_time_ms=ms, provenance=PROV,
                                    trials=1)
    TuningStore(tmp_path, "interpreter", PROV).update_best(entries)
    assert all(r.problem is None for r in check_db(tmp_path))
    return tmp_path


DECODE = default_config(**SHAPE).replace(split_k=2, tile_tokens=32)
ATTN = default_attention_config(**SHAPE).replace(split_k=4, tile_tokens=32)
PREFILL = default_attention_config(**SHAPE).replace(q_tile=32, split_k=1)


@pytest.mark.parametrize("decode_ms,attn_ms", [(1.0, 2.0), (2.0, 1.0)])
def test_a_decode_step_gets_the_faster_familys_record(tmp_path, decode_ms, attn_ms):
    db = _db(tmp_path, [(1, "decode", DECODE, decode_ms), (1, "attention", ATTN, attn_ms),
                        (512, "attention", PREFILL, 5.0)])
    reader = DbReader(db)
    step = reader.lookup("interpreter", LAYER, num_seqs=4, max_context=1000)
    assert step.source == "exact" and step.config == (DECODE if decode_ms < attn_ms else ATTN)
    only = reader.lookup("interpreter", LAYER, num_seqs=4, max_context=1000, kernel="decode")
    assert only.config == DECODE
    # longer queries are served only by records of longer queries, inside their tuned range
    spec = reader.lookup("interpreter", LAYER, num_seqs=4, max_context=1000, max_query_len=600)
    assert spec.config == PREFILL and spec.source == "exact"
    short = reader.lookup("interpreter", LAYER, num_seqs=4, max_context=1000, max_query_len=8)
    assert short.source == "heuristic" and short.config == default_attention_config(**SHAPE)
    plan = Dispatcher("interpreter", db).plan(LAYER)
    assert plan.decode_kernel(4, 1000) is load_kernel(DECODE).paged_attention_decode
    assert plan.kernel(4, 1000, 600) is load_kernel(PREFILL).paged_attention
    assert variant_key(plan.kernel(4, 1000)) == (DECODE if decode_ms < attn_ms else ATTN).key


def test_without_records_each_query_bucket_has_its_heuristic_default(tmp_path):
    reader = DbReader(tmp_path / "none")
    assert reader.lookup("interpreter", LAYER, num_seqs=2, max_context=100).config == default_config(**SHAPE)
    spec = reader.lookup("interpreter", LAYER, num_seqs=2, max_context=100, max_query_len=8)
    assert spec.source == "heuristic" and spec.config == default_attention_config(**SHAPE)


def test_every_step_kind_runs_through_plan_kernel_against_the_reference(tmp_path):
    """A mixed step (prefill chunk, extend, decode, speculative rows) and a decode-only step, both
    through ``plan.kernel`` with the contract's arguments, into NaN-poisoned outputs."""
    plan = Dispatcher("interpreter", tmp_path / "none").plan(LAYER)
    mixed = make_varlen_inputs([20, 1, 3, 0], [0, 33, 17, 5], 4, 2, 64, 16, "fp16", seed=3,
                               poison_unused=True)
    for inputs, q in ((mixed, 20), (make_varlen_inputs([1, 1], [40, 16], 4, 2, 64, 16, "fp16",
                                                        seed=4, poison_unused=True), 1)):
        out = torch.full_like(inputs["query"], float("nan"))
        plan.kernel(len(inputs["seq_lens"]), int(inputs["seq_lens"].max()), q)(
            **inputs, out=out, max_query_len=q, max_seq_len=int(inputs["seq_lens"].max()))
        assert within_tolerance(out, paged_attention_varlen_reference(**inputs), "fp16")


def test_a_decode_kernel_behind_the_contract_refuses_longer_queries():
    decode = decode_as_attention(load_kernel(DECODE).paged_attention_decode)
    inputs = make_varlen_inputs([1, 2], [5, 5], 4, 2, 64, 16, "fp16", seed=5)
    with pytest.raises(ValueError, match=r"query.shape\[0\]=3 rows for 2 sequences"):
        decode(**inputs)
    ones = make_varlen_inputs([1, 1], [5, 9], 4, 2, 64, 16, "fp16", seed=5)
    ones["query_start_loc"] = torch.tensor([0, 2, 2], dtype=torch.int32)  # rows 2, 0: not decode
    with pytest.raises(ValueError, match="is not 0..2"):
        decode(**ones, validate=True)


def test_kgen_tune_searches_the_attention_family_per_query_bucket(tmp_path, capsys):
    args = ["tune", "--gpu", "synthetic", "--trials", "6", "--quiet", "--db", str(tmp_path),
            "--head-dim", "64", "--group-size", "2", "--batch", "4", "--context", "1024"]
    assert main(args + ["--query-len", "1,8,512"]) == 0  # longer queries: the attention family
    assert main(args + ["--kernel", "decode"]) == 0
    with pytest.raises(SystemExit):
        main(args + ["--kernel", "flash"])
    assert main(args + ["--kernel", "decode", "--query-len", "8"]) == 2
    assert "--kernel decode serves one query token" in capsys.readouterr().err
    entries = TuningStore(tmp_path, "synthetic").load_best()["entries"]
    assert sorted(entries) == ["synthetic-fp16-d128-b16-g2-n4-c1024".replace("d128", "d64"),
                               "synthetic-fp16-d64-b16-g2-n4-c1024-q1",
                               "synthetic-fp16-d64-b16-g2-n4-c1024-q512",
                               "synthetic-fp16-d64-b16-g2-n4-c1024-q8"]
    assert all(e["config_key"].startswith("paged_attention-") for k, e in entries.items() if "-q" in k)
    assert all(r.problem is None for r in check_db(tmp_path))
    # the decode bucket's two records: dispatch serves the faster one
    reader = DbReader(tmp_path)
    step = reader.lookup("synthetic", LAYER, num_seqs=4, max_context=1024)
    times = {e["config_key"]: e["time_ms"] for k, e in entries.items() if k.endswith(("c1024", "q1"))}
    assert step.config.key == min(times, key=times.get)
    assert main(["db", "explain", "--db", str(tmp_path), "--gpu", "synthetic", "--batch", "4",
                 "--context", "1024", "--head-dim", "64", "--group-size", "2", "--query-len",
                 "600"]) == 0
    assert "-q512" in capsys.readouterr().out


def test_interpreter_tuning_of_the_attention_family_checks_and_records_real_kernels(tmp_path):
    """The kernel measurer runs the varlen contract against the float64 reference before timing;
    a wrong candidate is a failed measurement, never a record."""
    assert main(["tune", "--gpu", "interpreter", "--kernel", "attention", "--query-len", "4",
                 "--trials", "2", "--quiet", "--db", str(tmp_path), "--head-dim", "64",
                 "--group-size", "2", "--batch", "2", "--context", "64"]) == 0
    (entry,) = TuningStore(tmp_path, "interpreter").load_best()["entries"].values()
    assert entry["workload"]["query_len"] == 4 and entry["config_key"].startswith("paged_attention-")
    trials = [t for t in TuningStore(tmp_path, "interpreter").read_trials() if t.get("type") == "trial"]
    assert {t["status"] for t in trials} == {"ok"} and len(trials) >= 3
