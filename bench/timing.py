"""Timing helpers shared by the GPU benchmarks: CUDA-graph replay time and a per-kernel breakdown.

- :func:`graph_ms`: capture a call in a CUDA graph and time its replay with the caller's timer,
  which takes host-side launch work (Python launchers, allocations) out of the figure. The gap
  between a call's eager time and its graph time is the launch overhead a decode step pays.
- :func:`kernel_device_us`: device time per call of each named kernel, from ``torch.profiler``,
  with the L2 cache flushed between calls (as ``triton.testing.do_bench`` does), e.g. how much of a
  split-K call the merge takes.

Both need CUDA; callers skip them elsewhere.
"""

from __future__ import annotations


def graph_ms(torch, timer, fn, *, warmup: int = 2) -> float:
    """Median ms of replaying ``fn`` captured in a CUDA graph (``timer``: fn -> median ms).

    ``fn`` must be capturable: no host sync, the same launches every call. It runs ``warmup``
    times eagerly first (:func:`runtime.cuda_graphs.capture_graph`, the runtime's own capture).
    """
    from runtime.cuda_graphs import capture_graph  # with torch, only on the GPU path

    replay, _ = capture_graph(fn, warmup=warmup)
    torch.cuda.synchronize()
    return timer(replay)


def kernel_device_us(torch, fn, names, *, calls: int = 20, flush_bytes: int = 256 << 20) -> dict:
    """Mean device microseconds per call of each kernel in ``names`` that ``fn`` launches.

    Returns ``{name: us}`` for the kernels seen (a kernel ``fn`` did not launch is absent) plus
    ``"total"``, their sum. The L2 cache is flushed (a ``flush_bytes`` buffer zeroed) before each
    call; the flush kernel is not counted.
    """
    from torch.profiler import ProfilerActivity, profile

    flush = torch.empty(flush_bytes, dtype=torch.int8, device="cuda")
    fn()  # compile outside the profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            flush.zero_()
            fn()
        torch.cuda.synchronize()
    found: dict[str, float] = {}
    for event in prof.key_averages():
        name = next((n for n in names if n in event.key), None)
        if name is None:
            continue
        total = getattr(event, "device_time_total", None)
        if total is None:  # older torch
            total = getattr(event, "cuda_time_total", 0.0)
        found[name] = found.get(name, 0.0) + float(total) / calls
    found["total"] = sum(found.values())
    return found
