"""The tuning database's file formats, their versioned schema, and provenance.

Files in ``tuning_db/<gpu>/``:

``best.json``
    The compiled best-config table the runtime reads::

        {"schema": "kgen.best", "schema_version": 1, "gpu": "h100", "provenance": {...},
         "entries": {"<workload key>": ENTRY, ...},
         "block_size_defaults": {"fp16-d128": {"block_size": 16, "workloads": 12}, ...}}

    ENTRY = ``{"workload": {...}, "config": {...VariantConfig.to_dict()}, "config_key": str,
    "time_ms": float, "default_time_ms": float, "speedup": float, "trials": int,
    "provenance": {...}, "default_key": str}``. ``default_key`` names the heuristic default the
    winner was re-measured against (:func:`kgen.space.default_config` at tuning time): when the
    default changes, the lookup stops serving the entry (:mod:`kgen.db.stale`: it no longer shows
    the winner beats the default). Entries written before the field existed are judged by their
    templates alone.

``trials.jsonl``
    The raw trial log, append-only. One JSON object a line: ``{"type": "provenance", "id": ...}``
    lines describe a tuning run; ``{"type": "trial", "provenance_id": ..., "workload_key": ...,
    "config_key": ..., "status": "ok|pruned|failed", "time_ms": ..., "reason": ...}`` lines are
    candidates measured, pruned or failed in that run.

``journal.log``
    The Optuna journal (its own format); the study's user attributes carry the provenance.

Standard library only.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math

from kgen import __version__
from kgen.paths import template_hash
from kgen.families import default_variant
from kgen.variant import BLOCK_SIZES
from kgen.variant_attention import family_class
from kgen.workload import Workload

SCHEMA_VERSION = 1
BEST_SCHEMA = "kgen.best"
TRIAL_STATUSES = ("ok", "pruned", "failed")
PROVENANCE_FIELDS = ("gpu", "full_name", "compute_capability", "sm_count", "driver_version",
                     "cuda_version", "torch", "triton", "kgen", "template_hash", "method",
                     "sampler", "seed", "date")
_ENTRY_FIELDS = ("workload", "config", "config_key", "time_ms", "default_time_ms", "trials",
                 "provenance")


class DbFormatError(ValueError):
    """A database file that cannot be used; the message names the file and what is wrong."""


def _package_version(name: str) -> str | None:
    try:
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version(name)
        except PackageNotFoundError:
            return None
    except ImportError:  # pragma: no cover
        return None


def software_versions() -> dict:
    """torch, triton and kgen versions (without importing torch or triton)."""
    return {"torch": _package_version("torch"), "triton": _package_version("triton"),
            "kgen": __version__}


def make_provenance(device, *, method: str, sampler: str | None = None,
                    seed: int | None = None) -> dict:
    """Provenance of a tuning run on ``device`` (a :class:`kgen.device.DeviceInfo`)."""
    info = device.to_dict()
    prov = {"gpu": info["name"], "full_name": info["full_name"],
            "compute_capability": info["compute_capability"], "sm_count": info["sm_count"],
            "driver_version": info["driver_version"], "cuda_version": info["cuda_version"],
            **software_versions(), "template_hash": template_hash(),
            "template_hashes": {family: template_hash(family) for family in ("decode", "attention")},
            "method": method,
            "sampler": sampler, "seed": seed,
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    return prov


def provenance_id(prov: dict) -> str:
    return hashlib.sha1(json.dumps(prov, sort_keys=True).encode()).hexdigest()[:12]


def check_provenance(prov, where: str) -> None:
    if not isinstance(prov, dict):
        raise DbFormatError(f"{where}: provenance is not an object")
    missing = [f for f in PROVENANCE_FIELDS if f not in prov]
    if missing:
        raise DbFormatError(f"{where}: provenance lacks {', '.join(missing)}")


def _check_time(value, name: str, where: str, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value <= 0:
        raise DbFormatError(f"{where}: {name}={value!r} is not a positive time")


def entry_config(entry: dict):
    """The variant of a best-table entry, of the family its ``config_key`` names (``paged_decode``
    or ``paged_attention``), built from its ``config`` dict."""
    key = str(entry.get("config_key", ""))
    try:
        family = family_class(key)
    except ValueError as exc:
        raise ValueError(f"config_key {key!r}: {exc}") from None
    return family.from_dict(entry["config"])


def check_entry(key: str, entry, where: str) -> None:
    """Validate one best-table entry (its workload and config must parse and match the key)."""
    here = f"{where}: entry {key!r}"
    if not isinstance(entry, dict):
        raise DbFormatError(f"{here} is not an object")
    missing = [f for f in _ENTRY_FIELDS if f not in entry]
    if missing:
        raise DbFormatError(f"{here} lacks {', '.join(missing)}")
    try:
        workload = Workload.from_dict(entry["workload"])
        config = entry_config(entry)
    except (TypeError, ValueError) as exc:
        raise DbFormatError(f"{here}: {exc}") from None
    if workload.key != key:
        raise DbFormatError(f"{here}: its workload is {workload.key!r}")
    if config.key != entry["config_key"]:
        raise DbFormatError(f"{here}: config_key {entry['config_key']!r} != {config.key!r}")
    if config.family != workload.kernel:
        raise DbFormatError(f"{here}: a {config.family} variant for a {workload.kernel} workload")
    mismatch = [f for f in ("dtype", "head_dim", "block_size", "group_size", "kv_dtype",
                            "features") if getattr(config, f) != getattr(workload, f)]
    if mismatch:
        raise DbFormatError(f"{here}: config differs from the workload in {', '.join(mismatch)}")
    _check_time(entry["time_ms"], "time_ms", here)
    _check_time(entry["default_time_ms"], "default_time_ms", here, optional=True)
    check_provenance(entry["provenance"], here)


def check_best_table(data, where: str) -> dict:
    """Validate a parsed ``best.json``; returns it. Raises DbFormatError naming ``where``."""
    if not isinstance(data, dict):
        raise DbFormatError(f"{where}: not a JSON object")
    if data.get("schema") != BEST_SCHEMA:
        raise DbFormatError(f"{where}: schema={data.get('schema')!r}, expected {BEST_SCHEMA!r}")
    version = data.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise DbFormatError(f"{where}: schema_version={version!r} is not an integer")
    if version > SCHEMA_VERSION:
        raise DbFormatError(f"{where}: schema_version={version} is newer than this kgen reads "
                            f"({SCHEMA_VERSION}); upgrade kgen")
    if version < 1:
        raise DbFormatError(f"{where}: schema_version={version} is invalid")
    check_provenance(data.get("provenance"), where)
    entries = data.get("entries")
    if not isinstance(entries, dict):
        raise DbFormatError(f"{where}: 'entries' is not an object")
    for key, entry in entries.items():
        check_entry(key, entry, where)
    defaults = data.get("block_size_defaults", {})
    if not isinstance(defaults, dict):
        raise DbFormatError(f"{where}: 'block_size_defaults' is not an object")
    for key, rec in defaults.items():  # the runtime reads rec["block_size"]
        block = rec.get("block_size") if isinstance(rec, dict) else None
        if isinstance(block, bool) or block not in BLOCK_SIZES:
            raise DbFormatError(f"{where}: block_size_defaults {key!r} = {rec!r} is not "
                                f"{{'block_size': one of {', '.join(map(str, BLOCK_SIZES))}, ...}}")
    return data


def check_trial_line(record, where: str) -> None:
    """Validate one parsed line of ``trials.jsonl``."""
    if not isinstance(record, dict):
        raise DbFormatError(f"{where}: not a JSON object")
    kind = record.get("type")
    if kind == "provenance":
        version = record.get("schema_version", 0)
        if isinstance(version, bool) or not isinstance(version, int):
            raise DbFormatError(f"{where}: schema_version={version!r} is not an integer")
        if version > SCHEMA_VERSION:
            raise DbFormatError(f"{where}: schema_version={version} is newer "
                                f"than this kgen reads ({SCHEMA_VERSION})")
        check_provenance(record.get("provenance"), where)
        return
    if kind != "trial":
        raise DbFormatError(f"{where}: type={kind!r}, expected 'trial' or 'provenance'")
    for field in ("provenance_id", "workload_key", "config_key", "status"):
        if not isinstance(record.get(field), str):
            raise DbFormatError(f"{where}: {field}={record.get(field)!r} is missing or not text")
    if record["status"] not in TRIAL_STATUSES:
        raise DbFormatError(f"{where}: status={record['status']!r} is not one of {TRIAL_STATUSES}")
    if record["status"] == "ok":
        _check_time(record.get("time_ms"), "time_ms", where)
    elif not record.get("reason"):
        raise DbFormatError(f"{where}: a {record['status']} trial has no reason")


def default_key_for(workload) -> str:
    """The key of the heuristic default variant of ``workload``'s family and shape (what tuning
    beats)."""
    return default_variant(workload).key


def make_entry(workload, config, *, time_ms: float, default_time_ms: float | None,
               provenance: dict, trials: int, **extra) -> dict:
    """One best-table entry for ``workload`` (a Workload) won by ``config`` (a VariantConfig).

    ``default_key`` (in ``extra``) defaults to today's heuristic default of the shape.
    """
    extra.setdefault("default_key", default_key_for(workload))
    return {"workload": workload.to_dict(), "config": config.to_dict(), "config_key": config.key,
            "time_ms": time_ms, "default_time_ms": default_time_ms,
            "speedup": (default_time_ms / time_ms) if default_time_ms else None,
            "trials": trials, "provenance": provenance, **extra}


def new_best_table(gpu: str, provenance: dict) -> dict:
    return {"schema": BEST_SCHEMA, "schema_version": SCHEMA_VERSION, "gpu": gpu,
            "provenance": provenance, "entries": {}, "block_size_defaults": {}}
