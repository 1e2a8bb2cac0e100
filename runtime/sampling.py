"""Sampling: SamplingParams, batched greedy / temperature / top-k / top-p sampling, beam scoring.

Sampling uses the exponential-race trick (``argmax(p / E)`` with ``E ~ Exp(1)`` is a sample of
``p``), so a whole batch is sampled with one argmax. A sequence with a seed owns its
``torch.Generator`` and draws its own noise row, so its samples do not depend on what else is in
the batch. Reported log probabilities are those of the model distribution (``log_softmax`` of the
raw logits), summed into ``cumulative_logprob``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


def check_seed(name: str, value) -> None:
    """Raise ValueError naming ``value`` unless it is an int (not a bool) or None."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"{name}={value!r} must be an int or None")


def check_token_ids(name: str, ids, vocab: int) -> None:
    """Raise ValueError naming ``name`` when an entry of ``ids`` is not an int (a float such as
    2.0 or a bool is a wrong type, said as such) or lies outside ``0 .. vocab - 1``."""
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, int):
            raise ValueError(f"{name} holds {t!r} of type {type(t).__name__}; token ids are ints")
        if not 0 <= t < vocab:
            raise ValueError(f"{name} holds token id {t!r}, outside 0..{vocab - 1} (the vocabulary)")


def _int_at_least(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}={value!r} must be an int >= {low}")


@dataclass(frozen=True)
class SamplingParams:
    """How to decode one request (vLLM-style names).

    Parameters
    ----------
    max_tokens : int
        New tokens to generate at most (>= 1).
    temperature : float
        0 means greedy; > 0 samples from ``softmax(logits / temperature)``.
    top_p : float
        Nucleus sampling mass, in (0, 1].
    top_k : int
        Keep the k most likely tokens; 0 (or -1) keeps all.
    n : int
        Independent samples of the prompt; they share the prompt's KV blocks.
    beam_width : int
        > 1 runs beam search (needs temperature 0 and n 1); returns ``beam_width`` beams.
    seed : int or None
        Seed of this request's own random stream (reproducible samples).
    stop_token_ids : tuple[int, ...]
        Extra tokens that end a sequence (finish_reason ``"stop"``), besides EOS.
    ignore_eos : bool
        Keep generating after EOS (until ``max_tokens`` or a stop token).
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    n: int = 1
    beam_width: int = 1
    seed: int | None = None
    stop_token_ids: tuple = field(default=())
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        _int_at_least("max_tokens", self.max_tokens, 1)
        _int_at_least("n", self.n, 1)
        _int_at_least("beam_width", self.beam_width, 1)
        _int_at_least("top_k", self.top_k, -1)
        temp = self.temperature
        if isinstance(temp, bool) or not isinstance(temp, (int, float)) or not math.isfinite(temp) or temp < 0:
            raise ValueError(f"temperature={temp!r} must be a finite number >= 0")
        top_p = self.top_p
        if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
            raise ValueError(f"top_p={top_p!r} must be in (0, 1]")
        check_seed("seed", self.seed)
        if self.beam_width > 1 and self.n > 1:
            raise ValueError(f"n={self.n} and beam_width={self.beam_width}: use one or the other")
        if self.beam_width > 1 and self.temperature > 0:
            raise ValueError(f"beam_width={self.beam_width} needs temperature=0 (got temperature={temp!r})")
        if isinstance(self.stop_token_ids, (str, bytes)) or not hasattr(self.stop_token_ids, "__iter__"):
            raise ValueError(f"stop_token_ids={self.stop_token_ids!r} must be a sequence of token ids")
        stops = tuple(self.stop_token_ids)
        for t in stops:
            if isinstance(t, bool) or not isinstance(t, int) or t < 0:
                raise ValueError(f"stop_token_ids holds {t!r}; token ids are ints >= 0")
        object.__setattr__(self, "stop_token_ids", stops)
        object.__setattr__(self, "temperature", float(temp))
        object.__setattr__(self, "top_p", float(top_p))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def num_outputs(self) -> int:
        """Completions returned: ``beam_width`` for beam search, else ``n``."""
        return self.beam_width if self.beam_width > 1 else self.n


def make_generator(seed: int | None, index: int, device: torch.device) -> torch.Generator | None:
    """The random stream of sample ``index`` of a seeded request (None when unseeded)."""
    if seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed((seed * 1_000_003 + index) % (2 ** 63))
    return gen


def _filter_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask logits outside each row's top-k / nucleus with -inf. logits: [rows, vocab] fp32."""
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    k = torch.where(top_k <= 0, torch.full_like(top_k, vocab), top_k)
    drop = ranks >= k[:, None]
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    drop |= mass_before >= top_p[:, None]          # never drops rank 0 (mass_before = 0)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list,
           default_generator: torch.Generator | None = None) -> tuple[list[int], list[float]]:
    """Pick one token per row.

    Parameters
    ----------
    logits : torch.Tensor
        float32 ``[rows, vocab]``.
    params : list[SamplingParams]
        One per row.
    generators : list[torch.Generator or None]
        Each row's own stream (seeded requests), or None to use ``default_generator``.

    Returns
    -------
    (token ids, log probabilities under the model distribution), one per row.
    """
    logprobs = torch.log_softmax(logits, dim=-1)
    tokens = logits.argmax(dim=-1)
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if sampled:
        idx = torch.tensor(sampled, device=logits.device)
        temps = torch.tensor([params[i].temperature for i in sampled], device=logits.device)
        scaled = logits.index_select(0, idx) / temps[:, None]
        if any(params[i].top_k > 0 or params[i].top_p < 1 for i in sampled):
            top_k = torch.tensor([params[i].top_k for i in sampled], device=logits.device)
            top_p = torch.tensor([params[i].top_p for i in sampled], device=logits.device)
            scaled = _filter_top_k_top_p(scaled, top_k, top_p)
        probs = scaled.softmax(dim=-1)
        noise = torch.empty_like(probs)
        for row, i in enumerate(sampled):
            noise[row].exponential_(generator=generators[i] or default_generator)
        tokens[idx] = (probs / noise).argmax(dim=-1)
    chosen = logprobs.gather(1, tokens[:, None])[:, 0]
    return tokens.tolist(), chosen.tolist()


def beam_candidates(cum_logprobs: list[float], logprobs: torch.Tensor,
                    num: int) -> list[tuple[int, int, float, float]]:
    """The ``num`` best one-token extensions over all beams of one request.

    Parameters
    ----------
    cum_logprobs : list[float]
        Each live beam's cumulative log probability.
    logprobs : torch.Tensor
        float32 ``[num_beams, vocab]`` next-token log probabilities.
    num : int
        Candidates to return (usually ``2 * beam_width``, so that EOS candidates can be set
        aside and ``beam_width`` live beams remain).

    Returns
    -------
    list of (beam index, token id, token logprob, new cumulative logprob), best first.
    """
    beams, vocab = logprobs.shape
    totals = logprobs + torch.tensor(cum_logprobs, dtype=logprobs.dtype, device=logprobs.device)[:, None]
    best = totals.view(-1).topk(min(num, beams * vocab))
    flat = best.indices.tolist()
    return [(f // vocab, f % vocab, float(logprobs[f // vocab, f % vocab]), float(v))
            for f, v in zip(flat, best.values.tolist())]
