"""The database files: round trip, atomic writes, concurrent writers, corrupted files, db check."""

import json
import multiprocessing

import pytest

from kgen.cli import main
from kgen.db.check import check_db
from kgen.db.schema import SCHEMA_VERSION, DbFormatError, make_entry, make_provenance
from kgen.db.store import TuningStore, block_size_defaults, load_best, read_trials
from kgen.device import pseudo_device
from kgen.workload import Workload
from kgen.variant import VariantConfig

PROV = make_provenance(pseudo_device("synthetic"), method="test", sampler="tpe", seed=3)


def _entry(batch, context, block_size=16, time_ms=1.0, tile=32):
    w = Workload("synthetic", "fp16", 128, block_size, 4, batch, context)
    c = VariantConfig(head_dim=128, block_size=block_size, group_size=4, split_k=2,
                      tile_tokens=tile, num_warps=2, num_stages=3, dtype="fp16")
    return w.key, make_entry(w, c, time_ms=time_ms, default_time_ms=2 * time_ms, provenance=PROV,
                             trials=7)


def _trial(i):
    return {"workload_key": f"w{i % 3}", "config_key": f"c{i}", "status": "ok",
            "time_ms": 0.5 + i, "reason": None, "phase": "search", "trial": i}


def test_round_trip_and_provenance(tmp_path):
    store = TuningStore(tmp_path, "synthetic", PROV)
    key, entry = _entry(4, 2048)
    store.update_best({key: entry})
    store.append_trials([_trial(i) for i in range(5)])
    table = load_best(tmp_path / "synthetic" / "best.json")
    assert table["schema_version"] == SCHEMA_VERSION and table["gpu"] == "synthetic"
    assert table["entries"][key] == entry
    assert entry["speedup"] == 2.0
    assert VariantConfig.from_dict(table["entries"][key]["config"]).key == entry["config_key"]
    for field in ("gpu", "compute_capability", "sm_count", "driver_version", "cuda_version",
                  "torch", "triton", "kgen", "template_hash", "method", "sampler", "seed", "date"):
        assert field in table["provenance"]
    records = store.read_trials()
    assert records[0] == {"type": "provenance", "id": records[1]["provenance_id"],
                          "schema_version": SCHEMA_VERSION, "provenance": PROV}
    assert [r["config_key"] for r in records[1:]] == [f"c{i}" for i in range(5)]
    # no temp files left behind, and the table is readable by others
    assert sorted(p.name for p in (tmp_path / "synthetic").iterdir()) == [
        ".kgen.lock", "best.json", "trials.jsonl"]
    assert (tmp_path / "synthetic" / "best.json").stat().st_mode & 0o044 == 0o044


def test_update_merges_and_writing_needs_provenance(tmp_path):
    store = TuningStore(tmp_path, "synthetic", PROV)
    store.update_best(dict([_entry(1, 512)]))
    store.update_best(dict([_entry(8, 512)]))
    assert len(store.load_best()["entries"]) == 2
    with pytest.raises(ValueError, match="provenance"):
        TuningStore(tmp_path, "synthetic").update_best(dict([_entry(2, 512)]))


def test_bad_records_are_refused_before_writing(tmp_path):
    store = TuningStore(tmp_path, "synthetic", PROV)
    with pytest.raises(DbFormatError, match="no reason"):
        store.append_trials([{**_trial(0), "status": "failed"}])
    key, entry = _entry(1, 512)
    with pytest.raises(DbFormatError, match="time_ms=-1"):
        store.update_best({key: {**entry, "time_ms": -1}})
    assert not (tmp_path / "synthetic" / "best.json").exists()


def _writer(root, index):
    store = TuningStore(root, "synthetic", PROV)
    for j in range(10):
        key, entry = _entry(2 ** (index * 4 + j % 4), 512 * 2 ** (j // 4), time_ms=1 + j)
        store.update_best({key: entry})
        store.append_trials([_trial(100 * index + j)])


def test_two_writers_at_once_lose_nothing(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), i)) for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    table = TuningStore(tmp_path, "synthetic").load_best()
    assert len(table["entries"]) == 2 * 10  # each writer's 10 distinct (batch, context) keys
    trials = [r for r in read_trials(tmp_path / "synthetic" / "trials.jsonl") if r["type"] == "trial"]
    assert sorted(r["trial"] for r in trials) == sorted([j for j in range(10)] +
                                                         [100 + j for j in range(10)])


def test_block_size_defaults_compare_common_points():
    entries = dict([_entry(1, 512, 16, 1.0), _entry(2, 512, 16, 4.0), _entry(1, 512, 32, 1.5),
                    _entry(2, 512, 32, 2.0), _entry(8, 512, 32, 0.01)])
    rec = block_size_defaults(entries)["fp16-d128"]
    # common points: (1,512), (2,512): geomean 2.0 for 16 vs sqrt(3) for 32; the 32-only point
    # (which would flatter block 32) is not counted
    assert rec["block_size"] == 32 and rec["workloads"] == 2
    assert rec["geomean_ms"]["16"] == pytest.approx(2.0)


@pytest.mark.parametrize("damage, message", [
    (lambda text: text[: len(text) // 2], "corrupted or truncated JSON"),
    (lambda text: "", "file is empty"),
    (lambda text: text.replace(f'"schema_version": {SCHEMA_VERSION}', '"schema_version": 99'),
     "schema_version=99 is newer"),
    (lambda text: text.replace('"config_key": "paged_decode', '"config_key": "paged_xx'),
     "config_key"),
    (lambda text: text.replace('"kgen.best"', '"other"'), "schema='other'"),
    (lambda text: json.dumps({**json.loads(text), "block_size_defaults": {"fp16-d128": 16}}),
     "block_size_defaults 'fp16-d128'"),
    (lambda text: json.dumps({**json.loads(text),
                              "block_size_defaults": {"fp16-d128": {"block_size": "16"}}}),
     "block_size_defaults 'fp16-d128'"),
])
def test_damaged_best_table_is_named(tmp_path, capsys, damage, message):
    store = TuningStore(tmp_path, "synthetic", PROV)
    store.update_best(dict([_entry(1, 512)]))
    path = tmp_path / "synthetic" / "best.json"
    path.write_text(damage(path.read_text()))
    with pytest.raises(DbFormatError, match=message) as info:
        load_best(path)
    assert str(path) in str(info.value)
    reports = check_db(tmp_path)
    bad = [r for r in reports if r.problem]
    assert len(bad) == 1 and str(path) in bad[0].problem
    assert main(["db", "check", "--db", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert f"BAD  {path}" in out and "1 bad" in out
    assert main(["db", "show", "--db", str(tmp_path)]) == 2  # one-line error naming the file
    assert str(path) in capsys.readouterr().err


def test_damaged_trial_log_and_journal_are_named(tmp_path):
    store = TuningStore(tmp_path, "synthetic", PROV)
    store.update_best(dict([_entry(1, 512)]))
    store.append_trials([_trial(i) for i in range(3)])
    log = tmp_path / "synthetic" / "trials.jsonl"
    text = log.read_text()
    log.write_text(text[:-5])  # a killed writer's half line
    with pytest.raises(DbFormatError, match=r"trials.jsonl:4: last line is truncated"):
        read_trials(log)
    log.write_text(text.replace(f'"schema_version": {SCHEMA_VERSION}', '"schema_version": "1"', 1))
    with pytest.raises(DbFormatError, match=r"trials.jsonl:1: schema_version='1' is not an integer"):
        read_trials(log)
    log.write_text(text.replace('"status": "ok"', '"status": "great"', 1))
    with pytest.raises(DbFormatError, match=r"trials.jsonl:2: status='great'"):
        read_trials(log)
    (tmp_path / "synthetic" / "journal.log").write_text('{"op_code": 0}\nnot json\n')
    problems = {r.path.rsplit("/", 1)[1]: r.problem for r in check_db(tmp_path)}
    assert "trials.jsonl:2" in problems["trials.jsonl"]
    assert "journal.log:2: corrupted journal line" in problems["journal.log"]
    assert problems["best.json"] is None


def test_check_flags_a_table_in_the_wrong_folder(tmp_path):
    TuningStore(tmp_path, "synthetic", PROV).update_best(dict([_entry(1, 512)]))
    (tmp_path / "h100").mkdir()
    (tmp_path / "h100" / "best.json").write_text((tmp_path / "synthetic" / "best.json").read_text())
    bad = [r.problem for r in check_db(tmp_path) if r.problem]
    assert len(bad) == 1 and "gpu='synthetic' but the folder is 'h100'" in bad[0]
    data = json.loads((tmp_path / "synthetic" / "best.json").read_text())
    assert data["gpu"] == "synthetic"
