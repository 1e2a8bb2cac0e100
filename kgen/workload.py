"""Workloads: what one tuning study and one database record are about.

A workload is (GPU, dtype, head dim, KV block size, group size, batch bucket, context bucket).
Batch (``num_seqs``) and context (longest sequence length) are bucketed to powers of two; its key,
e.g. ``h100-fp16-d128-b16-g4-n32-c4096``, names its Optuna study and its database entries.

Standard library only: the runtime's dispatch path imports this module.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

from kgen.variant import BLOCK_SIZES, GROUP_SIZES, HEAD_DIMS, normalize_dtype

DEFAULT_BATCHES = tuple(2 ** i for i in range(0, 9))  # 1 .. 256
DEFAULT_CONTEXTS = tuple(2 ** i for i in range(9, 16))  # 512 .. 32768

_KEY_RE = re.compile(
    r"^(?P<gpu>[a-z0-9][a-z0-9-]*)-(?P<dtype>fp16|bf16|fp32)-d(?P<head_dim>\d+)-b(?P<block_size>\d+)"
    r"-g(?P<group_size>\d+)-n(?P<batch>\d+)-c(?P<context>\d+)$"
)


def _is_pow2(value: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1 and value & (value - 1) == 0


def bucket(value: int, name: str = "value") -> int:
    """The power-of-two bucket of a positive size: the nearest power of two in log2, ties up.

    ``bucket(1) == 1``, ``bucket(3) == 4``, ``bucket(700) == 512``, ``bucket(1500) == 2048``.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer")
    low = 1 << (value.bit_length() - 1)
    if low == value:
        return value
    high = low * 2
    return high if math.log2(value) - math.log2(low) >= math.log2(high) - math.log2(value) else low


def log2_distance(a: int, b: int) -> float:
    return abs(math.log2(a) - math.log2(b))


def parse_int_list(text: str | int | list, name: str) -> list[int]:
    """``"1,8,64"`` -> ``[1, 8, 64]``; raises ValueError naming the option and the bad item."""
    if isinstance(text, int):
        return [text]
    if isinstance(text, (list, tuple)):
        return [int(x) for x in text]
    items = [item.strip() for item in str(text).split(",") if item.strip()]
    if not items:
        raise ValueError(f"{name}={text!r} is empty; give a comma-separated list of integers")
    out = []
    for item in items:
        try:
            out.append(int(item))
        except ValueError:
            raise ValueError(f"{name}={text!r}: {item!r} is not an integer") from None
    return out


@dataclass(frozen=True, order=True)
class Workload:
    """One tuning target. ``batch`` and ``context`` are power-of-two buckets.

    Parameters
    ----------
    gpu : str
        Normalized device name (``h100``, ``interpreter`` ...), a database folder.
    dtype : str
        ``fp16``, ``bf16`` or ``fp32``.
    head_dim, block_size, group_size : int
        As in :class:`kgen.variant.VariantConfig`; block size is part of the cache layout.
    batch : int
        Bucket of the number of sequences in a decode step.
    context : int
        Bucket of the longest context length in the step, in tokens.
    """

    gpu: str
    dtype: str
    head_dim: int
    block_size: int
    group_size: int
    batch: int
    context: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", normalize_dtype(self.dtype))
        if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", str(self.gpu)):
            raise ValueError(f"gpu={self.gpu!r} is not a normalized device name")
        for name, allowed in (("head_dim", HEAD_DIMS), ("block_size", BLOCK_SIZES),
                              ("group_size", GROUP_SIZES)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value not in allowed:
                raise ValueError(f"{name}={value!r} is not supported; allowed: "
                                 f"{', '.join(map(str, allowed))}")
        for name in ("batch", "context"):
            if not _is_pow2(getattr(self, name)):
                raise ValueError(f"{name}={getattr(self, name)!r} must be a power of two bucket")

    @property
    def key(self) -> str:
        return (f"{self.gpu}-{self.dtype}-d{self.head_dim}-b{self.block_size}-g{self.group_size}"
                f"-n{self.batch}-c{self.context}")

    @property
    def family_key(self) -> str:
        """The key without GPU and buckets: which entries are neighbours of each other."""
        return f"{self.dtype}-d{self.head_dim}-b{self.block_size}-g{self.group_size}"

    @classmethod
    def from_key(cls, key: str) -> "Workload":
        match = _KEY_RE.match(str(key).strip())
        if not match:
            raise ValueError(f"workload key {key!r} is malformed; expected e.g. "
                             f"'h100-fp16-d128-b16-g4-n32-c4096'")
        fields = match.groupdict()
        return cls(**{k: (v if k in ("gpu", "dtype") else int(v)) for k, v in fields.items()})

    @classmethod
    def for_step(cls, *, gpu: str, dtype, head_dim: int, block_size: int, group_size: int,
                 num_seqs: int, max_context: int) -> "Workload":
        """The workload of one decode step: sizes are bucketed."""
        return cls(gpu=gpu, dtype=dtype, head_dim=head_dim, block_size=block_size,
                   group_size=group_size, batch=bucket(num_seqs, "num_seqs"),
                   context=bucket(max_context, "max_context"))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Workload":
        return cls(**data)

    def replace(self, **changes) -> "Workload":
        return Workload(**{**asdict(self), **changes})


def expand_workloads(*, gpu: str, dtypes, head_dims, block_sizes, group_sizes, batches,
                     contexts) -> list[Workload]:
    """The cross product of the selections, each batch/context checked to be a power of two."""
    for name, values in (("--batch", batches), ("--context", contexts)):
        for value in values:
            if not _is_pow2(value):
                raise ValueError(f"{name}={value!r} must be a power of two (a bucket)")
    return [Workload(gpu=gpu, dtype=dt, head_dim=d, block_size=b, group_size=g, batch=n, context=c)
            for dt in dtypes for d in head_dims for b in block_sizes for g in group_sizes
            for n in batches for c in contexts]
