"""Lookup with every fallback: exact, nearest, other triton, same family, heuristic; bad files."""

import logging

import pytest

from kgen.cli import main
from kgen.db import lookup as lk
from kgen.db.schema import make_entry, make_provenance
from kgen.db.store import TuningStore
from kgen.device import DeviceInfo
from kgen.shape import AttentionShape
from kgen.space import default_config
from kgen.workload import Workload
from kgen.variant import VariantConfig

SHAPE = dict(dtype="fp16", head_dim=128, block_size=16, group_size=4)


def _device(name):
    return DeviceInfo(name=name, full_name=f"NVIDIA {name.upper()}", family=None)


def _config(split, warps=4):
    return VariantConfig(head_dim=128, block_size=16, group_size=4, split_k=split, tile_tokens=32,
                         num_warps=warps, num_stages=3, dtype="fp16")


def _write(root, gpu, rows, triton=None):
    """rows: [(batch, context, split)] -> entries of ``gpu`` tuned under ``triton``."""
    prov = make_provenance(_device(gpu), method="test")
    prov["triton"] = triton or lk.triton_version()
    entries = {}
    for batch, context, split in rows:
        w = Workload(gpu=gpu, batch=batch, context=context, **SHAPE)
        entries[w.key] = make_entry(w, _config(split), time_ms=0.1 * split, default_time_ms=1.0,
                                    provenance=prov, trials=5)
    TuningStore(root, gpu, prov).update_best(entries)


@pytest.fixture(autouse=True)
def _fresh_log_once():
    lk._logged.clear()
    yield
    lk._logged.clear()


def _lookup(root, gpu, batch, context, **shape):
    return lk.DbReader(root).lookup(gpu, AttentionShape(**{**SHAPE, **shape}), num_seqs=batch,
                                    max_context=context)


def test_exact_and_nearest(tmp_path):
    _write(tmp_path, "h100", [(1, 1024, 2), (1, 8192, 8), (16, 1024, 1), (16, 8192, 4)])
    exact = _lookup(tmp_path, "NVIDIA H100 80GB HBM3", 16, 8192)
    assert exact.source == "exact" and exact.config == _config(4)
    assert exact.entry_key == "h100-fp16-d128-b16-g4-n16-c8192"
    near = _lookup(tmp_path, "h100", 12, 5000)  # buckets 16, 4096: nearest is (16, 8192)
    assert near.source == "nearest" and near.config == _config(4)
    assert near.workload.key == "h100-fp16-d128-b16-g4-n16-c4096"
    near = _lookup(tmp_path, "h100", 2, 1500)  # buckets 2, 2048 -> (1, 1024)
    assert near.source == "nearest" and near.config == _config(2)


def test_outside_the_tuned_range_is_heuristic(tmp_path):
    _write(tmp_path, "h100", [(1, 1024, 2), (16, 8192, 4)])
    far = _lookup(tmp_path, "h100", 64, 4096)  # batch 64 > the tuned 16
    assert far.source == "heuristic"
    assert far.config == default_config(**SHAPE)
    other_shape = _lookup(tmp_path, "h100", 1, 1024, group_size=8)
    assert other_shape.source == "heuristic"


def test_other_triton_version_warns_once(tmp_path, caplog):
    _write(tmp_path, "h100", [(1, 1024, 2), (16, 8192, 4)], triton="2.0.0")
    with caplog.at_level(logging.INFO, logger="kgen.db"):
        first = _lookup(tmp_path, "h100", 16, 8192)
        _lookup(tmp_path, "h100", 16, 8192)
    assert first.source == "other-triton" and first.config == _config(4)
    assert "triton 2.0.0" in first.reason
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "other-triton" in warnings[0].getMessage()


def test_same_triton_in_range_preferred_over_other(tmp_path):
    _write(tmp_path, "h100", [(1, 1024, 2)], triton="2.0.0")
    _write(tmp_path, "h100", [(1, 512, 4), (16, 8192, 8)])
    result = _lookup(tmp_path, "h100", 1, 1024)  # exact only under 2.0.0; this triton's in range
    assert result.source == "nearest" and result.config == _config(4)
    result = _lookup(tmp_path, "h100", 32, 1024)  # outside every tuned range: heuristic
    assert result.source == "heuristic"


def test_family_fallback(tmp_path, caplog):
    _write(tmp_path, "h200", [(1, 1024, 8), (16, 8192, 16)])
    _write(tmp_path, "a100", [(1, 1024, 2), (16, 8192, 2)])  # ampere: not h100's family
    with caplog.at_level(logging.WARNING, logger="kgen.db"):
        result = _lookup(tmp_path, "h100", 1, 1024)
    assert result.source == "family" and result.config == _config(8)
    assert "h200" in result.path and "same family" in result.reason
    assert any("family" in r.getMessage() for r in caplog.records)
    assert _lookup(tmp_path, "l40s", 1, 1024).source == "heuristic"  # ada: no ada table


def test_no_database_is_heuristic(tmp_path):
    result = _lookup(tmp_path / "missing", "h100", 4, 4096)
    assert result.source == "heuristic" and "no database" in result.reason
    assert result.config == default_config(**SHAPE)


@pytest.mark.parametrize("content", ["{", "", '{"schema": "kgen.best", "schema_version": 7}'])
def test_corrupted_file_falls_back_with_a_warning(tmp_path, caplog, content):
    _write(tmp_path, "h100", [(1, 1024, 2)])
    (tmp_path / "h100" / "best.json").write_text(content)
    with pytest.warns(RuntimeWarning, match="best.json"):
        result = _lookup(tmp_path, "h100", 1, 1024)
    assert result.source == "heuristic"


def test_lookup_of_the_middle_and_preferred_block_size(tmp_path):
    _write(tmp_path, "interpreter", [(1, 512, 2), (4, 2048, 4), (16, 8192, 8)])
    layer = AttentionShape(**SHAPE)
    # no batch/context: the middle of the tuned range
    assert lk.lookup("interpreter", layer, db_dir=tmp_path).config == _config(4)
    assert lk.lookup("interpreter", layer, db_dir=tmp_path, num_seqs=1,
                     max_context=600).config == _config(2)
    reader = lk.DbReader(tmp_path)
    assert reader.preferred_block_size("interpreter", AttentionShape("fp16", 128)) == 16
    assert reader.preferred_block_size("interpreter", AttentionShape("bf16", 128)) is None


def test_explain_cli(tmp_path, capsys):
    _write(tmp_path, "h100", [(1, 1024, 2), (16, 8192, 4)])
    assert main(["db", "explain", "--db", str(tmp_path), "--gpu", "h100", "--batch", "12",
                 "--context", "5000", "--group-size", "4"]) == 0
    out = capsys.readouterr().out
    assert "source: nearest" in out and _config(4).key in out
    assert "h100-fp16-d128-b16-g4-n16-c8192" in out
    assert main(["db", "explain", "--db", str(tmp_path), "--gpu", "h100", "--batch", "0",
                 "--context", "6000"]) == 2
    assert "num_seqs=0" in capsys.readouterr().err


def test_emit_gpu_picks_the_record(tmp_path, capsys):
    import argparse

    from kgen.commands.db import emit_config_from_db

    _write(tmp_path, "interpreter", [(1, 512, 2), (4, 2048, 4), (16, 8192, 8)])
    args = argparse.Namespace(gpu="interpreter", batch=None, context=None, db=str(tmp_path))
    # block size: the one recorded as fastest; batch/context: the middle of the tuned range
    assert emit_config_from_db(args, {"head_dim": 128, "group_size": 4}) == _config(4)
    assert "kgen emit: exact: interpreter-fp16-d128-b16-g4-n4-c2048" in capsys.readouterr().err
    args.batch, args.context = 16, 9000
    assert emit_config_from_db(args, {"head_dim": 128, "group_size": 4,
                                      "block_size": 16}) == _config(8)
    with pytest.raises(ValueError, match="drop --split-k, --num-warps"):
        emit_config_from_db(args, {"head_dim": 128, "split_k": 2, "num_warps": 4})
    with pytest.raises(ValueError, match="--head-dim is required"):
        emit_config_from_db(args, {"block_size": 16})
    with pytest.raises(ValueError, match="no fastest block size is recorded"):
        emit_config_from_db(args, {"head_dim": 128, "dtype": "bf16"})


def test_emit_gpu_writes_the_recorded_best(tmp_path, capsys):
    _write(tmp_path, "h100", [(1, 1024, 2), (16, 8192, 4)])
    out = tmp_path / "best.py"
    argv = ["emit", "--gpu", "h100", "--db", str(tmp_path), "--head-dim", "128", "--block-size", "16",
            "--group-size", "4", "--dtype", "fp16", "--batch", "16", "--context", "8192",
            "-o", str(out)]
    assert main(argv) == 0
    assert f'VARIANT_KEY = "{_config(4).key}"' in out.read_text()
    assert "exact" in capsys.readouterr().err
    # Launch options come from the record: giving one as well is a named error (exit 2).
    assert main(argv + ["--num-warps", "8"]) == 2
    assert "--num-warps" in capsys.readouterr().err
    # --batch / --context choose a record, so without --gpu they are an error, not ignored
    plain = ["emit", "--head-dim", "128", "--block-size", "16", "--batch", "4", "-o", str(out)]
    assert main(plain) == 2
    assert "--batch=4 only applies with --gpu" in capsys.readouterr().err


def test_malformed_block_size_defaults_fall_back_with_a_warning(tmp_path):
    """The runtime asks for the fastest block size: a hand-damaged record must not crash it."""
    import json

    _write(tmp_path, "interpreter", [(1, 512, 2)])
    path = tmp_path / "interpreter" / "best.json"
    data = json.loads(path.read_text())
    data["block_size_defaults"]["fp16-d128"] = 16  # not {"block_size": 16, ...}
    path.write_text(json.dumps(data))
    with pytest.warns(RuntimeWarning, match="block_size_defaults"):
        assert lk.DbReader(tmp_path).preferred_block_size("interpreter",
                                                          AttentionShape("fp16", 128)) is None


def test_other_triton_fallback_never_hands_out_this_tritons_entries(tmp_path):
    _write(tmp_path, "h100", [(8, 16384, 8)], triton="2.0.0")
    _write(tmp_path, "h100", [(8, 1024, 2), (8, 2048, 4)])
    # outside this triton's tuned contexts (1024..2048) and outside the other's (16384 only)
    result = _lookup(tmp_path, "h100", 8, 4096)
    assert result.source == "heuristic", result.reason


def test_entries_tuned_against_another_default_are_not_served(tmp_path, caplog):
    """Issue 13: records tuned when the default was single-pass kept being served after the default
    became split-K auto, slower than it (0.16x SDPA at 1 x 32k). An entry whose ``default_key`` is
    not today's default is held back like one measured against other templates; an entry older
    than the field is judged by its templates alone."""
    from kgen.db.stale import not_current

    prov = make_provenance(_device("h100"), method="test")
    prov["triton"] = lk.triton_version()
    entries = {}
    old_default = "paged_decode-d128-b16-g4-s1-t64-w4-st2-fp16"
    for batch, context, default_key in ((16, 8192, old_default), (1, 1024, None),
                                        (1, 8192, default_config(**SHAPE).key)):
        w = Workload(gpu="h100", batch=batch, context=context, **SHAPE)
        entry = make_entry(w, _config(8), time_ms=0.1, default_time_ms=1.0, provenance=prov, trials=5,
                           default_key=default_key)
        if default_key is None:
            del entry["default_key"]  # written before the field existed
        entries[w.key] = entry
    TuningStore(tmp_path, "h100", prov).update_best(entries)
    stale_key = "h100-fp16-d128-b16-g4-n16-c8192"
    assert "tuned against the default " + old_default in not_current(entries[stale_key])
    assert not_current(entries["h100-fp16-d128-b16-g4-n1-c1024"]) is None
    with caplog.at_level(logging.WARNING, logger="kgen.db"):
        assert _lookup(tmp_path, "h100", 1, 8192).source == "exact"
        assert _lookup(tmp_path, "h100", 1, 1024).source == "exact"  # the legacy entry: current templates
        stale = _lookup(tmp_path, "h100", 16, 8192)  # held back; none other in range
        assert stale.source == "heuristic" and stale.config == default_config(**SHAPE)
        assert "held back" in stale.reason
    assert stale_key in caplog.text and "the default is now " + default_config(**SHAPE).key in caplog.text


def test_make_entry_records_todays_default():
    w = Workload(gpu="h100", batch=4, context=4096, **SHAPE)
    entry = make_entry(w, _config(2), time_ms=0.1, default_time_ms=0.2, provenance={}, trials=1)
    assert entry["default_key"] == default_config(**SHAPE).key
