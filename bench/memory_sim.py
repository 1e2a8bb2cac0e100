"""Serving simulators for the memory study (see bench/memory_study.py for the method).

Workloads (log-normal lengths with the paper's means, Poisson arrivals), a per-step meter of
stored / reserved KV slots, the paged policy driven by the runtime's KVCacheManager and Scheduler,
and the contiguous-reservation baselines over a first-fit allocator.
"""

from __future__ import annotations

import bisect
import math
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runtime.kv_manager import KVCacheManager  # noqa: E402
from runtime.scheduler import Scheduler  # noqa: E402
from runtime.sequence import Sequence, SequenceGroup  # noqa: E402

MAX_LEN = 2048
MAX_PROMPT = 1024
BUDGET = 16384
SIGMA = 0.8
MAX_SEQS = 4096  # high enough that memory, not a sequence cap, limits every policy
BLOCK_SIZES = (8, 16, 32, 64, 128)
CONTIGUOUS = ("max", "pow2", "oracle")
WORKLOADS = {
    "sharegpt": {"input_mean": 161.31, "output_mean": 337.99, "rate": 0.4},
    "alpaca": {"input_mean": 19.31, "output_mean": 58.45, "rate": 10.0},
}


def draw_length(rng: random.Random, mean: float, lo: int, hi: int) -> int:
    """One log-normal length with the given mean (before clipping to [lo, hi])."""
    mu = math.log(mean) - SIGMA ** 2 / 2
    return min(hi, max(lo, round(rng.lognormvariate(mu, SIGMA))))


def make_requests(workload: str, num: int, seed: int) -> list[tuple[float, int, int]]:
    """``num`` requests ``(arrival step, input len, output len)`` with Poisson arrivals."""
    w, rng, t, reqs = WORKLOADS[workload], random.Random(seed), 0.0, []
    for _ in range(num):
        t += rng.expovariate(w["rate"])
        p = draw_length(rng, w["input_mean"], 1, MAX_PROMPT)
        reqs.append((t, p, draw_length(rng, w["output_mean"], 1, MAX_LEN - p)))
    return reqs


class Meter:
    """Per-step accumulators -> the metrics described in bench/memory_study.py's docstring."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.steps = self.busy = self.blocked = self.max_running = 0
        self.stored = self.reserved = self.running = 0
        self.b_stored = self.b_future = self.b_internal = self.b_free = 0

    def record(self, running: list[tuple[int, int, int]], blocked: bool) -> None:
        """``running``: (tokens stored, slots reserved, final footprint F) per running request."""
        self.steps += 1
        if not running:
            return
        stored = sum(s for s, _, _ in running)
        reserved = sum(r for _, r, _ in running)
        used_later = sum(min(r, f) for _, r, f in running)
        self.busy += 1
        self.stored += stored
        self.reserved += reserved
        self.running += len(running)
        self.max_running = max(self.max_running, len(running))
        if blocked:
            self.blocked += 1
            self.b_stored += stored
            self.b_future += used_later - stored
            self.b_internal += reserved - used_later
            self.b_free += self.budget - reserved

    def result(self, num_requests: int) -> dict:
        frac = (lambda x: x / (self.blocked * self.budget)) if self.blocked else (lambda x: None)
        return {
            "utilization": self.stored / self.reserved, "token_states": frac(self.b_stored),
            "reservation": frac(self.b_future), "internal_frag": frac(self.b_internal),
            "external_frag": frac(self.b_free), "memory_bound_steps": self.blocked,
            "mean_concurrent": self.running / self.busy, "max_concurrent": self.max_running,
            "requests_per_step": num_requests / self.steps, "steps": self.steps,
        }


def run_paged(reqs, block_size: int, budget: int = BUDGET) -> dict:
    """Serve ``reqs`` with the runtime's KVCacheManager + Scheduler; returns the metrics."""
    kv = KVCacheManager(budget // block_size, block_size, enable_prefix_caching=False, watermark=0.01)
    sched = Scheduler(kv, max_num_seqs=MAX_SEQS, max_num_batched_tokens=1 << 30)
    meter, out_len, final = Meter(budget), {}, {}
    t, i, done = 0, 0, 0
    while done < len(reqs):
        if not sched.has_unfinished():
            t = max(t, math.ceil(reqs[i][0]))
        while i < len(reqs) and reqs[i][0] <= t:
            _, p, o = reqs[i]
            out_len[i], final[i] = o, p + o - 1
            sched.add(SequenceGroup(i, [Sequence(i, [1] * p)]))
            i += 1
        out = sched.schedule()
        seqs = out.prefill_seqs + out.decode_seqs
        meter.record([(len(s), len(s.block_table) * block_size, final[s.seq_id]) for s in seqs],
                     blocked=bool(sched.waiting))
        for s in seqs:
            s.num_computed_tokens += s.num_scheduled_tokens
            if s.num_computed_tokens < len(s):  # a prefill chunk short of the prompt's end
                continue
            s.append_token(1)
            if len(s) - s.num_prompt_tokens >= out_len[s.seq_id]:
                sched.finish_seq(s, "length")
        done += len(sched.free_finished())
        t += 1
    res = meter.result(len(reqs))
    res["preemptions"] = kv.stats()["preemptions"]
    return res


class FirstFit:
    """Contiguous allocator over ``[0, size)``: first-fit holes, merged on free."""

    def __init__(self, size: int) -> None:
        self.starts, self.sizes = [0], [size]

    def alloc(self, n: int) -> int | None:
        for k, sz in enumerate(self.sizes):
            if sz >= n:
                start = self.starts[k]
                if sz == n:
                    del self.starts[k], self.sizes[k]
                else:
                    self.starts[k], self.sizes[k] = start + n, sz - n
                return start
        return None

    def free(self, start: int, n: int) -> None:
        k = bisect.bisect(self.starts, start)
        self.starts.insert(k, start)
        self.sizes.insert(k, n)
        if k + 1 < len(self.starts) and start + n == self.starts[k + 1]:  # merge with the next hole
            self.sizes[k] += self.sizes.pop(k + 1)
            self.starts.pop(k + 1)
        if k and self.starts[k - 1] + self.sizes[k - 1] == start:  # merge with the previous hole
            self.sizes[k - 1] += self.sizes.pop(k)
            self.starts.pop(k)


def reserve_size(policy: str, final: int) -> int:
    if policy == "max":
        return MAX_LEN
    if policy == "pow2":
        return 1 << (final - 1).bit_length()
    if policy == "oracle":
        return final
    raise ValueError(f"policy={policy!r} is not one of {CONTIGUOUS}")


def run_contiguous(reqs, policy: str, budget: int = BUDGET) -> dict:
    """Serve ``reqs`` reserving one contiguous chunk per request up front (FCFS, first fit)."""
    heap, meter, waiting, running = FirstFit(budget), Meter(budget), [], []  # running: [p, o, start, size, age]
    t, i, done, head = 0, 0, 0, 0
    while done < len(reqs):
        if not running and head == len(waiting):
            t = max(t, math.ceil(reqs[i][0]))
        while i < len(reqs) and reqs[i][0] <= t:
            waiting.append(reqs[i])
            i += 1
        while head < len(waiting) and len(running) < MAX_SEQS:
            _, p, o = waiting[head]
            size = reserve_size(policy, p + o - 1)
            start = heap.alloc(size)
            if start is None:
                break
            running.append([p, o, start, size, 0])
            head += 1
        meter.record([(p + age, size, p + o - 1) for p, o, _, size, age in running], blocked=head < len(waiting))
        for r in running:
            r[4] += 1
        for p, o, start, size, age in running:
            if age == o:
                heap.free(start, size)
                done += 1
        running = [r for r in running if r[4] < r[1]]
        t += 1
    return meter.result(len(reqs))
