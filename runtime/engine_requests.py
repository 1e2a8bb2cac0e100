"""What the engine does with a step's logits: sample, fork, prune beams, finish requests.

:class:`RequestBook` is the part of :class:`runtime.engine.Engine` that keeps requests: their
sequences, samplers and beams, and the completions of finished ones. The engine's step hands it
the rows whose logits are sampled; a request with a NaN or infinite logit is aborted by name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from runtime.beam import BeamSearch
from runtime.sampling import SamplingParams, make_generator, sample
from runtime.sequence import Sequence, SequenceGroup


@dataclass
class FinishedRequest:
    """A request's result: (token ids, cumulative logprob, finish reason) per completion, and
    ``error``: why it was aborted (finish reason ``"abort"``), else None."""

    request_id: int
    prompt_token_ids: list[int]
    completions: list[tuple[list[int], float, str]]
    error: str | None = None


@dataclass
class _Request:
    group: SequenceGroup
    params: SamplingParams
    prompt_token_ids: list[int]
    generators: dict = field(default_factory=dict)   # seq_id -> torch.Generator (seeded requests)
    index: dict = field(default_factory=dict)        # seq_id -> completion index (n > 1)
    forked: bool = False
    beam: BeamSearch | None = None



class RequestBook:
    """Request bookkeeping of an engine (see the module docstring); the engine sets ``_requests``,
    ``_seq_req``, ``_finished``, ``scheduler``, ``kv``, ``config``, ``device``, ``generator`` and
    ``max_len``."""

    def _register_seq(self, req: _Request, seq: Sequence, index: int) -> None:
        self._seq_req[seq.seq_id] = req.group.request_id
        req.index[seq.seq_id] = index
        gen = make_generator(req.params.seed, index, self.device)
        if gen is not None:
            req.generators[seq.seq_id] = gen

    # ------------------------------------------------------------------ non-finite logits
    @staticmethod
    def _nonfinite_requests(rows: dict[int, list[tuple[Sequence, int]]], logits: torch.Tensor) -> list[int]:
        """Requests with a NaN or infinite logit in one of their rows. One sum per row finds the
        candidates (a NaN or an infinity makes it non-finite); those rows are then checked whole,
        since huge finite logits could also sum past float32's range."""
        sums = logits.sum(dim=-1)
        if bool(torch.isfinite(sums).all()):
            return []
        suspects = torch.nonzero(~torch.isfinite(sums)).flatten()
        really = ~torch.isfinite(logits.index_select(0, suspects)).all(dim=-1)
        bad = set(suspects[really].tolist())
        return [rid for rid, members in rows.items() if any(row in bad for _, row in members)]

    def _abort_request(self, req: _Request, members: list[tuple[Sequence, int]]) -> None:
        """Finish every sequence of ``req`` with ``"abort"``: its logits this step were not finite,
        so no token can be chosen (argmax of NaN would be token 0). Other requests go on."""
        seq = members[0][0]
        error = (f"request_id={req.group.request_id}: the model's logits hold NaN or inf at output position "
                 f"{len(seq) - seq.num_prompt_tokens} ({len(seq)} tokens in context); a weight or an activation "
                 f"is not finite (NaN/inf logits), so the request was aborted")
        for s in req.group.unfinished_seqs():
            self.scheduler.finish_seq(s, "abort")
        self._complete(req, error=error)

    # ------------------------------------------------------------------ sampling and updates
    def _sample_all(self, rows: dict[int, list[tuple[Sequence, int]]], logits: torch.Tensor) -> None:
        picks: list[tuple[Sequence, _Request]] = []
        pick_rows: list[int] = []
        for rid, members in rows.items():
            req = self._requests[rid]
            if req.beam is not None:
                self._beam_step(req, members, logits)
                continue
            if not req.forked:
                req.forked = True
                parent, row = members[0]
                for i in range(1, req.params.n):
                    members.append((self._fork(req, parent, i), row))
            for seq, row in members:
                picks.append((seq, req))
                pick_rows.append(row)
        if not picks:
            return
        if pick_rows == list(range(logits.shape[0])):  # the usual step: every row samples once
            chosen = logits
        else:
            chosen = logits.index_select(0, torch.tensor(pick_rows, device=logits.device))
        tokens, logprobs = sample(chosen, [r.params for _, r in picks],
                                  [r.generators.get(s.seq_id) for s, r in picks], self.generator)
        touched: dict[int, _Request] = {}
        for (seq, req), tok, lp in zip(picks, tokens, logprobs):
            seq.append_token(tok, lp)
            reason = self._finish_reason(seq, req.params)
            if reason:
                self.scheduler.finish_seq(seq, reason)
            touched[req.group.request_id] = req
        for req in touched.values():
            if req.group.is_finished():
                self._complete(req)

    def _finish_reason(self, seq: Sequence, params: SamplingParams) -> str | None:
        tok = seq.token_ids[-1]
        if tok in params.stop_token_ids or (not params.ignore_eos and tok in self.config.eos_token_ids):
            return "stop"
        if self._at_length_limit(seq, params):
            return "length"
        return None

    def _at_length_limit(self, seq: Sequence, params: SamplingParams) -> bool:
        return len(seq) - seq.num_prompt_tokens >= params.max_tokens or len(seq) >= self.max_len

    def _beam_step(self, req: _Request, members: list[tuple[Sequence, int]], logits: torch.Tensor) -> None:
        beams = [s for s, _ in members]
        row_idx = torch.tensor([r for _, r in members], device=logits.device)
        logprobs = torch.log_softmax(logits.index_select(0, row_idx), dim=-1)
        plan = req.beam.step([s.output_token_ids for s in beams], [s.cumulative_logprob for s in beams], logprobs)
        for i in plan.prune:
            self._drop_beam(req, beams[i])
        # forks first (children copy the parent's state before this step's token), appends second
        used: set[int] = set()
        assigned: list[tuple[Sequence, int, float]] = []
        for parent_idx, tok, lp in plan.extend:
            seq = beams[parent_idx]
            if parent_idx in used:
                seq = self._fork(req, seq)
            used.add(parent_idx)
            assigned.append((seq, tok, lp))
        live = []
        for seq, tok, lp in assigned:
            seq.append_token(tok, lp)
            if self._at_length_limit(seq, req.params):
                req.beam.finish_live(seq.output_token_ids, seq.cumulative_logprob, "length")
                self._drop_beam(req, seq)
            else:
                live.append(seq)
        if req.beam.is_done(max((s.cumulative_logprob for s in live), default=None)):
            for seq in live:
                self._drop_beam(req, seq)
        if req.group.is_finished():
            self._complete(req)

    def _fork(self, req: _Request, parent: Sequence, index: int = 0) -> Sequence:
        """A child sharing all of ``parent``'s blocks, added to the request's group."""
        child = parent.fork(next(self._seq_ids))
        self.kv.fork(parent, child)
        req.group.seqs.append(child)
        self._register_seq(req, child, index)
        return child

    def _drop_beam(self, req: _Request, seq: Sequence) -> None:
        """Free a pruned or finished beam and remove it from the group."""
        self.scheduler.finish_seq(seq, "stop")
        req.group.seqs.remove(seq)
        del self._seq_req[seq.seq_id]

    def _complete(self, req: _Request, error: str | None = None) -> None:
        prompt = req.prompt_token_ids
        for seq in req.group.seqs:
            self._seq_req.pop(seq.seq_id, None)
        if req.beam is not None:
            for seq in req.group.seqs:  # beams still in the group were aborted by the scheduler
                req.beam.finish_live(seq.output_token_ids, seq.cumulative_logprob, seq.finish_reason or "abort")
            comps = [(h.token_ids, h.cumulative_logprob, h.finish_reason) for h in req.beam.best()]
        else:
            ordered = sorted(req.group.seqs, key=lambda s: req.index[s.seq_id])
            comps = [(s.output_token_ids, s.cumulative_logprob, s.finish_reason or "abort") for s in ordered]
        self._finished.append(FinishedRequest(req.group.request_id, prompt, comps, error))
        del self._requests[req.group.request_id]

