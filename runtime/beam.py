"""Beam search bookkeeping for one request (decisions only; the engine forks and frees blocks).

Each step, the ``2 * beam_width`` best one-token extensions over all live beams are ranked by
cumulative log probability (length penalty 0). Extensions that end the sequence (EOS unless
``ignore_eos``, or a stop token) and rank within the first ``beam_width`` become finished
hypotheses; the best ``beam_width`` other extensions become the next live beams. A live beam with
no extension is pruned (its blocks are freed); a beam with several extensions is forked, so the
children share its blocks and copy-on-write the last one. The search ends when ``beam_width``
hypotheses are all better than the best live beam (cumulative log probabilities only go down),
or when the beams reach ``max_tokens`` / the length limit.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from runtime.sampling import SamplingParams, beam_candidates


@dataclass
class Hypothesis:
    """A finished beam: its generated tokens, cumulative log probability and finish reason."""

    token_ids: list[int]
    cumulative_logprob: float
    finish_reason: str


@dataclass
class BeamPlan:
    """What the engine does after one beam step.

    ``extend``: (index of the parent among the live beams, token, token logprob), the new live
    beams in rank order; ``prune``: indices of live beams without an extension.
    """

    extend: list[tuple[int, int, float]] = field(default_factory=list)
    prune: list[int] = field(default_factory=list)


class BeamSearch:
    """The finished hypotheses and step rule of one beam-search request."""

    def __init__(self, params: SamplingParams, eos_token_ids, max_len: int) -> None:
        self.width = params.beam_width
        self.params = params
        self.enders = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_token_ids))
        self.max_len = max_len
        self.hyps: list[Hypothesis] = []

    def step(self, outputs: list[list[int]], cum_logprobs: list[float], logprobs: torch.Tensor) -> BeamPlan:
        """Rank the extensions of the live beams.

        Parameters
        ----------
        outputs : list[list[int]]
            Generated tokens of each live beam so far.
        cum_logprobs : list[float]
            Cumulative log probability of each live beam.
        logprobs : torch.Tensor
            float32 ``[num_live, vocab]`` next-token log probabilities.
        """
        plan = BeamPlan()
        for rank, (beam, token, lp, cum) in enumerate(beam_candidates(cum_logprobs, logprobs, 2 * self.width)):
            if token in self.enders:
                if rank < self.width:
                    self.hyps.append(Hypothesis(outputs[beam] + [token], cum, "stop"))
                continue
            plan.extend.append((beam, token, lp))
            if len(plan.extend) == self.width:
                break
        used = {beam for beam, _, _ in plan.extend}
        plan.prune = [i for i in range(len(outputs)) if i not in used]
        return plan

    def is_done(self, best_live_logprob: float | None) -> bool:
        """True when no live beam can still enter the final top ``beam_width``."""
        if best_live_logprob is None:
            return True
        if len(self.hyps) < self.width:
            return False
        worst_kept = sorted(h.cumulative_logprob for h in self.hyps)[-self.width]
        return best_live_logprob <= worst_kept

    def finish_live(self, output_ids: list[int], cum_logprob: float, reason: str) -> None:
        """A live beam that ends here (length limit, or the search is done) joins the hypotheses."""
        self.hyps.append(Hypothesis(list(output_ids), cum_logprob, reason))

    def best(self) -> list[Hypothesis]:
        """The final ``beam_width`` hypotheses, best first."""
        return sorted(self.hyps, key=lambda h: -h.cumulative_logprob)[: self.width]
