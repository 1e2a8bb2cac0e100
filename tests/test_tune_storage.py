"""Storages: one-line errors for bad --storage, the journal's lock and cut tail, claims."""

import json
import os
import subprocess
import sys

import optuna
import pytest

from kgen.cli import main
from kgen.db.tail import repair_tail
from kgen.tune.claims import FileClaims, RdbClaims
from kgen.tune.journal import FlockLock, clear_stale_journal_lock
from kgen.tune.storage import StorageError, describe, open_storage

ARGS = ["tune", "--gpu", "synthetic", "--trials", "2", "--batch", "1", "--context", "512",
        "--quiet"]


@pytest.mark.parametrize("url, says", [
    ("bogus://x", "unknown database kind 'bogus'"),
    ("sqlite:////no/such/folder/tune.db", "the folder /no/such/folder of the SQLite file does "
                                           "not exist"),
    ("sqlite://", "in-memory SQLite database cannot be shared"),
    ("postgresql+nosuchdriver://u@h/db", "unknown database kind"),
])
def test_bad_storage_is_one_line_naming_the_url(tmp_path, capsys, url, says):
    assert main(ARGS + ["--db", str(tmp_path), "--storage", url]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"--storage {url!r}" in err and says in err


def test_unreachable_server_hides_the_password(tmp_path, capsys):
    # a closed local port: the connection is refused at once
    url = "postgresql://user:hunter2@127.0.0.1:9/db"
    assert main(ARGS + ["--db", str(tmp_path), "--storage", url]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "hunter2" not in err
    assert "'postgresql://user:***@127.0.0.1:9/db'" in err
    assert describe(url) == "postgresql://user:***@127.0.0.1:9/db"


def test_flock_is_released_when_its_holder_dies(tmp_path):
    journal = tmp_path / "journal.log"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from kgen.tune.journal import FlockLock\n"
        f"FlockLock({str(journal)!r}).acquire(); print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    holder.kill()
    holder.wait()
    lock = FlockLock(str(journal))
    done = subprocess.run([sys.executable, "-c", (
        "from kgen.tune.journal import FlockLock\n"
        f"l = FlockLock({str(journal)!r}); l.acquire(); l.release(); print('ok')")],
        capture_output=True, text=True, timeout=30)
    assert done.stdout.strip() == "ok"  # not blocked by the dead holder
    lock.acquire()
    lock.release()


def test_legacy_symlink_lock_with_a_relative_target_is_cleared(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.makedirs("db/synthetic")
    # what Optuna's symlink lock left after a SIGTERM with a relative --db: a link to a relative
    # path that, resolved from the link's folder, does not exist
    os.symlink("db/synthetic/journal.log", "db/synthetic/journal.log.lock")
    message = clear_stale_journal_lock("db/synthetic/journal.log", wait_s=0.2)
    assert message and "journal.log.lock" in message and "does not exist" in message
    assert not os.path.lexists("db/synthetic/journal.log.lock")
    assert clear_stale_journal_lock("db/synthetic/journal.log", wait_s=0.2) is None


def test_repair_tail_keeps_a_whole_record_and_sets_aside_a_half_one(tmp_path):
    log = tmp_path / "trials.jsonl"
    log.write_bytes(b'{"a": 1}\n{"b": 2}')  # whole record, only the newline missing
    assert "only the newline was added" in repair_tail(log)
    assert log.read_bytes() == b'{"a": 1}\n{"b": 2}\n'
    log.write_bytes(b'{"a": 1}\n{"b": 2}\n{"c": ')
    message = repair_tail(log)
    assert "moved those bytes" in message
    assert log.read_bytes() == b'{"a": 1}\n{"b": 2}\n'
    aside = [p for p in tmp_path.iterdir() if ".damaged-" in p.name]
    assert len(aside) == 1 and aside[0].read_bytes() == b'{"c": '
    assert repair_tail(log) is None


def test_journal_with_a_cut_last_operation_is_repaired_before_the_next_append(tmp_path):
    path = tmp_path / "journal.log"
    storage = open_storage(str(path))
    study = optuna.create_study(study_name="s", storage=storage.optuna)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    with open(path, "ab") as handle:  # a kill in the middle of Optuna's append
        handle.write(b'{"op_code": 5, "worker_id": "x", "trial_id": 0, "pa')
    with pytest.warns(RuntimeWarning, match="cut short"):
        study = optuna.load_study(study_name="s", storage=open_storage(str(path)).optuna)
        study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    for line in path.read_bytes().splitlines():
        json.loads(line)  # every line whole
    again = optuna.load_study(study_name="s", storage=open_storage(str(path)).optuna)
    assert len(again.trials) == 4


def _two_trials(storage):
    study = optuna.create_study(study_name="claims", storage=storage)
    first, second = study.ask(), study.ask()
    return study, first, second


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # trials asked by hand
@pytest.mark.parametrize("kind", ["journal", "sqlite"])
def test_claims_one_holder_and_a_failed_holder_passes_its_claim(tmp_path, kind):
    location = (str(tmp_path / "journal.log") if kind == "journal"
                else f"sqlite:///{tmp_path / 'tune.db'}")
    storage = open_storage(location)
    assert isinstance(storage.claims, FileClaims if kind == "journal" else RdbClaims)
    study, first, second = _two_trials(storage.optuna)
    claims = storage.claims
    assert claims.claim(study, first._trial_id, "variant-a") is None  # first holds it
    assert claims.claim(study, second._trial_id, "variant-a") == first._trial_id
    assert claims.claim(study, second._trial_id, "variant-b") is None  # another key is free
    assert claims.claim(study, first._trial_id, "variant-a") is None  # asking again: still its
    study.tell(first, state=optuna.trial.TrialState.FAIL)  # killed: its claim passes on
    assert claims.claim(study, second._trial_id, "variant-a") is None
    assert claims.once(study, "warm-start") and not claims.once(study, "warm-start")


def test_storage_errors_are_value_errors():
    with pytest.raises(StorageError):
        open_storage("bogus://x")
    assert issubclass(StorageError, ValueError)
