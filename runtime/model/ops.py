"""The decoder's elementwise pieces: RMSNorm (Llama and Gemma styles), MLP activations, RoPE's
rotate-half. Numerics follow transformers (fp32 statistics) so that greedy decoding matches it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_HAS_RMS_NORM = hasattr(F, "rms_norm")  # torch >= 2.4

ACTIVATIONS = {
    "silu": F.silu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama-style RMSNorm over the last dim: ``weight * (x / rms(x)).to(dtype)``, statistics in fp32.

    x: [..., dim] (fp32/fp16/bf16); weight: [dim] in x's dtype. Returns x's shape and dtype.
    """
    if x.dtype == torch.float32 and _HAS_RMS_NORM:  # one fused op, same math in fp32
        return F.rms_norm(x, weight.shape, weight, eps)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


class RMSNorm:
    """An RMSNorm with its weight, in the family's style.

    ``offset == 0``: Llama's ``w * norm(x).to(dtype)``. ``offset == 1``: Gemma's
    ``(norm(x) * (1 + w.float())).to(dtype)``, the scale applied in fp32 before the cast.

    Parameters
    ----------
    weight : torch.Tensor
        ``[dim]`` as stored in the checkpoint, already in the compute dtype.
    eps : float
    offset : float
    """

    def __init__(self, weight: torch.Tensor, eps: float, offset: float = 0.0) -> None:
        self.eps, self.offset = eps, offset
        self.weight = weight if offset == 0.0 else offset + weight.float()  # fp32 [dim] for Gemma

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.offset == 0.0:
            return rms_norm(x, self.weight, self.eps)
        if x.dtype == torch.float32 and _HAS_RMS_NORM:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight).to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[x1, x2] -> [-x2, x1]`` over the last dim (RoPE's rotate-half convention)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

