"""The measuring backend: one small interface, and the cost models that need no kernel.

A :class:`Measurer` turns (variant, workload) into a :class:`Measurement`: a time in ms, or a
``pruned`` / ``failed`` status with the reason. Implementations:

* :class:`SyntheticMeasurer` -- a deterministic cost model with a known optimum (tests, CI);
* :class:`ReplayMeasurer` -- looks times up in a recorded (config -> time) table, to score the
  tuner offline (``bench/tuner_replay.py``);
* :class:`kgen.tune.measure_kernel.InterpreterMeasurer` and ``GpuMeasurer`` -- run real kernels.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field

from kgen.tune.search import all_candidates, static_prune
from kgen.workload import Workload
from kgen.variant import SPLIT_AUTO, VariantConfig


@dataclass(frozen=True)
class Measurement:
    """The outcome of measuring one candidate.

    ``status`` is ``ok`` (``time_ms`` set), ``pruned`` (not built or not timed: static prune,
    audit, compile failure) or ``failed`` (ran but was wrong or crashed); ``reason`` says why.
    ``extra["static"]`` marks candidates rejected by the pure prune rules (free: nothing built).
    """

    status: str
    time_ms: float | None = None
    reason: str | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status not in ("ok", "pruned", "failed"):
            raise ValueError(f"status={self.status!r} is not ok, pruned or failed")
        if self.status == "ok" and not (self.time_ms and math.isfinite(self.time_ms) and self.time_ms > 0):
            raise ValueError(f"time_ms={self.time_ms!r} is not a positive time for an ok measurement")
        if self.status != "ok" and not self.reason:
            raise ValueError(f"a {self.status} measurement needs a reason")

    @property
    def ok(self) -> bool:
        return self.status == "ok"


class Measurer:
    """Interface: ``measure(config, workload) -> Measurement``.

    Attributes
    ----------
    device : str
        The normalized device name the measurer times on (``h100``, ``interpreter`` ...).
    method : str
        How times are taken, for provenance (e.g. ``do_bench median, L2 flushed``).
    """

    device = "synthetic"
    method = "abstract"

    def __init__(self) -> None:
        self.calls = 0

    def measure(self, config: VariantConfig, workload: Workload) -> Measurement:
        """Prune statically, then time ``config`` on ``workload`` (counted in ``calls``)."""
        reason = static_prune(config)
        if reason:
            return Measurement("pruned", reason=f"static prune: {reason}", extra={"static": True})
        self.calls += 1
        return self._measure(config, workload)

    def _measure(self, config: VariantConfig, workload: Workload) -> Measurement:
        raise NotImplementedError


def _log2_gap(value: int, ideal: int) -> float:
    return math.log2(value) - math.log2(ideal)


class SyntheticMeasurer(Measurer):
    """A deterministic cost model with a known optimum; no kernel is built.

    The cost is a product of convex bowls in log2 of each parameter around ideal values derived
    from the workload (more split-K partitions for long contexts and small batches, ...), times
    a tiny per-config hash jitter so that the optimum is unique. Candidates with 16-token tiles
    on 16 warps "fail" (to exercise failed records). ``delay_s`` sleeps per measurement, so
    tests can overlap processes or kill one mid-trial.
    """

    device = "synthetic"
    method = "synthetic cost model (deterministic)"

    def __init__(self, seed: int = 0, delay_s: float = 0.0) -> None:
        super().__init__()
        self.seed = seed
        self.delay_s = delay_s

    @staticmethod
    def ideal(workload: Workload) -> dict:
        split = 2 ** round(math.log2(max(1, workload.context / (256 * workload.batch))))
        rows = workload.query_len * workload.group_size
        return {"split_k": min(split, 32), "tile_tokens": 64 if workload.head_dim <= 128 else 32,
                "num_warps": 4 if workload.group_size <= 4 else 8,
                "num_stages": 3 if workload.context >= 8192 else 2,
                "q_tile": min(128, max(16, 1 << (rows - 1).bit_length()))}

    def cost(self, config: VariantConfig, workload: Workload) -> float:
        ideal = self.ideal(workload)
        split = config.split_k if config.split_k != SPLIT_AUTO else ideal["split_k"]
        bowl = ((1 + 0.15 * _log2_gap(split, ideal["split_k"]) ** 2)
                * (1 + 0.12 * _log2_gap(config.tile_tokens, ideal["tile_tokens"]) ** 2)
                * (1 + 0.10 * _log2_gap(config.num_warps, ideal["num_warps"]) ** 2)
                * (1 + 0.05 * (config.num_stages - ideal["num_stages"]) ** 2))
        if config.split_k == SPLIT_AUTO:
            bowl *= 1.04  # auto lands near the ideal partition count, not exactly on it
        if config.family == "attention":  # the query tile, and a decode step's extra row work
            bowl *= 1 + 0.10 * _log2_gap(config.q_tile, ideal["q_tile"]) ** 2
            bowl *= 1.03 if workload.decode else 1.0
        digest = hashlib.sha1(f"{self.seed}:{workload.key}:{config.key}".encode()).digest()
        jitter = 1 + 0.004 * digest[0] / 255
        base = (0.004 + workload.batch * workload.context * workload.head_dim * 4e-9) \
            * (1 + 0.01 * (workload.query_len - 1))
        return base * bowl * jitter

    def _measure(self, config: VariantConfig, workload: Workload) -> Measurement:
        # sleep in slices: a signal the kernel hands to another thread (numpy's BLAS pool) does
        # not cut a long sleep of the main thread short, so Ctrl-C would wait for its end
        end = time.monotonic() + self.delay_s
        while (left := end - time.monotonic()) > 0:
            time.sleep(min(left, 0.05))
        if config.tile_tokens == 16 and config.num_warps == 16:
            return Measurement("failed", reason="synthetic: wrong result against the reference")
        return Measurement("ok", time_ms=self.cost(config, workload))

    def optimum(self, workload: Workload) -> tuple[VariantConfig, float]:
        """The best candidate of the workload's space and its cost (brute force)."""
        best = None
        for config in all_candidates(workload):
            if static_prune(config) or (config.tile_tokens == 16 and config.num_warps == 16):
                continue
            cost = self.cost(config, workload)
            if best is None or cost < best[1]:
                best = (config, cost)
        if best is None:
            raise ValueError(f"workload {workload.key} has no valid candidate")
        return best


class ReplayMeasurer(Measurer):
    """Times looked up in a recorded table: ``{workload_key: {config_key: time_ms}}``.

    A config missing from the table is a ``failed`` measurement (it was not recorded as valid).
    Build one from a trial log with :meth:`from_trials`.
    """

    method = "replay of a recorded table"

    def __init__(self, table: dict[str, dict[str, float]], device: str = "replay") -> None:
        super().__init__()
        if not isinstance(table, dict) or not table:
            raise ValueError("table must be a non-empty {workload_key: {config_key: time_ms}}")
        self.table = table
        self.device = device

    @classmethod
    def from_trials(cls, records: list[dict], device: str = "replay") -> "ReplayMeasurer":
        """From ``trials.jsonl`` records: the median time of each (workload, config) measured ok."""
        times: dict[str, dict[str, list[float]]] = {}
        for rec in records:
            if rec.get("type") == "trial" and rec.get("status") == "ok":
                times.setdefault(rec["workload_key"], {}).setdefault(rec["config_key"], []).append(
                    rec["time_ms"])
        table = {w: {c: sorted(v)[len(v) // 2] for c, v in cs.items()} for w, cs in times.items()}
        return cls(table, device=device)

    def best(self, workload: Workload) -> tuple[str, float]:
        rows = self.table.get(workload.key)
        if not rows:
            raise ValueError(f"workload {workload.key!r} is not in the replay table")
        key = min(rows, key=rows.get)
        return key, rows[key]

    def _measure(self, config: VariantConfig, workload: Workload) -> Measurement:
        time_ms = self.table.get(workload.key, {}).get(config.key)
        if time_ms is None:
            return Measurement("failed", reason="not in the replay table")
        return Measurement("ok", time_ms=float(time_ms))
