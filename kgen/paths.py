"""Where kgen finds its templates and its shipped tuning database.

In a source checkout (editable install, tests, CI) the top-level ``templates/`` and ``tuning_db/``
folders are used directly. An installed wheel carries them as the packages ``kgen.templates`` and
``kgen.tuning_db``, which are used when the checkout folders are not there.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def _packaged(name: str) -> Path:
    return Path(str(importlib.resources.files(f"kgen.{name}")))


def templates_dir() -> Path:
    """The folder holding the ``*.j2`` kernel templates."""
    here = REPO_ROOT / "templates"
    return here if (here / "__init__.py").exists() and any(here.glob("*.j2")) else _packaged("templates")


def template_files() -> list[Path]:
    """The ``*.j2`` template files, sorted by name."""
    return sorted(templates_dir().glob("*.j2"))


def template_hash() -> str:
    """Short sha256 over all template files (names and contents): provenance of rendered code.

    Lives here, beside the templates' location, so the database can stamp and compare records
    without importing the renderer.
    """
    digest = hashlib.sha256()
    for path in template_files():
        digest.update(path.name.encode())
        digest.update(b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def default_db_dir() -> Path:
    """The tuning database folder: ``$KGEN_DB`` if set, else the checkout's or the wheel's."""
    env = os.environ.get("KGEN_DB")
    if env:
        return Path(env)
    here = REPO_ROOT / "tuning_db"
    return here if here.is_dir() else _packaged("tuning_db")


def cache_dir() -> Path:
    """Where rendered kernel sources are written (``$KGEN_CACHE`` or ``~/.cache/kgen``)."""
    env = os.environ.get("KGEN_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "kgen"
