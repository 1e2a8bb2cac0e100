"""Attention features a variant can be compiled with, and how keys name them.

A feature is a compile-time switch of the kernels (a Triton constexpr branch), so a variant
without it pays nothing. A variant's features are a tuple in the canonical order of
:data:`FEATURES`; keys grow one suffix per feature that is on, after the KV dtype's, e.g.
``paged_decode-d128-b16-g4-s4-t64-w4-st2-bf16-kvfp8e4m3-swa-cap``.

=================  =======  ===================================================================
feature            suffix   call argument (semantics in the launcher's docstring / README)
=================  =======  ===================================================================
sliding_window     swa      ``sliding_window=W``: only the last W keys; pages before them unread
soft_cap           cap      ``logits_soft_cap=c``: scores become ``c * tanh(s / c)``
alibi              alibi    ``alibi_slopes`` fp32 [num_heads]: ``s += slope[h] * (j - p)``
sinks              sinks    ``sinks`` fp32 [num_heads]: one extra logit per head in the softmax
=================  =======  ===================================================================

Standard library only (the variant space, workloads and dispatch import it).
"""

from __future__ import annotations

from kgen.dtypes import KV_KEY_TAGS

FEATURES = ("sliding_window", "soft_cap", "alibi", "sinks")
KEY_TAGS = {"sliding_window": "swa", "soft_cap": "cap", "alibi": "alibi", "sinks": "sinks"}
# The launcher's keyword argument that each feature needs.
ARGUMENTS = {"sliding_window": "sliding_window", "soft_cap": "logits_soft_cap",
             "alibi": "alibi_slopes", "sinks": "sinks"}
_ALIASES = {**{name: name for name in FEATURES}, **{tag: name for name, tag in KEY_TAGS.items()},
            **{arg: name for name, arg in ARGUMENTS.items()},
            "window": "sliding_window", "softcap": "soft_cap", "logit_soft_cap": "soft_cap",
            "sink": "sinks", "attention_sinks": "sinks"}
_NONE = ("", "none", "plain")


def normalize_features(features, *, name: str = "features") -> tuple[str, ...]:
    """A feature set as a tuple in canonical order.

    Parameters
    ----------
    features : None, str or iterable of str
        ``None``, ``""`` or ``"none"`` for no feature; a comma-separated string
        (``"sliding_window,soft_cap"``); or an iterable of names. Key suffixes (``swa``, ``cap``)
        and call-argument names (``logits_soft_cap``, ``alibi_slopes``) are accepted too.
        ``"none"`` (or ``"plain"``) together with a feature is refused: it is not clear which
        was meant.

    Raises
    ------
    ValueError
        Naming ``name`` and the unknown item, with the allowed names.
    """
    if features is None:
        return ()
    if isinstance(features, str):
        items = [part.strip() for part in features.split(",")]
    else:
        try:
            items = list(features)
        except TypeError:
            raise ValueError(f"{name}={features!r} is not a feature name or a collection of "
                             f"them; use any of {', '.join(FEATURES)}") from None
    found, nothing = set(), None
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"{name}={features!r}: {item!r} is not a feature name; use any of "
                             f"{', '.join(FEATURES)}")
        low = item.strip().lower()
        if low in _NONE:
            nothing = nothing or (item if low else None)  # an empty part is only a separator
            continue
        canonical = _ALIASES.get(low)
        if canonical is None:
            raise ValueError(f"{name}={features!r}: {item!r} is not a feature; use any of "
                             f"{', '.join(FEATURES)}")
        found.add(canonical)
    if nothing is not None and found:
        raise ValueError(f"{name}={features!r}: {nothing!r} means no feature, yet "
                         f"{', '.join(f for f in FEATURES if f in found)} is given too; give one or the other")
    return tuple(f for f in FEATURES if f in found)


def all_feature_sets() -> tuple[tuple[str, ...], ...]:
    """Every subset of :data:`FEATURES` (16), the empty set first, in canonical order."""
    out = []
    for mask in range(1 << len(FEATURES)):
        out.append(tuple(f for i, f in enumerate(FEATURES) if mask >> i & 1))
    return tuple(sorted(out, key=lambda s: (len(s), [FEATURES.index(f) for f in s])))


def key_suffix(kv_tag: str | None, features: tuple[str, ...]) -> str:
    """``-kvfp8e4m3-swa-cap`` style suffix ('' for the plain case)."""
    tags = ([kv_tag] if kv_tag else []) + [KEY_TAGS[f] for f in features]
    return "".join(f"-{tag}" for tag in tags)


# The suffix as a regex fragment for key parsers (variant and workload keys end with it): named
# groups ``kv_dtype`` (the KV tag or None) and ``features`` (``-swa-cap`` or '').
SUFFIX_PATTERN = (r"(?:-(?P<kv_dtype>" + "|".join(KV_KEY_TAGS.values()) + r"))?"
                  r"(?P<features>(?:-(?:" + "|".join(KEY_TAGS.values()) + r"))*)")
_KV_OF_TAG = {tag: kv for kv, tag in KV_KEY_TAGS.items()}
_FEATURE_OF_TAG = {tag: name for name, tag in KEY_TAGS.items()}


def parse_suffix(groups: dict) -> dict:
    """Pop :data:`SUFFIX_PATTERN`'s groups from a match's ``groupdict()``; returns the
    ``kv_dtype`` / ``features`` keyword arguments they spell (the inverse of :func:`key_suffix`)."""
    kv_tag, feature_tags = groups.pop("kv_dtype"), groups.pop("features")
    return {"kv_dtype": _KV_OF_TAG[kv_tag] if kv_tag else "auto",
            "features": [_FEATURE_OF_TAG[t] for t in feature_tags.split("-") if t]}


def features_text(features: tuple[str, ...]) -> str:
    """``"sliding_window,soft_cap"`` (``"none"`` for the empty set): for tables and CLI echoes."""
    return ",".join(features) if features else "none"


def drop_default_axes(data: dict) -> dict:
    """A variant's or workload's field dict with ``kv_dtype`` and ``features`` left out when they
    are the defaults (``auto``, none) and ``features`` as a list otherwise: the dicts (and the
    tuning records holding them) of the plain space stay what they were before these axes."""
    out = dict(data)
    if out.get("kv_dtype") == "auto":
        del out["kv_dtype"]
    if out.get("features"):
        out["features"] = list(out["features"])
    else:
        out.pop("features", None)
    return out
