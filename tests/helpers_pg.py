"""A fresh PostgreSQL database per test, on the server ``tests/postgres.sh start`` runs.

The server's URL comes from ``$KGEN_TEST_PG_URL`` (the README's test command and ``.ci/run``
export it). Without it the tests that need the server FAIL with a message saying how to start
one; only ``KGEN_SKIP_PG=1``, set on purpose, skips them.
"""

from __future__ import annotations

import os
import uuid

import pytest

START_HINT = ("start one with: export KGEN_TEST_PG_URL=$(bash tests/postgres.sh start)  "
              "(or set KGEN_SKIP_PG=1 to skip these tests on purpose)")


def server_url() -> str:
    url = os.environ.get("KGEN_TEST_PG_URL")
    if url:
        return url
    if os.environ.get("KGEN_SKIP_PG") == "1":
        pytest.skip("KGEN_SKIP_PG=1: PostgreSQL tests skipped on purpose")
    pytest.fail(f"KGEN_TEST_PG_URL is not set: this test needs a PostgreSQL server; {START_HINT}",
                pytrace=False)


def _admin(url: str):
    import sqlalchemy as sa

    return sa.create_engine(url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)


@pytest.fixture
def pg_url():
    """The URL of a new, empty database (dropped afterwards)."""
    import sqlalchemy as sa

    base = server_url()
    name = f"kgen_t_{uuid.uuid4().hex[:12]}"
    admin = _admin(base)
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except sa.exc.OperationalError as exc:
        pytest.fail(f"KGEN_TEST_PG_URL={base!r} does not answer ({exc.orig}); {START_HINT}",
                    pytrace=False)
    url = sa.engine.make_url(base).set(database=name).render_as_string(hide_password=False)
    yield url
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()
