"""Teacher-forced logits through the engine's own paged path (prefill, then one decode per token).

Used to measure what a cache format costs: the same tokens are fed whatever the model would
have picked, so two runs (e.g. an fp32 and an fp8 KV cache) are compared position by position.
"""

from __future__ import annotations

import torch

from runtime.sequence import Sequence


@torch.inference_mode()
def teacher_forced_logits(engine, prompts: list[list[int]], continuations: list[list[int]]) -> list[torch.Tensor]:
    """Logits predicting each continuation token, with the continuation fed one token per step.

    Parameters
    ----------
    engine : runtime.engine.Engine
        A fresh engine (nothing queued); its pool must hold every prompt + continuation at once.
    prompts, continuations : list[list[int]]
        One prompt and one non-empty continuation per sequence.

    Returns
    -------
    list[torch.Tensor]
        float32 ``[len(continuation), vocab]`` per sequence: row 0 from the prompt's prefill,
        row ``i`` from the decode step that fed ``continuation[i - 1]`` (read back from the cache).
    """
    if len(prompts) != len(continuations) or any(not c for c in continuations):
        raise ValueError("teacher_forced_logits needs one non-empty continuation per prompt")
    seqs = [Sequence(10_000_000 + i, p) for i, p in enumerate(prompts)]
    engine.kv.allocate_all(seqs[:1])
    for s in seqs[1:]:
        engine.kv.allocate_all([s])
    rows: list[list[torch.Tensor]] = [[] for _ in seqs]
    for s in seqs:
        s.num_scheduled_tokens = s.num_uncomputed_tokens  # the whole prompt in one step
    logits, _ = engine.run_forward(seqs, [])
    for i, s in enumerate(seqs):
        rows[i].append(logits[i])
        s.num_computed_tokens = len(s)
    for step in range(1, max(map(len, continuations))):
        live = [i for i, c in enumerate(continuations) if step < len(c)]
        copies = []
        for i in live:
            seqs[i].append_token(continuations[i][step - 1])
            copies += engine.kv.append_slot(seqs[i])  # frees what slid out of the window first
        if copies:
            engine.kv_cache.copy_blocks([a for a, _ in copies], [b for _, b in copies])
        logits, _ = engine.run_forward([], [seqs[i] for i in live])
        for row, i in enumerate(live):
            rows[i].append(logits[row])
            seqs[i].num_computed_tokens = len(seqs[i])
    for s in seqs:
        engine.kv.free(s)
    return [torch.stack(r) for r in rows]
