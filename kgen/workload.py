"""Workloads: what one tuning study and one database record are about.

A workload is (GPU, dtype, head dim, KV block size, group size, batch bucket, context bucket,
query-length bucket, KV dtype, attention features). Batch (``num_seqs``), context (longest
sequence length) and query length (the most new tokens of one sequence in the step: 1 for decode,
2-16 for speculative decoding, 64..2048 for prefill chunks) are bucketed to powers of two; its
key, e.g. ``h100-fp16-d128-b16-g4-n32-c4096``, names its Optuna study and its database entries.

A workload also names the kernel family its study searches: ``decode`` (one query token per
sequence, :class:`kgen.variant.VariantConfig`) or ``attention`` (any query length,
:class:`kgen.variant_attention.AttentionVariantConfig`). Decode workloads have query length 1 and
keep the keys they always had; an attention workload's key adds ``-q<bucket>`` after the context
(``...-c4096-q512``; ``...-c4096-q1`` for the attention family on decode steps), so the two
families' records of one decode bucket sit side by side and a lookup serves the faster. A
non-default KV dtype and features add the variant key's suffixes
(``h100-bf16-d128-b16-g4-n32-c4096-kvfp8e4m3-swa``), so every record written before they existed
keeps its key, and a plain record never matches a feature workload.

Standard library only: the runtime's dispatch path imports this module.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

from kgen.dtypes import KV_KEY_TAGS
from kgen.features import SUFFIX_PATTERN, drop_default_axes, key_suffix, parse_suffix
from kgen.shape import BLOCK_SIZES, GROUP_SIZES, HEAD_DIMS, AttentionShape, normalize_fields

DEFAULT_BATCHES = tuple(2 ** i for i in range(0, 9))  # 1 .. 256
DEFAULT_CONTEXTS = tuple(2 ** i for i in range(9, 16))  # 512 .. 32768
MAX_QUERY_LEN = 2048  # the largest query-length bucket (prefill chunks); longer ones share it
KERNELS = ("decode", "attention")  # the kernel families a workload's study can search

_KEY_RE = re.compile(
    r"^(?P<gpu>[a-z0-9][a-z0-9-]*)-(?P<dtype>fp16|bf16|fp32)-d(?P<head_dim>\d+)-b(?P<block_size>\d+)"
    r"-g(?P<group_size>\d+)-n(?P<batch>\d+)-c(?P<context>\d+)(?:-q(?P<query_len>\d+))?"
    + SUFFIX_PATTERN + "$"
)
# Sliding-window workloads are tuned (and audited) with a window of this fraction of the context
# bucket: the window's length, not the context's, sets the work (see tuning_window).
TUNING_WINDOW_FRACTION = 0.5


def tuning_window(context: int) -> int:
    """The sliding window a tuning measurement of a ``context``-token bucket uses (>= 1)."""
    return max(1, int(context * TUNING_WINDOW_FRACTION))


def head_key(shape: AttentionShape) -> str:
    """The block-size defaults' key: ``fp16-d128``, or ``bf16-d128-kvfp8e4m3-swa`` for a KV dtype
    and features (group and block size left out: the preference is per head shape)."""
    return (f"{shape.dtype}-d{shape.head_dim}"
            f"{key_suffix(KV_KEY_TAGS.get(shape.kv_dtype), shape.features)}")


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


def query_bucket(max_query_len: int, name: str = "max_query_len") -> int:
    """The query-length bucket of a step: :func:`bucket`, capped at :data:`MAX_QUERY_LEN`
    (1 stays 1: decode; 3 -> 4; 1000 -> 1024; 5000 -> 2048)."""
    return min(bucket(max_query_len, name), MAX_QUERY_LEN)


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
        Bucket of the number of sequences in a step.
    context : int
        Bucket of the longest context length in the step, in tokens.
    query_len : int
        Bucket of the most query tokens of one sequence in the step: 1 (decode, the default),
        2..16 (speculative decoding), 64..2048 (prefill chunks); powers of two up to
        :data:`MAX_QUERY_LEN`.
    kernel : str
        The kernel family tuned for it: ``decode`` (query length 1 only) or ``attention``;
        default ``attention`` for query lengths above 1, else ``decode``.
    kv_dtype : str
        The KV cache's element type, ``auto`` (= dtype), ``fp8_e4m3`` or ``fp8_e5m2``.
    features : tuple of str
        Attention features of the step's kernel (canonical order, see :mod:`kgen.features`).
    """

    gpu: str
    dtype: str
    head_dim: int
    block_size: int
    group_size: int
    batch: int
    context: int
    kv_dtype: str = "auto"
    features: tuple = ()
    query_len: int = 1
    kernel: str | None = None

    def __post_init__(self) -> None:
        if self.kernel is None:
            object.__setattr__(self, "kernel", "decode" if self.query_len == 1 else "attention")
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel={self.kernel!r} is not a kernel family; use one of {', '.join(KERNELS)}")
        if self.kernel == "decode" and self.query_len != 1:
            raise ValueError(f"kernel=decode serves one query token per sequence, not "
                             f"query_len={self.query_len}; use kernel=attention")
        normalize_fields(self, allowed={"head_dim": HEAD_DIMS, "block_size": BLOCK_SIZES,
                                        "group_size": GROUP_SIZES})
        if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", str(self.gpu)):
            raise ValueError(f"gpu={self.gpu!r} is not a normalized device name")
        for name in ("batch", "context", "query_len"):
            if not _is_pow2(getattr(self, name)):
                raise ValueError(f"{name}={getattr(self, name)!r} must be a power of two bucket")
        if self.query_len > MAX_QUERY_LEN:
            raise ValueError(f"query_len={self.query_len} is above the largest bucket, {MAX_QUERY_LEN}")

    @property
    def _suffix(self) -> str:
        return key_suffix(KV_KEY_TAGS.get(self.kv_dtype), self.features)

    @property
    def key(self) -> str:
        query = f"-q{self.query_len}" if self.kernel == "attention" else ""
        return (f"{self.gpu}-{self.dtype}-d{self.head_dim}-b{self.block_size}-g{self.group_size}"
                f"-n{self.batch}-c{self.context}{query}{self._suffix}")

    @property
    def family_key(self) -> str:
        """The key without GPU and buckets: which entries are neighbours of each other."""
        return f"{self.dtype}-d{self.head_dim}-b{self.block_size}-g{self.group_size}{self._suffix}"

    @property
    def head_key(self) -> str:
        """``fp16-d128`` (with the KV dtype / feature suffixes): the database's block-size key."""
        return head_key(self.shape)

    @property
    def shape(self) -> AttentionShape:
        """What a record must share to serve this workload: everything but GPU and buckets."""
        return AttentionShape(dtype=self.dtype, head_dim=self.head_dim, group_size=self.group_size,
                              kv_dtype=self.kv_dtype, features=self.features,
                              block_size=self.block_size)

    def variant_fields(self) -> dict:
        """The :class:`kgen.variant.VariantConfig` fields the workload fixes (the tuner searches
        the others)."""
        return self.shape.variant_fields()

    @classmethod
    def from_key(cls, key: str) -> "Workload":
        match = _KEY_RE.match(str(key).strip())
        if not match:
            raise ValueError(f"workload key {key!r} is malformed; expected e.g. "
                             f"'h100-fp16-d128-b16-g4-n32-c4096' (optionally '-kvfp8e4m3-swa')")
        fields = match.groupdict()
        suffix = parse_suffix(fields)
        fields["kernel"] = "attention" if fields["query_len"] else "decode"
        fields["query_len"] = fields["query_len"] or 1
        workload = cls(**{k: (v if k in ("gpu", "dtype", "kernel") else int(v))
                          for k, v in fields.items()}, **suffix)
        if workload.key != str(key).strip():
            raise ValueError(f"workload key {key!r} is not canonical; did you mean {workload.key!r}?")
        return workload

    @classmethod
    def for_step(cls, gpu: str, shape: AttentionShape, *, num_seqs: int, max_context: int,
                 max_query_len: int = 1, kernel: str | None = None) -> "Workload":
        """The workload of one step of a layer of ``shape`` (its block size set): the batch,
        context and query length are bucketed (``kernel``: as the field)."""
        return cls(gpu=gpu, **shape.variant_fields(), batch=bucket(num_seqs, "num_seqs"),
                   context=bucket(max_context, "max_context"),
                   query_len=query_bucket(max_query_len), kernel=kernel)

    @property
    def decode(self) -> bool:
        """One query token per sequence (either family may serve such a step)."""
        return self.query_len == 1

    def to_dict(self) -> dict:
        """Plain fields; ``kv_dtype`` / ``features`` / ``query_len`` only when not the default
        (as the variant's dict), so a plain decode workload's record is written exactly as
        before."""
        data = drop_default_axes(asdict(self))
        if data["kernel"] == "decode":  # decode workloads: the records they always had
            del data["kernel"], data["query_len"]
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "Workload":
        return cls(**data)

    def replace(self, **changes) -> "Workload":
        return Workload(**{**asdict(self), **changes})


def expand_workloads(*, gpu: str, dtypes, head_dims, block_sizes, group_sizes, batches,
                     contexts, kv_dtypes=("auto",), feature_sets=((),), query_lens=(1,),
                     kernel: str | None = None) -> list[Workload]:
    """The cross product of the selections, each batch/context/query length checked to be a
    power of two (``kernel``: as :class:`Workload`'s field, for every workload)."""
    for name, values in (("--batch", batches), ("--context", contexts), ("--query-len", query_lens)):
        for value in values:
            if not _is_pow2(value):
                raise ValueError(f"{name}={value!r} must be a power of two (a bucket)")
    return [Workload(gpu=gpu, dtype=dt, head_dim=d, block_size=b, group_size=g, batch=n, context=c,
                     kv_dtype=kv, features=f, query_len=q, kernel=kernel)
            for dt in dtypes for kv in kv_dtypes for f in feature_sets for d in head_dims
            for b in block_sizes for g in group_sizes for q in query_lens for n in batches
            for c in contexts]
