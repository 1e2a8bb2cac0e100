"""Installed as a wheel: shipped records stay read-only, new ones go to $KGEN_DB or the user's
data folder, and lookups read the user's over the shipped ones."""

import stat

import pytest

from kgen import paths
from kgen.cli import main
from kgen.db.lookup import DbReader
from kgen.db.schema import make_entry, make_provenance
from kgen.db.store import TuningStore
from kgen.device import pseudo_device
from kgen.variant import VariantConfig
from kgen.workload import Workload
from kgen.shape import AttentionShape

SHAPE = dict(dtype="fp16", head_dim=128, block_size=16, group_size=4)
LAYER = AttentionShape(**SHAPE)
SHIPPED_ONLY = Workload("synthetic", batch=64, context=512, **SHAPE)
BOTH = Workload("synthetic", batch=1, context=8192, **SHAPE)


def _config(split):
    return VariantConfig(split_k=split, tile_tokens=64, num_warps=4, num_stages=3, **SHAPE)


@pytest.fixture
def wheel(tmp_path, monkeypatch):
    """kgen as a wheel sees it: no checkout, the records in a read-only package folder."""
    real_templates = paths.templates_dir()
    shipped = tmp_path / "site-packages" / "kgen" / "tuning_db"
    prov = make_provenance(pseudo_device("synthetic"), method="shipped")
    TuningStore(shipped, "synthetic", prov).update_best({
        w.key: make_entry(w, _config(split), time_ms=0.01, default_time_ms=0.02,
                          provenance=prov, trials=4)
        for w, split in ((SHIPPED_ONLY, 1), (BOTH, 2))})
    for folder in (shipped / "synthetic", shipped):
        for path in [*folder.iterdir(), folder]:
            path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    monkeypatch.setattr(paths, "REPO_ROOT", tmp_path / "site-packages")
    monkeypatch.setattr(paths, "_packaged", lambda name: {"tuning_db": shipped,
                                                          "templates": real_templates}[name])
    monkeypatch.delenv("KGEN_DB", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    yield shipped
    for folder in (shipped, shipped / "synthetic"):
        folder.chmod(0o755)


def test_tune_writes_to_the_user_folder_and_lookup_layers_it_over_the_shipped(wheel, tmp_path):
    user = tmp_path / "xdg" / "kgen" / "tuning_db"
    assert not paths.is_checkout()
    assert paths.default_db_dir() == user
    assert paths.db_layers() == [user, wheel]
    before = {p.name: p.read_bytes() for p in (wheel / "synthetic").iterdir()}
    assert main(["tune", "--gpu", "synthetic", "--trials", "3", "--quiet", "--batch", "1",
                 "--context", "8192", "--group-size", "4"]) == 0
    assert (user / "synthetic" / "best.json").is_file()
    assert {p.name: p.read_bytes() for p in (wheel / "synthetic").iterdir()} == before
    mine = TuningStore(user, "synthetic").load_best()["entries"][BOTH.key]
    reader = DbReader()
    upper = reader.lookup("synthetic", LAYER, num_seqs=1, max_context=8192)
    assert upper.source == "exact" and upper.config.key == mine["config_key"]
    assert upper.path == str(user / "synthetic" / "best.json")
    lower = reader.lookup("synthetic", LAYER, num_seqs=64, max_context=512)
    assert lower.source == "exact" and lower.config == _config(1)
    assert lower.path == str(wheel / "synthetic" / "best.json")
    # naming the default folder explicitly reads the same layers
    assert DbReader(user).lookup("synthetic", LAYER, num_seqs=64, max_context=512).config == _config(1)


def test_kgen_db_overrides_the_user_folder_and_is_layered_too(wheel, tmp_path, monkeypatch):
    mine = tmp_path / "mine"
    monkeypatch.setenv("KGEN_DB", str(mine))
    assert paths.default_db_dir() == mine and paths.db_layers() == [mine, wheel]
    assert main(["tune", "--gpu", "synthetic", "--trials", "3", "--quiet", "--batch", "1",
                 "--context", "8192", "--group-size", "4"]) == 0
    assert (mine / "synthetic" / "best.json").is_file()
    assert not (tmp_path / "xdg").exists()
    assert DbReader().lookup("synthetic", LAYER, num_seqs=64, max_context=512).config == _config(1)
    # an explicit other folder is read alone
    assert DbReader(tmp_path / "elsewhere").lookup("synthetic", LAYER, num_seqs=64,
                                                   max_context=512).source == "heuristic"


def test_a_source_checkout_writes_its_committed_tuning_db(monkeypatch):
    monkeypatch.delenv("KGEN_DB", raising=False)
    assert paths.is_checkout()  # the tests run from one
    assert paths.default_db_dir() == paths.REPO_ROOT / "tuning_db" == paths.shipped_db_dir()
    assert paths.db_layers() == [paths.REPO_ROOT / "tuning_db"]
