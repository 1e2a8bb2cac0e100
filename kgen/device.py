"""What device is here, and what to call it.

GPU names are normalized to short lower-case names (``"NVIDIA H100 80GB HBM3"`` -> ``h100``,
``"NVIDIA A100-SXM4-80GB"`` -> ``a100``) that name the folders of the tuning database. Each name
belongs to a family (``hopper``, ``ampere``, ``ada`` ...) used as a lookup fallback, and a family
maps to the ``sm_XX`` target the static audit compiles for.

Two pseudo devices exist for running the pipeline without a GPU: ``interpreter`` (Triton kernels
under ``TRITON_INTERPRET=1`` on the CPU) and ``synthetic`` (a deterministic cost model, no kernel).

Only the standard library is imported at module level; torch is imported when a device is probed.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass

PSEUDO_DEVICES = ("interpreter", "synthetic")

# (regex over the lower-cased device name, short name). Order matters: more specific first.
_NAME_PATTERNS = (
    (r"gh200", "gh200"), (r"gb200", "gb200"), (r"\bb200\b", "b200"), (r"\bb100\b", "b100"),
    (r"h200", "h200"), (r"h100", "h100"), (r"h800", "h800"), (r"h20\b", "h20"),
    (r"a100", "a100"), (r"a800", "a800"), (r"\ba10g\b", "a10g"), (r"\ba10\b", "a10"),
    (r"\ba30\b", "a30"), (r"\ba40\b", "a40"), (r"rtx\s*a6000", "rtxa6000"),
    (r"rtx\s*6000\s*ada", "rtx6000ada"), (r"l40s", "l40s"), (r"\bl40\b", "l40"),
    (r"\bl4\b", "l4"), (r"rtx\s*5090", "rtx5090"), (r"rtx\s*4090", "rtx4090"),
    (r"rtx\s*4080", "rtx4080"), (r"rtx\s*3090", "rtx3090"), (r"rtx\s*3080", "rtx3080"),
    (r"v100", "v100"), (r"\bt4\b", "t4"),
)

FAMILIES = {
    "hopper": ("h100", "h200", "h800", "h20", "gh200"),
    "ampere": ("a100", "a800", "a10g", "a10", "a30", "a40", "rtxa6000", "rtx3090", "rtx3080"),
    "ada": ("l40s", "l40", "l4", "rtx4090", "rtx4080", "rtx6000ada"),
    "blackwell": ("b200", "b100", "gb200", "rtx5090"),
    "volta": ("v100",),
    "turing": ("t4",),
    "interpreter": ("interpreter",),
    "synthetic": ("synthetic",),
}
_FAMILY_OF = {name: family for family, names in FAMILIES.items() for name in names}
# compute capability major.minor -> family, for devices not in the table above.
_FAMILY_OF_CC = {(7, 0): "volta", (7, 5): "turing", (8, 0): "ampere", (8, 6): "ampere",
                 (8, 7): "ampere", (8, 9): "ada", (9, 0): "hopper", (10, 0): "blackwell",
                 (12, 0): "blackwell"}
# family -> the lowest compute capability of its members (what a rule by capability must assume).
FAMILY_CC = {"volta": 70, "turing": 75, "ampere": 80, "ada": 89, "hopper": 90, "blackwell": 100}
# family -> the target the static audit compiles for (kgen.audit knows sm_80 and sm_90; Ada
# (sm_89) runs the sm_80 ISA, so it is audited as sm_80). Other families are not audited.
AUDIT_TARGETS = {"ampere": "sm_80", "ada": "sm_80", "hopper": "sm_90"}


def normalize_gpu_name(name: str) -> str:
    """A short folder-safe name for a GPU: ``"NVIDIA H100 80GB HBM3"`` -> ``"h100"``.

    Already-short names (``h100``, ``interpreter``) map to themselves; unknown devices become a
    lower-case slug of their name without the vendor (``"NVIDIA Foo X"`` -> ``"foo-x"``).
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"gpu={name!r} is not a device name")
    low = name.strip().lower()
    if low in PSEUDO_DEVICES or low in _FAMILY_OF:
        return low
    for pattern, short in _NAME_PATTERNS:
        if re.search(pattern, low):
            return short
    slug = re.sub(r"^(nvidia|amd|tesla|geforce)\s+", "", low)
    slug = re.sub(r"[^a-z0-9]+", "-", slug).strip("-")
    if not slug:
        raise ValueError(f"gpu={name!r} does not give a usable device name")
    return slug


def family_of(name: str, compute_capability: tuple[int, int] | None = None) -> str | None:
    """The architecture family of a (normalized or raw) device name, or None if unknown."""
    short = normalize_gpu_name(name)
    if short in _FAMILY_OF:
        return _FAMILY_OF[short]
    if compute_capability is not None:
        return _FAMILY_OF_CC.get(tuple(compute_capability))
    return None


def family_or_none(name: str) -> str | None:
    """:func:`family_of` for a name that may not be a device name: None instead of ValueError."""
    try:
        return family_of(name)
    except ValueError:
        return None


def compute_capability_of(name: str) -> int | None:
    """The compute capability (e.g. 80) kgen assumes for a device name, from its family (the
    family's lowest); None for pseudo devices and unknown names."""
    return FAMILY_CC.get(family_or_none(name) or "")


def audit_target(name: str, compute_capability: tuple[int, int] | None = None) -> str | None:
    """The ``sm_80``/``sm_90`` target of a device for the static audit, or None (not audited)."""
    return AUDIT_TARGETS.get(family_of(name, compute_capability) or "")


@dataclass(frozen=True)
class DeviceInfo:
    """A device and what the tuning database records about it.

    ``name`` is the normalized name (a database folder); ``full_name`` is what the driver reports.
    """

    name: str
    full_name: str
    family: str | None
    compute_capability: tuple[int, int] | None = None
    sm_count: int | None = None
    driver_version: str | None = None
    cuda_version: str | None = None

    @property
    def is_pseudo(self) -> bool:
        return self.name in PSEUDO_DEVICES

    @property
    def audit_target(self) -> str | None:
        return None if self.is_pseudo else audit_target(self.name, self.compute_capability)

    def to_dict(self) -> dict:
        data = asdict(self)
        cc = data["compute_capability"]
        data["compute_capability"] = f"{cc[0]}.{cc[1]}" if cc else None
        return data


def pseudo_device(name: str) -> DeviceInfo:
    """The ``interpreter`` or ``synthetic`` pseudo device."""
    if name not in PSEUDO_DEVICES:
        raise ValueError(f"gpu={name!r} is not a pseudo device; use one of {PSEUDO_DEVICES}")
    full = "Triton interpreter on the CPU" if name == "interpreter" else "synthetic cost model"
    return DeviceInfo(name=name, full_name=full, family=name)


def _driver_version() -> str | None:
    try:
        import ctypes

        lib = ctypes.CDLL("libcuda.so.1")
        version = ctypes.c_int()
        if lib.cuDriverGetVersion(ctypes.byref(version)) == 0:
            return f"{version.value // 1000}.{(version.value % 1000) // 10}"
    except OSError:
        pass
    return None


def detect_device(index: int = 0) -> DeviceInfo | None:
    """The CUDA device present (``index``), or None when there is none (or no torch)."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return None
    if not torch.cuda.is_available() or torch.cuda.device_count() <= index:
        return None
    props = torch.cuda.get_device_properties(index)
    cc = (int(props.major), int(props.minor))
    name = normalize_gpu_name(props.name)
    return DeviceInfo(name=name, full_name=props.name, family=family_of(name, cc),
                      compute_capability=cc, sm_count=int(props.multi_processor_count),
                      driver_version=_driver_version(), cuda_version=torch.version.cuda)


def detect_gpu(index: int = 0) -> DeviceInfo:
    """The CUDA device present; raises RuntimeError when there is none (for scripts)."""
    found = detect_device(index)
    if found is None:
        raise RuntimeError("no CUDA device was found")
    return found


def default_gpu_name() -> str:
    """What the dispatcher uses when no GPU is named: the CUDA device, else ``interpreter``."""
    env = os.environ.get("KGEN_GPU")
    if env:
        return normalize_gpu_name(env)
    device = detect_device()
    return device.name if device is not None else "interpreter"


def resolve_gpu(requested: str) -> DeviceInfo:
    """Check that the named GPU is the one present and describe it.

    Raises
    ------
    ValueError
        When ``requested`` names a real GPU that is not the device here; the message says what
        was found (``no CUDA device`` or the other device's name).
    """
    name = normalize_gpu_name(requested)
    if name in PSEUDO_DEVICES:
        return pseudo_device(name)
    present = detect_device()
    if present is None:
        raise ValueError(f"gpu={requested!r} ({name}) was asked for but no CUDA device was found; "
                         f"use --gpu interpreter to tune on the CPU")
    if present.name != name:
        raise ValueError(f"gpu={requested!r} ({name}) was asked for but the device present is "
                         f"{present.full_name!r} ({present.name})")
    return present
