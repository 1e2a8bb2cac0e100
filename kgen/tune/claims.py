"""Claims: at most one trial measures a candidate, however many workers share the study.

Two workers (processes, machines) may suggest the same candidate at the same moment: the sampler
does not know what the other is about to run, and a study's "already measured?" check only sees
finished trials. Before measuring, a trial claims the candidate's key; a trial that finds it
claimed waits for the holder and copies its outcome (a free trial), unless the holder failed
(killed or interrupted), in which case the claim passes to the asker. The claim must be atomic:

* :class:`RdbClaims` -- a ``kgen_claims`` table in the study's database with the key as its primary
  key: the insert that succeeds wins; a failed holder is replaced by a conditional update.
* :class:`FileClaims` -- for the journal file (one machine): the check and the mark (a ``claim``
  user attribute on the trial) happen under an ``flock`` on ``<journal>.claims``.
* :class:`NullClaims` -- in-memory studies (one process): every claim succeeds.

``once(study, key)`` is true for exactly one caller per study and key (the warm start).
"""

from __future__ import annotations

import fcntl
import os

import optuna

TrialState = optuna.trial.TrialState
_HOLDING = (TrialState.RUNNING, TrialState.COMPLETE, TrialState.PRUNED)
CLAIM_ATTR = "claim"


def _failed(study: optuna.Study, trial_id: int) -> bool:
    try:
        return study._storage.get_trial(trial_id).state == TrialState.FAIL
    except KeyError:  # the holder is gone from the storage
        return True


class NullClaims:
    def claim(self, study, trial_id: int, key: str) -> int | None:
        return None

    def once(self, study, key: str) -> bool:
        return True


class FileClaims:
    """Claims for a journal-file study, serialized by an ``flock`` on ``lock_path``."""

    def __init__(self, lock_path: str) -> None:
        self.lock_path = str(lock_path)

    def _locked(self):
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd

    def _unlock(self, fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def claim(self, study, trial_id: int, key: str) -> int | None:
        fd = self._locked()
        try:
            for trial in study.get_trials(deepcopy=False, states=_HOLDING):
                if trial._trial_id != trial_id and trial.system_attrs.get(CLAIM_ATTR) == key:
                    return trial._trial_id
            study._storage.set_trial_system_attr(trial_id, CLAIM_ATTR, key)
            return None
        finally:
            self._unlock(fd)

    def once(self, study, key: str) -> bool:
        name = f"kgen:{key}"
        fd = self._locked()
        try:
            if study._storage.get_study_system_attrs(study._study_id).get(name):
                return False
            study._storage.set_study_system_attr(study._study_id, name, True)
            return True
        finally:
            self._unlock(fd)


class RdbClaims:
    """Claims in a ``kgen_claims`` table beside Optuna's (created with them, under the same
    schema lock; Optuna ignores it)."""

    def __init__(self, engine) -> None:
        import sqlalchemy as sa

        self.engine = engine
        meta = sa.MetaData()
        # 255 characters each: the two-column primary key stays under MySQL's index limit
        self.table = sa.Table("kgen_claims", meta,
                              sa.Column("study_name", sa.String(255), primary_key=True),
                              sa.Column("claim_key", sa.String(255), primary_key=True),
                              sa.Column("trial_id", sa.Integer, nullable=False))
        meta.create_all(engine)

    def _insert(self, study_name: str, key: str, trial_id: int) -> bool:
        import sqlalchemy.exc as sa_exc

        try:
            with self.engine.begin() as conn:
                conn.execute(self.table.insert().values(study_name=study_name, claim_key=key,
                                                        trial_id=trial_id))
            return True
        except sa_exc.IntegrityError:
            return False

    def _holder(self, study_name: str, key: str) -> int | None:
        import sqlalchemy as sa

        t = self.table
        with self.engine.connect() as conn:
            return conn.execute(sa.select(t.c.trial_id).where(
                t.c.study_name == study_name, t.c.claim_key == key)).scalar()

    def _take_over(self, study_name: str, key: str, old: int, new: int) -> bool:
        t = self.table
        with self.engine.begin() as conn:
            done = conn.execute(t.update().where(
                t.c.study_name == study_name, t.c.claim_key == key, t.c.trial_id == old
            ).values(trial_id=new))
            return done.rowcount == 1

    def claim(self, study, trial_id: int, key: str) -> int | None:
        name = study.study_name
        while True:
            if self._insert(name, key, trial_id):
                return None
            holder = self._holder(name, key)
            if holder is None:  # released between the insert and the read: try again
                continue
            if holder == trial_id:
                return None
            if not _failed(study, holder):
                return holder
            if self._take_over(name, key, holder, trial_id):
                return None

    def once(self, study, key: str) -> bool:
        return self._insert(study.study_name, f"once:{key}", -1)
