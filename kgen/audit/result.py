"""What an audit found (per kernel and per variant) and the tuner's pruning rule over it."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, fields


TARGETS = {"sm_80": 80, "sm_90": 90}
_TARGET_SPELLINGS = {"sm_80": "sm_80", "sm80": "sm_80", "80": "sm_80", "8.0": "sm_80",
                     "sm_90": "sm_90", "sm90": "sm_90", "90": "sm_90", "9.0": "sm_90"}
# cache dtypes whose K/V loads must all be 16-byte (fp32 K/V tiles are too, but not required)
VECTOR_DTYPES = ("fp16", "bf16", "fp8_e4m3", "fp8_e5m2")
# query dtypes whose attention dots must run on tensor cores (fp32 dots are exact FMAs)
TENSOR_CORE_DTYPES = ("fp16", "bf16")


def parse_target(target) -> str:
    """``"sm_80"``, ``"sm80"``, ``"80"``, ``80`` (and the same for 90) -> ``"sm_80"`` / ``"sm_90"``."""
    name = _TARGET_SPELLINGS.get(str(target).strip().lower())
    if name is None:
        raise ValueError(f"target={target!r} is not supported; use sm_80 or sm_90")
    return name


@dataclass(frozen=True)
class KernelAudit:
    """What one compiled kernel of a variant uses. Load maps are ``{width_bits: count}``."""

    name: str
    registers: int
    spill_bytes: int  # static bytes of spill stores (STL) in the SASS
    spill_load_bytes: int  # static bytes of spill reloads (LDL)
    stack_bytes: int
    local_bytes: int
    shared_bytes: int  # shared memory the launch requests (Triton metadata)
    kv_load_bits: dict
    other_load_bits: dict
    sass_load_bits: dict  # every global load in the SASS, by width
    consistent: bool  # every PTX K/V load width is matched by SASS global loads
    num_warps: int
    num_stages: int
    compile_seconds: float
    mma_instructions: int | None = None  # tensor-core instructions in the SASS (None: not counted)


@dataclass(frozen=True)
class AuditResult:
    """The audit of one variant on one target; totals over its kernels (decode or partial+merge)."""

    variant: str
    dtype: str
    target: str
    kernels: tuple
    compile_seconds: float
    triton_version: str = ""
    kv_dtype: str = "auto"  # the cache's element type when it is not ``dtype`` (fp8)

    @property
    def cache_dtype(self) -> str:
        """The element type of the K/V loads: ``kv_dtype`` for fp8 caches, else ``dtype``."""
        return self.dtype if self.kv_dtype == "auto" else self.kv_dtype

    @property
    def registers(self) -> int:
        return max(k.registers for k in self.kernels)

    @property
    def spill_bytes(self) -> int:
        return sum(k.spill_bytes for k in self.kernels)

    @property
    def shared_bytes(self) -> int:
        return max(k.shared_bytes for k in self.kernels)

    @property
    def mma_instructions(self) -> int | None:
        """Tensor-core instructions (HMMA / HGMMA / QGMMA) over the kernels; None when an audit
        read before they were counted."""
        counts = [k.mma_instructions for k in self.kernels]
        return None if None in counts else sum(counts)

    @property
    def kv_load_bits(self) -> dict:
        return _sum_counts(k.kv_load_bits for k in self.kernels)

    @property
    def other_load_bits(self) -> dict:
        return _sum_counts(k.other_load_bits for k in self.kernels)

    @property
    def kv_128_share(self) -> float:
        """Share of K/V loads that are 16 bytes wide (0.0 when no K/V load was found)."""
        total = sum(self.kv_load_bits.values())
        return self.kv_load_bits.get(128, 0) / total if total else 0.0

    def to_dict(self) -> dict:
        """JSON-ready dict with the keys of ``kgen inspect --json`` (widths as string keys)."""
        return {
            "variant": self.variant, "target": self.target, "dtype": self.dtype,
            "kv_dtype": self.kv_dtype,
            "registers": self.registers, "spill_bytes": self.spill_bytes,
            "shared_bytes": self.shared_bytes,
            "kv_load_bits": _json_counts(self.kv_load_bits),
            "other_load_bits": _json_counts(self.other_load_bits),
            "kv_128_share": round(self.kv_128_share, 4),
            "mma_instructions": self.mma_instructions,
            "passes": passes(self), "failures": failures(self),
            "compile_seconds": round(self.compile_seconds, 3), "triton_version": self.triton_version,
            "kernels": [{**asdict(k), "kv_load_bits": _json_counts(k.kv_load_bits),
                         "other_load_bits": _json_counts(k.other_load_bits),
                         "sass_load_bits": _json_counts(k.sass_load_bits),
                         "compile_seconds": round(k.compile_seconds, 3)} for k in self.kernels],
        }

    def to_json(self, indent=None) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: dict) -> "AuditResult":
        """Inverse of :meth:`to_dict` (used to pass results out of the worker process)."""
        names = {f.name for f in fields(KernelAudit)}
        kernels = tuple(
            KernelAudit(**{k: ({int(b): n for b, n in v.items()} if k.endswith("_bits") else v)
                           for k, v in kernel.items() if k in names})
            for kernel in data["kernels"])
        return cls(variant=data["variant"], dtype=data["dtype"], target=data["target"],
                   kernels=kernels, compile_seconds=data["compile_seconds"],
                   triton_version=data.get("triton_version", ""),
                   kv_dtype=data.get("kv_dtype", "auto"))


def _sum_counts(maps) -> dict:
    total = Counter()
    for m in maps:
        total.update(m)
    return dict(sorted(total.items(), reverse=True))


def _json_counts(counts: dict) -> dict:
    return {str(bits): n for bits, n in sorted(counts.items(), reverse=True)}


def failures(result: AuditResult, *, vector_dtypes=VECTOR_DTYPES) -> list[str]:
    """Why a variant fails the audit (empty when it passes).

    Rules: nothing spills (no STL, no local memory); K/V loads were found in the binary; the PTX
    and SASS widths agree; for ``vector_dtypes`` every K/V load is 16 bytes (128 bits); for 16-bit
    queries the attention dots use tensor cores (a kernel reading K/V has MMA instructions).
    """
    out = []
    for k in result.kernels:
        if k.spill_bytes or k.local_bytes:
            out.append(f"{k.name} spills ({k.spill_bytes} B spill stores, {k.local_bytes} B local)")
        if not k.consistent:
            out.append(f"{k.name}: PTX K/V load widths {k.kv_load_bits} not all found in SASS "
                       f"global loads {k.sass_load_bits}")
        if result.dtype in TENSOR_CORE_DTYPES and k.kv_load_bits and k.mma_instructions == 0:
            out.append(f"{k.name}: {result.dtype} dots without tensor-core instructions "
                       "(no HMMA / HGMMA in the SASS)")
    kv = result.kv_load_bits
    if not kv:
        out.append("no K/V load found in any kernel")
    elif result.cache_dtype in vector_dtypes and set(kv) != {128}:
        out.append(f"{result.cache_dtype} K/V loads are not all 16-byte: {_json_counts(kv)} "
                   "(bits: count)")
    return out


def passes(result: AuditResult, *, vector_dtypes=VECTOR_DTYPES) -> bool:
    """True when :func:`failures` is empty: the tuner's pruning step (compile errors raise)."""
    return not failures(result, vector_dtypes=vector_dtypes)
