"""RoPE settings from a ``config.json``, resolved the way transformers 5 resolves them.

Two spellings exist: the older ``rope_theta`` + ``rope_scaling`` pair and transformers 5's
``rope_parameters`` dict. transformers' ``PreTrainedConfig`` takes a non-empty ``rope_scaling``
*instead of* ``rope_parameters`` (``rope_parameters = rope_scaling or rope_parameters``); a
``rope_theta`` or ``partial_rotary_factor`` inside the chosen dict wins over the top-level field,
and the top-level one over the default (10000, 1.0). The legacy key ``type`` names the type when
``rope_type`` is absent.

Each supported type's required fields are checked by name, as transformers'
``_validate_<type>_rope_parameters`` do (it raises a KeyError naming them): ``linear`` needs
``factor``; ``llama3`` needs ``factor``, ``low_freq_factor`` and ``high_freq_factor``. A llama3
dict without ``original_max_position_embeddings`` gets ``max_position_embeddings``, as
transformers' ``standardize_rope_params`` gives it (with a warning here, as there).

No torch here except :func:`llama3_scale`, which scales inverse frequencies.
"""

from __future__ import annotations

import math
import warnings

__all__ = ["SUPPORTED_ROPE_TYPES", "REQUIRED_FIELDS", "rope_params", "llama3_scale"]

REQUIRED_FIELDS = {"default": (), "linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor")}
SUPPORTED_ROPE_TYPES = tuple(REQUIRED_FIELDS)


def _is_number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def _chosen(data: dict) -> tuple[str, dict]:
    """(field name, a copy of the dict transformers uses): ``rope_scaling`` when non-empty."""
    for name in ("rope_scaling", "rope_parameters"):
        value = data.get(name)
        if value is not None and not isinstance(value, dict):
            raise ValueError(f"config.json field {name}={value!r} must be a JSON object or null")
    legacy, params = data.get("rope_scaling"), data.get("rope_parameters")
    if legacy and params and legacy != params:
        warnings.warn(f"config.json has both rope_scaling={legacy!r} and rope_parameters={params!r}; "
                      f"rope_scaling is used (as transformers does) and rope_parameters is ignored",
                      RuntimeWarning, stacklevel=4)
    return ("rope_scaling", dict(legacy)) if legacy else ("rope_parameters", dict(params or {}))


def rope_params(data: dict, max_position_embeddings: int) -> tuple[float, dict | None]:
    """(rope_theta, scaling dict or None for plain RoPE) of a parsed ``config.json``.

    The scaling dict holds ``rope_type`` and the type's fields (llama3's
    ``original_max_position_embeddings`` filled in). Raises ValueError naming the field that is
    missing, of the wrong kind, or a type the runtime does not implement.
    """
    name, scaling = _chosen(data)
    if any(isinstance(v, dict) for v in scaling.values()):
        raise ValueError(f"config.json field {name}={scaling!r} holds per-layer-type RoPE settings, which "
                         f"are not supported; give one rope_theta/rope_type for all layers")
    theta = scaling.pop("rope_theta", data.get("rope_theta", 10000.0))
    if "type" in scaling:
        scaling.setdefault("rope_type", scaling.pop("type"))
    kind = scaling.get("rope_type", "default")
    if kind not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"{name}: rope_type={kind!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    missing = [f for f in REQUIRED_FIELDS[kind] if f not in scaling]
    if missing:
        raise ValueError(f"{name}: rope_type={kind!r} needs the field(s) {', '.join(missing)}, which are missing "
                         f"(transformers refuses it too); got {scaling!r}")
    for field in REQUIRED_FIELDS[kind]:
        if not _is_number(scaling[field]) or scaling[field] <= 0:
            raise ValueError(f"{name}: {field}={scaling[field]!r} (rope_type={kind!r}) must be a positive number")
    if kind == "llama3":
        _check_llama3(name, scaling, max_position_embeddings)
    partial = scaling.get("partial_rotary_factor", data.get("partial_rotary_factor", 1.0))
    if kind != "default" and partial != 1.0:  # transformers' default RoPE ignores it; scaled ones use it
        raise ValueError(f"config.json field partial_rotary_factor={partial!r} is not supported with "
                         f"rope_type={kind!r}; only full-width RoPE (1.0)")
    if not _is_number(theta) or theta <= 0:
        raise ValueError(f"rope_theta={theta!r} must be a positive number")
    return float(theta), (scaling if kind != "default" else None)


def _check_llama3(name: str, scaling: dict, max_pos: int) -> None:
    """llama3's frequency band and pretraining length (filled from ``max_pos`` when absent)."""
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    if high <= low:
        raise ValueError(f"{name}: high_freq_factor={high!r} must be greater than low_freq_factor={low!r} "
                         f"(rope_type='llama3')")
    if "original_max_position_embeddings" not in scaling:
        warnings.warn(f"config.json {name} (rope_type='llama3') has no original_max_position_embeddings; using "
                      f"max_position_embeddings={max_pos}, as transformers does", RuntimeWarning, stacklevel=4)
        scaling["original_max_position_embeddings"] = max_pos
    old = scaling["original_max_position_embeddings"]
    if isinstance(old, bool) or not isinstance(old, int) or old < 1:
        raise ValueError(f"{name}: original_max_position_embeddings={old!r} (rope_type='llama3') must be a "
                         f"positive int")


def llama3_scale(inv, scaling: dict):
    """Llama 3.1 frequency scaling of inverse frequencies ``inv`` (float32 ``[head_dim // 2]``):
    wavelengths longer than ``original_max_position_embeddings / low_freq_factor`` divided by
    ``factor``, those shorter than ``... / high_freq_factor`` kept, a smooth blend between."""
    import torch

    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)
