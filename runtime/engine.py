"""The step loop: schedule -> block copies -> batch tensors -> forward -> sample -> update.

One :meth:`Engine.step` runs every scheduled sequence in ONE forward: the prefill tokens of newly
admitted sequences followed by one decode token per running sequence. Batch tensors (token ids,
positions, slot mapping, block tables, sequence lengths) are built once per step; all logits are
sampled in one batched call; copy-on-write block copies are one indexed copy over all layers.

Sharing: an ``n > 1`` request starts as one sequence; after its prefill the other ``n - 1`` are
forked from it (``KVCacheManager.fork``), so the prompt's blocks are shared. Beam search forks and
prunes beams each step (:mod:`runtime.beam`).
"""

from __future__ import annotations

import itertools

import torch

from runtime.attention import make_decode_backend
from runtime.batch import build_batch
from runtime.beam import BeamSearch
from runtime.cuda_graphs import DecodeGraphs, scratch_blocks
from runtime.kv_cache import check_calculate_kv_scales, parse_kv_cache_dtype
from runtime.kv_manager import KVCacheManager
from runtime.loader import LoadedModel
from runtime.native_build import native_info
from runtime.pool_memory import check_engine_pool
from runtime.sampling import SamplingParams, check_seed
from runtime.scheduler import Scheduler
from runtime.engine_requests import FinishedRequest, RequestBook, _Request  # noqa: F401 - re-exported
from runtime.sequence import Sequence, SequenceGroup
from runtime.step_stats import StepMeter


class Engine(RequestBook):
    """Runs requests to completion over a paged KV cache.

    Parameters
    ----------
    model : LoadedModel
    num_blocks : int
        Physical KV blocks (each ``block_size`` tokens, all layers).
    block_size : int
        Tokens per block.
    max_num_seqs, max_num_batched_tokens : int
        Scheduler limits per step.
    backend : str
        Decode attention backend: ``auto``, ``native``, ``torch`` or ``triton``.
    enable_prefix_caching : bool
        Reuse cached prompt blocks across requests.
    seed : int or None
        Seed of the stream used by unseeded sampled requests.
    watermark : float
        Fraction of the pool that admission keeps free for running sequences to grow.
    kv_cache_dtype : str
        ``auto`` (the model's dtype), ``fp8_e4m3`` or ``fp8_e5m2`` (:mod:`runtime.kv_cache`).
    calculate_kv_scales : bool
        With an fp8 cache, set each layer's ``k_scale``/``v_scale`` from the first step's K/V
        (``amax / fp8 max``) instead of 1.0.
    cuda_graphs : bool or None
        Replay decode-only steps from CUDA graphs (:mod:`runtime.cuda_graphs`); None: on for
        CUDA with the triton backend, off elsewhere.

    A model whose every layer has the same sliding window (``config.sliding_window``) gets a
    memory manager that frees the blocks that slide out of it (``stats()["window_freed_blocks"]``);
    with mixed windows (Gemma 2) or none, every block is kept until its sequence finishes.
    """

    def __init__(self, model: LoadedModel, *, num_blocks: int, block_size: int = 16,
                 max_num_seqs: int = 256, max_num_batched_tokens: int = 8192, backend: str = "auto",
                 enable_prefix_caching: bool = True, seed: int | None = None, watermark: float = 0.01,
                 kv_cache_dtype: str = "auto", calculate_kv_scales: bool = False,
                 cuda_graphs: bool | None = None) -> None:
        check_seed("seed", seed)
        self.loaded, self.model, self.config = model, model.model, model.config
        self.device, self.block_size = self.model.device, block_size
        kv_cache_dtype = parse_kv_cache_dtype(kv_cache_dtype)
        calculate_kv_scales = check_calculate_kv_scales(calculate_kv_scales, kv_cache_dtype)
        check_engine_pool(self.model, num_blocks, block_size, kv_cache_dtype)  # before allocating any of it
        self.kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching=enable_prefix_caching,
                                 watermark=watermark, sliding_window=self.config.sliding_window)
        c = self.config
        self.backend = make_decode_backend(backend, block_size=block_size, num_heads=c.num_attention_heads,
                                           num_kv_heads=c.num_key_value_heads, head_dim=c.head_dim,
                                           dtype=self.model.dtype, device=self.device,
                                           layers=self.model.attention, kv_cache_dtype=kv_cache_dtype,
                                           num_blocks=num_blocks)
        # kgen's kernels read every prompt key back from the cache: a windowed prompt stores all
        self.scheduler = Scheduler(self.kv, max_num_seqs=max_num_seqs,
                                   max_num_batched_tokens=max_num_batched_tokens,
                                   store_whole_prompt=getattr(self.backend, "whole_batch", False))
        extra = scratch_blocks(cuda_graphs, device=self.device, backend=self.backend.name)  # 1 for graphs' padded rows
        self.kv_cache = self.model.make_kv_cache(num_blocks + extra, block_size, kv_cache_dtype)
        self.calibrate_kv = bool(calculate_kv_scales) and self.kv_cache.quantized
        self.max_len = c.max_position_embeddings  # the pool never caps a length: see the scheduler's aborts
        self.graphs = DecodeGraphs.for_engine(self, scratch_block=num_blocks) if extra else None
        self.generator = torch.Generator(device=self.device)
        if seed is not None:
            self.generator.manual_seed(seed)
        else:  # a fresh seed for this stream only (torch.seed() would reseed the global RNG)
            self.generator.seed()
        self._seq_ids = itertools.count()
        self._req_ids = itertools.count()
        self._requests: dict[int, _Request] = {}
        self._seq_req: dict[int, int] = {}  # seq_id -> request_id
        self._finished: list[FinishedRequest] = []
        self.meter = StepMeter(block_size)
        self.num_forward_tokens = 0
        self.num_partial_chunks = 0  # prefill chunks that stopped short of their prompt's end

    # ------------------------------------------------------------------ requests
    def add_request(self, prompt_token_ids: list[int], params: SamplingParams) -> int:
        """Queue one request; returns its id (ids count up from 0 in call order)."""
        rid = next(self._req_ids)
        seq = Sequence(next(self._seq_ids), prompt_token_ids)
        group = SequenceGroup(rid, [seq], sampling_params=params)
        req = _Request(group, params, seq.prompt_token_ids)
        if params.beam_width > 1:
            req.beam = BeamSearch(params, self.config.eos_token_ids, self.max_len)
        self._register_seq(req, seq, 0)
        self._requests[rid] = req
        self.scheduler.add(group)
        return rid

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def pop_finished(self) -> list[FinishedRequest]:
        done, self._finished = self._finished, []
        return done

    # ------------------------------------------------------------------ one step
    @torch.inference_mode()
    def step(self) -> int:
        """Run one scheduled step; returns how many requests finished in it."""
        out = self.scheduler.schedule()
        finished_before = len(self._finished)
        for group in out.aborted:
            self._complete(self._requests[group.request_id], error=group.error)
        if out.is_empty():
            if self.scheduler.has_unfinished() and not out.aborted and not out.preempted:
                raise RuntimeError("the scheduler could not run any sequence: the KV pool is too small")
            return len(out.aborted)
        if out.copies:
            self.kv_cache.copy_blocks([s for s, _ in out.copies], [d for _, d in out.copies])
        self.meter.record(self.kv)
        self.num_partial_chunks += sum(s.num_scheduled_tokens < s.num_uncomputed_tokens
                                       for s in out.prefill_seqs)
        logits, sampled = self.run_forward(out.prefill_seqs, out.decode_seqs)
        for seq in out.prefill_seqs + out.decode_seqs:
            seq.num_computed_tokens += seq.num_scheduled_tokens
        rows: dict[int, list[tuple[Sequence, int]]] = {}
        for row, seq in enumerate(sampled):  # a prefill chunk short of its end samples nothing
            rows.setdefault(self._seq_req[seq.seq_id], []).append((seq, row))
        for rid in self._nonfinite_requests(rows, logits):
            self._abort_request(self._requests[rid], rows.pop(rid))
        if rows:
            self._sample_all(rows, logits)
        self.scheduler.free_finished()
        return len(self._finished) - finished_before

    def run_forward(self, prefill: list[Sequence], decode: list[Sequence]) -> tuple[torch.Tensor, list[Sequence]]:
        """One forward over allocated sequences: ``prefill`` over their scheduled chunk
        (``num_scheduled_tokens`` tokens from ``num_computed_tokens``), ``decode`` one token each
        (their slots made by ``append_slot``).

        Returns
        -------
        (logits, sampled)
            float32 logits ``[len(sampled), vocab]``: the next-token logits of each sequence in
            ``sampled``, those whose tokens this forward completes (every decode, and each
            prefill whose chunk reaches its last token), prefills first.
        """
        dev = self.device
        whole = getattr(self.backend, "whole_batch", False)
        batch = build_batch(self.kv, prefill, decode, dev, varlen=whole)
        self.num_forward_tokens += len(batch.ids)
        if decode and not prefill and self.graphs is not None:  # a decode-only step: replay its CUDA graph
            logits = self.graphs.replay(batch.ids, batch.positions, batch.slots, batch.tables, batch.lens)
            if logits is not None:
                return logits, batch.sampled
        if decode or whole:
            self.backend.prepare(batch.meta)
        calibrate, self.calibrate_kv = self.calibrate_kv, False  # the first step's K/V set fp8 scales
        logits = self.model.forward(torch.tensor(batch.ids, dtype=torch.int64, device=dev),
                                    torch.tensor(batch.positions, dtype=torch.int64, device=dev), self.kv_cache,
                                    batch.meta, self.backend,
                                    torch.tensor(batch.last_rows, dtype=torch.int64, device=dev),
                                    calibrate_kv=calibrate)
        return logits, batch.sampled

    # ------------------------------------------------------------------ stats
    def stats(self) -> dict:
        """Memory-manager counters plus the step meter's sharing and utilization figures
        (:meth:`runtime.step_stats.StepMeter.summary`)."""
        s = self.scheduler.stats()
        s.update(self.meter.summary(s["peak_blocks_in_use"]))
        s.update(kv_cache_bytes=self.kv_cache.nbytes, kv_cache_dtype=self.kv_cache.kv_cache_dtype,
                 k_scales=list(self.kv_cache.k_scales), v_scales=list(self.kv_cache.v_scales),
                 forward_tokens=self.num_forward_tokens, backend=self.backend.name,
                 partial_prefill_chunks=self.num_partial_chunks)
        if self.device.type == "cpu":
            s["cpu_path"] = self.cpu_path()
        return s

    def cpu_path(self) -> dict:
        """Which CPU code ran: the decode kernel, the projections, the elementwise ops and the
        instruction set the native library was built for (None without it)."""
        info = native_info()
        path = self.model.cpu_path()
        path.update(decode=getattr(self.backend, "kernel", f"{self.backend.name} backend"),
                    isa=None if info is None else info["isa"],
                    bf16_dot=bool(info and info["bf16_dot"] and self.backend.name == "native"
                                  and self.model.dtype == torch.bfloat16))
        return path

