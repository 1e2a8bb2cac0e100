"""``kgen variants``, ``kgen emit`` and ``kgen demo`` from the command line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kgen.cli import main
from kgen.variant import VariantConfig


def test_variants_lists_filtered_keys(capsys):
    assert main(["variants", "--head-dim", "128", "--block-size", "16", "--group-size", "1,4",
                 "--split-k", "auto", "--dtype", "bf16", "--limit", "0"]) == 0
    keys = capsys.readouterr().out.split()
    configs = [VariantConfig.from_key(k) for k in keys]
    assert configs and {c.group_size for c in configs} == {1, 4}
    assert all(c.split_auto and c.dtype == "bf16" and c.head_dim == 128 for c in configs)


def test_variants_count_json_and_all(capsys):
    assert main(["variants", "--head-dim", "64", "--block-size", "8", "--group-size", "2",
                 "--dtype", "fp16", "--split-k", "1", "--count"]) == 0
    kept, total = [int(w) for w in capsys.readouterr().out.split() if w.isdigit()][:2]
    assert 0 < kept < total == 5 * 5 * 5
    assert main(["variants", "--head-dim", "64", "--block-size", "8", "--group-size", "2",
                 "--dtype", "fp16", "--split-k", "1", "--all", "--json", "--limit", "0"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == total and sum(r["pruned"] is None for r in rows) == kept
    assert main(["variants", "--head-dim", "64", "--limit", "3"]) == 0
    assert "more match" in capsys.readouterr().out.splitlines()[-1]


def test_emit_by_key_and_defaults(tmp_path, capsys):
    key = "paged_decode-d64-b32-g2-sauto-t32-w2-st1-fp16"
    assert main(["emit", "--key", key, "-o", str(tmp_path / "a.py")]) == 0
    assert f'VARIANT_KEY = "{key}"' in (tmp_path / "a.py").read_text()
    assert main(["emit", "--head-dim", "112", "--block-size", "1", "-o", str(tmp_path / "b.py")]) == 0
    assert "paged_decode-d112-b1-g1-sauto-t64-w4-st2-fp16" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["emit", "--head-dim", "100", "--block-size", "16", "-o", "x.py"], "head_dim=100"),
    (["emit", "--block-size", "16", "-o", "x.py"], "--head-dim required"),
    (["emit", "--head-dim", "64", "--block-size", "16", "--split-k", "x", "-o", "x.py"], "split_k='x'"),
    (["emit", "--head-dim", "sixty", "--block-size", "16", "-o", "x.py"], "--head-dim='sixty'"),
    (["emit", "--key", "bogus", "-o", "x.py"], "'bogus' is malformed"),
    (["emit", "--key", "paged_decode-d64-b16-g1-s1-t16-w16-st1-fp16", "-o", "x.py"], "pruned"),
    (["emit", "--head-dim", "64", "--block-size", "16", "-o", "x.txt"], "x.txt"),
    (["emit", "--head-dim", "64"], "-o/--output"),
    (["variants", "--dtype", "fp8"], "dtype='fp8'"),
    (["variants", "--group-size", "17"], "group_size=17"),
    (["variants", "--limit", "-1"], "--limit=-1"),
    (["variants", "--bogus"], "unrecognized arguments"),
])
def test_bad_options_exit_2_with_one_line(tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    result = subprocess.run([sys.executable, "-m", "kgen.cli", *argv], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not (tmp_path / "x.py").exists()


def _kgen_command() -> list[str]:
    """The installed ``kgen`` console script (what a user types), else ``python -m kgen.cli``."""
    script = Path(sys.executable).with_name("kgen")
    return [str(script)] if script.exists() else [sys.executable, "-m", "kgen.cli"]


@pytest.mark.parametrize("target, message", [
    ("folder.py", "is a directory"),              # an existing folder, even one named like a module
    ("folder", "is a directory"),
    ("notes.txt/decode.py", "under '{tmp}/notes.txt', which is a file"),
    ("notes.txt/sub/decode.py", "under '{tmp}/notes.txt', which is a file"),
])
def test_emit_onto_a_folder_or_under_a_file_is_one_line(tmp_path, target, message):
    (tmp_path / "folder.py").mkdir()
    (tmp_path / "folder").mkdir()
    (tmp_path / "notes.txt").write_text("keep me\n")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    out = tmp_path / target
    result = subprocess.run([*_kgen_command(), "emit", "--head-dim", "64", "--block-size", "16",
                             "-o", str(out)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("kgen emit: error:") and repr(str(out)) in lines[0], lines[0]
    assert message.format(tmp=tmp_path) in lines[0], lines[0]
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written
    assert (tmp_path / "notes.txt").read_text() == "keep me\n"


def test_demo_runs_and_passes(tmp_path):
    result = subprocess.run([sys.executable, "-m", "kgen.cli", "demo", "--out-dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3/3 passed" in result.stdout and "FAIL" not in result.stdout
    assert len(list(tmp_path.glob("paged_decode-*.py"))) == 3


def test_variants_and_emit_take_kv_dtype_and_features(tmp_path, capsys):
    assert main(["variants", "--head-dim", "128", "--block-size", "16", "--group-size", "4",
                 "--split-k", "auto", "--dtype", "bf16", "--kv-dtype", "fp8_e4m3,fp8_e5m2",
                 "--features", "soft_cap,sliding_window", "--limit", "0"]) == 0
    configs = [VariantConfig.from_key(k) for k in capsys.readouterr().out.split()]
    assert {c.kv_dtype for c in configs} == {"fp8_e4m3", "fp8_e5m2"}
    assert {c.features for c in configs} == {("sliding_window", "soft_cap")}
    assert main(["variants", "--head-dim", "64", "--block-size", "16", "--group-size", "1",
                 "--split-k", "1", "--num-warps", "4", "--num-stages", "2", "--tile-tokens", "64",
                 "--dtype", "fp16", "--kv-dtype", "fp8_e4m3", "--all"]) == 0
    assert "[not on sm_80: kv_dtype=fp8_e4m3 is not supported on sm_80" in capsys.readouterr().out
    assert main(["variants", "--head-dim", "64", "--kv-dtype", "fp8_e4m3", "--count",
                 "--target", "sm_80"]) == 0
    assert capsys.readouterr().out.startswith("0 variants kept")
    assert main(["emit", "--head-dim", "64", "--block-size", "16", "--kv-dtype", "fp8_e5m2",
                 "--features", "alibi,sinks", "-o", str(tmp_path / "f.py")]) == 0
    assert "paged_decode-d64-b16-g1-sauto-t128-w8-st2-fp16-kvfp8e5m2-alibi-sinks" in \
        capsys.readouterr().out


@pytest.mark.parametrize("argv, message, code", [  # 2: a bad option; 1: a valid one that cannot run
    (["variants", "--kv-dtype", "int8"], "kv_dtype='int8'", 2),
    (["variants", "--features", "rope"], "--features='rope': 'rope' is not a feature", 2),
    (["variants", "--features", "none,alibi"], "--features='none,alibi': 'none' means no feature, yet alibi", 2),
    (["inspect", "--head-dim", "64", "--block-size", "16", "--kv-dtype", "fp8_e4m3",
      "--target", "sm_80"], "cannot run on sm_80", 1),
])
def test_bad_feature_options_exit_with_one_line(argv, message, code):
    result = subprocess.run([sys.executable, "-m", "kgen.cli", *argv], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == code
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
