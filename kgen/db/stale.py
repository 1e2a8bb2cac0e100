"""Which records still describe the kernels this kgen builds. Standard library only.

A record's time was measured on the code rendered from the templates of its day
(``provenance.template_hash``). After the templates change, the recorded variant may be slower
than the new default, so a record measured against other templates is *not current* and lookup
does not serve it (it falls back to the heuristic default and logs why once), unless the tuner's
re-measure vindicated it:

Likewise a record tuned against another default than today's for its shape (``default_key``, or
the re-measure's ``default_config_key``, differs from :func:`kgen.space.default_config`'s key) is
not current: it showed a winner over a default that is no longer the one it must beat (issue 13:
records tuned against the single-pass default were served after the default became split-K
``auto``, slower than it). Records written before ``default_key`` existed are judged by their
templates alone.

``kgen db remeasure --gpu NAME`` re-times each such record's variant and the current default
variant with the tuning measurer, under the current templates, on that GPU, and writes the result
into the entry as ``remeasure`` (``template_hash``, ``time_ms``, ``default_time_ms``,
``default_config_key``, ``beats_default``, versions, host, date). A record whose re-measure under
the current templates beats the default is served again; one the default beat is not. Dispatch
itself never times kernels: a serving process must not stall on benchmarks, and may run where
the GPU is busy or absent.

*Stale* (``kgen db check`` reports, ``kgen db prune --stale`` drops) is wider: not current, or
measured (or last re-measured) by a kgen older than this one.
"""

from __future__ import annotations

import re

from kgen import __version__
from kgen.db.schema import default_key_for
from kgen.paths import template_hash
from kgen.workload import Workload


def entry_family(entry: dict) -> str:
    """The kernel family of an entry's workload (``decode`` for records older than the field)."""
    workload = entry.get("workload")
    return workload.get("kernel", "decode") if isinstance(workload, dict) else "decode"


def current_hash(entry: dict) -> str:
    """Today's template hash of the entry's family (each family's records are measured against
    its own templates, so a change to the other family's leaves them current)."""
    return template_hash(entry_family(entry))


def recorded_hash(entry: dict) -> str | None:
    """The template hash the entry was measured against, for its family."""
    prov = entry.get("provenance", {})
    hashes = prov.get("template_hashes")
    if isinstance(hashes, dict) and entry_family(entry) in hashes:
        return hashes[entry_family(entry)]
    return prov.get("template_hash") if entry_family(entry) == "decode" else None


def _effective(entry: dict, current: str) -> dict:
    """The measurement that speaks for the entry: its re-measure under the current templates if
    there is one, else its own provenance."""
    remeasure = entry.get("remeasure")
    if isinstance(remeasure, dict) and remeasure.get("template_hash") == current:
        return remeasure
    return entry.get("provenance", {})


def not_current(entry: dict, current: str | None = None) -> str | None:
    """Why ``entry`` may not be served under today's templates (of its family), or None if it
    may be."""
    current = current or current_hash(entry)
    remeasure = entry.get("remeasure")
    if isinstance(remeasure, dict) and remeasure.get("template_hash") == current:
        if remeasure.get("beats_default"):
            return other_default(entry, remeasure.get("default_config_key"))
        return (f"re-measured under the current templates {current}, the default "
                f"{remeasure.get('default_config_key')} ({remeasure.get('default_time_ms')} ms) "
                f"beats its {entry.get('config_key')} ({remeasure.get('time_ms')} ms)")
    recorded = recorded_hash(entry)
    if recorded == current:
        return other_default(entry, entry.get("default_key"))
    return (f"measured against kernel templates {recorded}, these are {current} "
            f"(re-measure with 'kgen db remeasure --gpu NAME' on that GPU)")


def other_default(entry: dict, beaten: str | None) -> str | None:
    """Why the default ``beaten`` (the key the entry's winner was timed against) is not today's
    default of the entry's shape, or None (also when it is unknown: a record older than the
    field)."""
    if not beaten:
        return None
    try:
        today = default_key_for(Workload.from_dict(entry["workload"]))
    except (KeyError, TypeError, ValueError):
        return None  # a malformed entry is reported by the table check, not here
    if beaten == today:
        return None
    return f"tuned against the default {beaten}; the default is now {today} (retune it)"


def version_tuple(text) -> tuple:
    """``"0.1.0"`` -> ``(0, 1, 0)``; leading numeric parts only (``"1.2rc1"`` -> ``(1, 2)``)."""
    out = []
    for part in str(text or "").split("."):
        match = re.match(r"\d+", part)
        if not match:
            break
        out.append(int(match.group()))
        if match.group() != part:
            break
    return tuple(out)


def older_kgen(entry: dict, current: str | None = None) -> str | None:
    """Why the entry's measuring kgen is older than this one, or None."""
    version = _effective(entry, current or current_hash(entry)).get("kgen")
    if version_tuple(version) < version_tuple(__version__):
        return f"measured by kgen {version}, this is kgen {__version__}"
    return None


def stale_reasons(entry: dict, current: str | None = None) -> list[str]:
    """Every reason ``entry`` is stale (empty: it is current)."""
    current = current or current_hash(entry)
    return [r for r in (not_current(entry, current), older_kgen(entry, current)) if r]
