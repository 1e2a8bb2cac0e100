"""Request and sequence state: token ids, status and the block table (pure Python, no torch).

A :class:`Sequence` is one token stream (one sample of a request, or one beam). A
:class:`SequenceGroup` is one request: its ``n`` samples or its beams. The memory manager
(:mod:`runtime.kv_manager`) fills ``Sequence.block_table``; the engine appends tokens and keeps
``num_computed_tokens`` up to date after each forward pass.
"""

from __future__ import annotations

import enum


class SequenceStatus(enum.Enum):
    """Life cycle of a sequence: waiting for admission, running (has blocks), finished."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


FINISH_REASONS = ("stop", "length", "abort")
"""``stop``: EOS or a stop token; ``length``: ``max_tokens`` or the context limit; ``abort``: the
KV pool can never hold the request (see :mod:`runtime.scheduler`)."""


def _check_token_ids(name: str, token_ids) -> list[int]:
    ids = list(token_ids)
    for t in ids:
        if not isinstance(t, int) or isinstance(t, bool) or t < 0:
            raise ValueError(f"{name} must hold non-negative ints, got {t!r}")
    return ids


class Sequence:
    """One token stream: the prompt followed by the generated tokens.

    Parameters
    ----------
    seq_id : int
        Unique id, from a counter owned by the caller (engine).
    prompt_token_ids : list[int]
        The prompt, non-empty; never changes.

    Attributes
    ----------
    token_ids : list[int]
        Prompt + generated tokens; grows by :meth:`append_token`.
    block_table : list[int]
        Physical block ids in logical order; set by :class:`runtime.kv_manager.KVCacheManager`.
    num_cached_tokens : int
        Prefix tokens whose KV was found in the prefix cache when the sequence was allocated;
        the prefill only needs to run over ``token_ids[num_cached_tokens:]``.
    num_computed_tokens : int
        Tokens whose KV is in the cache; the engine advances it after each forward pass by the
        tokens it ran (``len(seq) - 1`` once a token has been sampled after them).
    num_scheduled_tokens : int
        Tokens the current step runs for this sequence, from position ``num_computed_tokens``:
        1 for a decode, a chunk of the prefill otherwise (set by the scheduler).
    cumulative_logprob : float
        Sum of the log probabilities passed to :meth:`append_token`.
    status : SequenceStatus
    finish_reason : str or None
        One of ``FINISH_REASONS``, or ``None`` while unfinished.
    """

    def __init__(self, seq_id: int, prompt_token_ids) -> None:
        if not isinstance(seq_id, int) or seq_id < 0:
            raise ValueError(f"seq_id must be a non-negative int, got {seq_id!r}")
        prompt = _check_token_ids("prompt_token_ids", prompt_token_ids)
        if not prompt:
            raise ValueError("prompt_token_ids must not be empty, got []")
        self.seq_id = seq_id
        self.prompt_token_ids: list[int] = prompt  # never mutated
        self.token_ids: list[int] = list(prompt)
        self.block_table: list[int] = []
        self.num_cached_tokens = 0
        self.num_computed_tokens = 0
        self.num_scheduled_tokens = 0
        self.cumulative_logprob = 0.0
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        """The generated part of ``token_ids``."""
        return self.token_ids[len(self.prompt_token_ids):]

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens whose KV is not computed yet: 1 for a decoding sequence, more while its
        prefill (possibly chunked over several steps) is under way."""
        return len(self.token_ids) - self.num_computed_tokens

    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int, logprob: float = 0.0) -> None:
        """Append one generated token and add its log probability to ``cumulative_logprob``."""
        if not isinstance(token_id, int) or isinstance(token_id, bool) or token_id < 0:
            raise ValueError(f"token_id must be a non-negative int, got {token_id!r}")
        if self.is_finished():
            raise ValueError(f"cannot append token_id={token_id} to finished seq_id={self.seq_id}")
        self.token_ids.append(token_id)
        self.cumulative_logprob += float(logprob)

    def fork(self, new_seq_id: int) -> "Sequence":
        """A copy with a new id: same tokens, logprob, status and computed counts, no blocks.

        Pass the result to ``KVCacheManager.fork(parent, child)`` to share the parent's blocks.
        """
        child = Sequence(new_seq_id, self.prompt_token_ids)
        child.token_ids = list(self.token_ids)
        child.num_cached_tokens = self.num_cached_tokens
        child.num_computed_tokens = self.num_computed_tokens
        child.cumulative_logprob = self.cumulative_logprob
        child.status = self.status
        return child

    def reset_for_recompute(self) -> None:
        """Forget all KV state (after preemption): the next admission prefills every token."""
        self.block_table = []
        self.num_cached_tokens = 0
        self.num_computed_tokens = 0
        self.num_scheduled_tokens = 0
        self.status = SequenceStatus.WAITING

    def __repr__(self) -> str:
        return (f"Sequence(seq_id={self.seq_id}, len={len(self)}, prompt={self.num_prompt_tokens}, "
                f"status={self.status.name}, blocks={self.block_table})")


class SequenceGroup:
    """One request: its ``n`` parallel samples or its beams.

    Parameters
    ----------
    request_id : int
        Unique request id.
    seqs : list[Sequence]
        The request's sequences (for ``n > 1`` the engine usually starts with one and forks the
        others after the prefill, so the prompt blocks are shared). The engine may append forked
        beams and drop pruned ones; the scheduler only looks at :meth:`unfinished_seqs`.
    sampling_params : object
        Opaque to the memory manager.
    arrival : int
        Order of admission requests; lower is older. ``None`` means "set by ``Scheduler.add``".

    Attributes
    ----------
    error : str or None
        Why the scheduler aborted the request (it can never fit the KV pool), else None.
    """

    def __init__(self, request_id: int, seqs, sampling_params=None, arrival: int | None = None) -> None:
        seqs = list(seqs)
        if not seqs:
            raise ValueError(f"request_id={request_id}: seqs must not be empty")
        ids = [s.seq_id for s in seqs]
        if len(set(ids)) != len(ids):
            raise ValueError(f"request_id={request_id}: duplicate seq ids {ids}")
        self.request_id = request_id
        self.seqs: list[Sequence] = seqs
        self.sampling_params = sampling_params
        self.arrival = arrival
        self.error: str | None = None

    def unfinished_seqs(self) -> list[Sequence]:
        return [s for s in self.seqs if not s.is_finished()]

    def is_finished(self) -> bool:
        return all(s.is_finished() for s in self.seqs)

    def __repr__(self) -> str:
        return f"SequenceGroup(request_id={self.request_id}, arrival={self.arrival}, seqs={self.seqs})"
