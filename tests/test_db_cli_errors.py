"""``kgen db`` errors that name the real problem, and an import that never creates storage.

Before: ``db import --storage "not a url"`` left an empty file of that name in the working
folder and a missing ``sqlite:///`` file became a 120 KB empty database, both before saying
"no study"; ``db check`` with ``$KGEN_DB`` naming a file said "does not exist"; ``db explain`` on
a corrupt best.json said "no database for this GPU"; ``db prune --stale`` on a missing folder
said "0 dropped" and exited 0 where ``db check`` errors.
"""

import pytest

from kgen.cli import main


@pytest.mark.parametrize("storage,says", [
    ("not a url", "is neither a database URL (those contain '://') nor an existing journal file"),
    ("sqlite:///{tmp}/missing.db", "the SQLite file {tmp}/missing.db does not exist"),
    ("sqlite:///{tmp}/empty.db", "holds no Optuna study storage (no 'studies' table)"),
])
def test_import_refuses_before_creating_storage(tmp_path, monkeypatch, capsys, storage, says):
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    (tmp_path / "empty.db").write_bytes(b"")
    storage = storage.format(tmp=tmp_path)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert main(["db", "import", "--storage", storage, "--gpu", "h100", "--db", str(tmp_path / "db")]) == 2
    assert says.format(tmp=tmp_path) in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing created, nothing grown
    assert (tmp_path / "empty.db").read_bytes() == b""


def test_check_with_kgen_db_naming_a_file_says_so(tmp_path, monkeypatch, capsys):
    afile = tmp_path / "db.txt"
    afile.write_text("")
    monkeypatch.setenv("KGEN_DB", str(afile))
    assert main(["db", "check"]) == 2
    assert f"$KGEN_DB folder {afile} is a file, not a folder" in capsys.readouterr().err
    assert main(["db", "prune", "--stale"]) == 2
    assert f"$KGEN_DB folder {afile} is a file, not a folder" in capsys.readouterr().err


def test_prune_on_a_missing_folder_errors_like_check(tmp_path, capsys):
    missing = tmp_path / "nonexistent"
    for command in (["db", "check"], ["db", "prune", "--stale"]):
        assert main([*command, "--db", str(missing)]) == 2
        assert f"--db folder {missing} does not exist" in capsys.readouterr().err
    assert not missing.exists()


def test_explain_on_a_corrupt_best_table_names_the_file(tmp_path, capsys):
    folder = tmp_path / "db" / "h100"
    folder.mkdir(parents=True)
    (folder / "best.json").write_text('{"schema": "kgen.be')
    with pytest.warns(RuntimeWarning, match="unusable"):
        assert main(["db", "explain", "--gpu", "h100", "--batch", "1", "--context", "512",
                     "--db", str(tmp_path / "db")]) == 0
    out = capsys.readouterr().out
    why = next(line for line in out.splitlines() if line.startswith("why: "))
    assert f"its best table is unusable: {folder / 'best.json'}: corrupted or truncated JSON" in why
    assert "no database for this GPU" not in out


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_import_of_an_existing_storage_still_works(tmp_path, capsys, kind):
    storage = f"sqlite:///{tmp_path}/fleet.db" if kind == "sqlite" else str(tmp_path / "fleet.log")
    assert main(["tune", "--gpu", "synthetic", "--trials", "3", "--storage", storage, "--db", str(tmp_path / "a"),
                 "--batch", "1", "--context", "512", "--quiet"]) == 0
    assert main(["db", "import", "--storage", storage, "--gpu", "synthetic", "--db", str(tmp_path / "b")]) == 0
    assert "1 record(s)" in capsys.readouterr().out
