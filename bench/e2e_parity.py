"""Greedy tokens of two runs compared, and where they part, whether rounding explains it.

Two bfloat16 engines (or transformers in two batch shapes) compute the same model with different
summation orders, so their logits differ by rounding, and a greedy run parts from another where
two tokens are nearly tied. :func:`rounding_report` shows that this is what happened: for every
request where an engine's tokens leave the reference's, it reads the float32 model's log
probabilities at that position (one float32 forward over the prompt and the reference's tokens,
shared by every engine) and reports the gap between the two tokens there, beside the float32
model's usual gap between its top two tokens over all positions. Divergences at gaps far below
the usual ones are near-ties that rounding flips; a bug would part at ordinary gaps.
"""

from __future__ import annotations

import statistics


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """The first position where a and b differ (the shorter length if one is a prefix), or None."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def identical(tokens: list[list[int]], ref: list[list[int]]) -> dict:
    firsts = [first_divergence(a, b) for a, b in zip(tokens, ref)]
    return {"identical_requests": sum(f is None for f in firsts),
            "first_divergence_positions": [f for f in firsts if f is not None]}


def rounding_report(fp32_model, prompts, ref: list[list[int]], engines: dict, device="cpu") -> dict:
    """For each engine (name -> tokens), its divergences from ``ref`` judged by ``fp32_model``.

    Returns ``{"fp32_top2_gap_median": ..., "engines": {name: {"divergent": n, "max_gap": ...,
    "median_gap": ..., "divergences": [{request, position, ref_token, token, ref_logprob,
    logprob, gap, fp32_top2_gap, token_is_fp32_argmax}]}}}``; gaps in nats (natural log).
    """
    import torch

    wanted = {name: {i: first_divergence(t, r) for i, (t, r) in enumerate(zip(toks, ref))}
              for name, toks in engines.items()}
    rows = {name: [] for name in engines}
    top2 = []
    for i, (prompt, want) in enumerate(zip(prompts, ref)):
        if not want:
            continue
        ids = torch.tensor([prompt + want[:-1]], device=device)
        with torch.inference_mode():
            logits = fp32_model(ids).logits[0, len(prompt) - 1:].float()            # [len(want), vocab]
        logprobs = torch.log_softmax(logits, dim=-1)
        best2 = logprobs.topk(2, dim=-1).values
        gaps = (best2[:, 0] - best2[:, 1]).tolist()
        top2 += gaps
        for name, toks in engines.items():
            k = wanted[name][i]
            if k is None or k >= len(want) or k >= len(toks[i]):
                continue
            a, b = want[k], toks[i][k]
            rows[name].append({"request": i, "position": k, "ref_token": a, "token": b,
                               "ref_logprob": float(logprobs[k, a]), "logprob": float(logprobs[k, b]),
                               "gap": abs(float(logprobs[k, a] - logprobs[k, b])), "fp32_top2_gap": gaps[k],
                               "token_is_fp32_argmax": int(logprobs[k].argmax()) == b})
    out = {"fp32_top2_gap_median": statistics.median(top2) if top2 else None,
           "fp32_positions": len(top2), "engines": {}}
    for name, found in rows.items():
        gaps = [r["gap"] for r in found]
        out["engines"][name] = {"divergent": len(found), "max_gap": max(gaps, default=None),
                                "median_gap": statistics.median(gaps) if gaps else None, "divergences": found}
    return out


def summary_line(name: str, report: dict) -> str:
    """One sentence for the table's notes."""
    r = report["engines"][name]
    if not r["divergent"]:
        return f"{name}: no divergence from the reference."
    return (f"{name}: {r['divergent']} requests part from the reference, at float32 log-probability gaps of "
            f"{r['median_gap']:.4f} (median) to {r['max_gap']:.4f} (max) nats between the two tokens, where the "
            f"float32 model's median gap between its top two tokens is {report['fp32_top2_gap_median']:.3f}")
