"""Where kgen finds its templates and its tuning databases.

In a source checkout (editable install, tests, CI) the top-level ``templates/`` and ``tuning_db/``
folders are used directly. An installed wheel carries them as the packages ``kgen.templates`` and
``kgen.tuning_db``, which are used when the checkout folders are not there; the wheel's records
are read-only, and new ones go to ``$KGEN_DB`` or the user's data folder, read over the shipped
ones (:func:`db_layers`).
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


# Templates only the attention family renders start with this prefix; every other template is
# the decode family's (the attention family also includes some of those: attend, merge, plan,
# launch_features). Hashing per family keeps the decode family's hash, and so its rendered
# modules and the provenance of its tuning records, unchanged when attention templates change.
ATTENTION_TEMPLATE_PREFIX = "attention_"
FAMILIES = ("decode", "attention")


def template_files(family: str | None = None) -> list[Path]:
    """The ``*.j2`` template files, sorted by name: all of them (``family`` None), the decode
    family's (every file without the ``attention_`` prefix) or the attention family's (all of
    them: it includes shared decode templates, so any template change may change its code)."""
    files = sorted(templates_dir().glob("*.j2"))
    if family is None or family == "attention":
        return files
    if family == "decode":
        return [p for p in files if not p.name.startswith(ATTENTION_TEMPLATE_PREFIX)]
    raise ValueError(f"family={family!r} is not a kernel family; use one of {', '.join(FAMILIES)}")


def template_hash(family: str = "decode") -> str:
    """Short sha256 over a family's template files (names and contents): provenance of rendered
    code. The default is the decode family (the one the tuning database holds records of).

    Lives here, beside the templates' location, so the database can stamp and compare records
    without importing the renderer.
    """
    digest = hashlib.sha256()
    for path in template_files(family):
        digest.update(path.name.encode())
        digest.update(b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def shipped_db_dir() -> Path:
    """The records kgen ships: the checkout's ``tuning_db/``, or the wheel's ``kgen/tuning_db``."""
    here = REPO_ROOT / "tuning_db"
    return here if here.is_dir() else _packaged("tuning_db")


def is_checkout() -> bool:
    """Whether kgen runs from a source checkout (its ``tuning_db/`` is committed there)."""
    return (REPO_ROOT / "tuning_db").is_dir() and (REPO_ROOT / "pyproject.toml").is_file()


def user_db_dir() -> Path:
    """The user's own database: ``$XDG_DATA_HOME/kgen/tuning_db`` or
    ``~/.local/share/kgen/tuning_db``."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "kgen" / "tuning_db"


def default_db_dir() -> Path:
    """Where ``kgen tune`` writes by default.

    ``$KGEN_DB`` if set; else, in a source checkout, its ``tuning_db/`` (records made there are
    committed and shipped); else (an installed wheel) :func:`user_db_dir`: the shipped records
    in site-packages are never written.
    """
    env = os.environ.get("KGEN_DB")
    if env:
        return Path(env)
    return REPO_ROOT / "tuning_db" if is_checkout() else user_db_dir()


def db_layers(db_dir=None) -> list[Path]:
    """The folders a lookup reads, the first winning per workload.

    The default database (``db_dir`` None, or naming :func:`default_db_dir`), where new records
    go, lies over :func:`shipped_db_dir` (the same folder in a checkout without ``$KGEN_DB``); any
    other ``db_dir`` is read alone.
    """
    if db_dir is not None and Path(db_dir).absolute() != default_db_dir().absolute():
        return [Path(db_dir)]
    layers = []
    for path in (default_db_dir(), shipped_db_dir()):
        if all(path.absolute() != other.absolute() for other in layers):
            layers.append(path)
    return layers


def cache_dir() -> Path:
    """Where rendered kernel sources are written (``$KGEN_CACHE`` or ``~/.cache/kgen``).

    Raises ValueError naming the setting when that path, or a folder above it, is a file (the
    cache could never be created there).
    """
    env = os.environ.get("KGEN_CACHE")
    path = Path(env) if env else Path.home() / ".cache" / "kgen"
    for folder in (path, *path.parents):
        if folder.exists():
            if not folder.is_dir():
                what = f"KGEN_CACHE={env!r}" if env else f"the kernel cache {str(path)!r}"
                where = "is a file" if folder == path else f"lies under {str(folder)!r}, which is a file"
                raise ValueError(f"{what} {where}; point KGEN_CACHE at a folder (it is created if missing)")
            break
    return path
