"""Attention math shared by the prefill and the torch decode paths: SDPA, or the same with a
soft-cap spelled out (torch's SDPA kernels cannot cap scores)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_cap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """``cap * tanh(x / cap)`` in x's dtype (Gemma 2's attention scores and final logits)."""
    return torch.tanh(x / cap) * cap


def attend(q, k, v, mask, scale: float, cap: float | None):
    """SDPA, or (with a soft-cap) the same math spelled out: scores in q's dtype, softmax in fp32.

    q: [..., n, D]; k, v: [..., S, D]; mask: bool (True = visible) or additive float, broadcastable
    to [..., n, S], or None. Returns [..., n, D].
    """
    if cap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    scores = soft_cap(torch.matmul(q, k.transpose(-1, -2)) * scale, cap)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)


def attend_padded(q, k, v, visible, scale: float, cap: float | None):
    """Attention over padded key rows, with the softmax torch's SDPA gives an unpadded row.

    q: [..., n, D]; k, v: [..., S, D]; visible: bool, broadcastable to [..., n, S] (False: a
    padding position). Padding is replaced by -inf, not added to (an inf score plus a -inf mask
    would be NaN). The maximum skips NaN scores, and a row whose visible scores are all NaN or
    -inf gives zeros, as SDPA does for one unpadded sequence (what transformers runs in a decode
    step); a NaN among finite scores still spreads, as there. Scores in q's dtype, softmax in fp32.
    Returns [..., n, D].
    """
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if cap is not None:
        scores = soft_cap(scores, cap)
    scores = scores.float().masked_fill(~visible, float("-inf"))
    top = torch.nan_to_num(scores, nan=float("-inf"), posinf=float("inf"),
                           neginf=float("-inf")).amax(dim=-1, keepdim=True)
    dead = top == float("-inf")
    p = torch.exp(scores - top.masked_fill(dead, 0.0)).masked_fill(dead, 0.0)
    p = p / p.sum(dim=-1, keepdim=True).masked_fill(dead, 1.0)
    return torch.matmul(p.to(q.dtype), v)
