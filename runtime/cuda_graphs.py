"""CUDA-graph capture of decode-only engine steps.

A decode step of a small batch spends most of its time launching kernels from Python (a few per
layer, plus kgen's launcher), not running them. As vLLM does, the engine can capture the whole
decode forward (embedding -> layers -> logits) in a CUDA graph per padded batch size and replay
it each step:

- Batch sizes are padded up to the next captured size (``1, 2, 4`` and multiples of 8 up to
  ``max_batch``); a larger batch, or a step with prefill tokens, runs eagerly.
- Inputs live in static buffers (:class:`StaticDecodeInputs`) sized for the largest batch and the
  longest context (``max_blocks`` table columns); each step copies its rows in. Padded rows are
  one-token sequences living in a *scratch block* the engine allocates past the pool
  (``num_blocks`` in the cache, never handed out): they write their K/V there and read it back,
  so they never touch a real sequence's cache.
- kgen's kernel runs with the step's bounds fixed at capture: ``max_query_len=1`` and
  ``max_seq_len`` = the table's capacity. kgen's contract makes the launches (kernels, grids, every
  non-tensor argument) depend only on tensor shapes and those bounds, with no read of a tensor back
  to the host (tested with a launch recorder); the split plan and the partition bounds come from
  ``seq_lens`` on the device, so one graph serves every step as the contexts grow. The variant for
  a padded size is chosen from the database at capture (``backend.prepare``) and stays.
- A size is captured on its first use (a warm-up run, then the capture), all sizes sharing one
  memory pool. Steps replay one graph at a time and read its logits before the next replay.

Enabled by ``Engine(cuda_graphs=None | True | False)``: ``None`` (default) captures on CUDA with
the triton backend and nowhere else. The torch backend builds its gather indices on the host from
the lengths each step, so it cannot be replayed.

Everything except the capture itself is plain torch and runs (and is tested) on the CPU; the
capture function is a module global (:func:`capture_graph`) a test may replace with an eager
stand-in.
"""

from __future__ import annotations

import torch

from runtime import kv_layout
from runtime.attention_meta import AttentionMetadata, VarlenBatch

DEFAULT_MAX_BATCH = 64  # past this a decode step is compute-bound: launches no longer dominate


def capture_sizes(max_batch: int) -> tuple[int, ...]:
    """The padded batch sizes captured: 1, 2, 4, then multiples of 8 up to ``max_batch``."""
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise ValueError(f"max_batch={max_batch!r} must be a positive int")
    sizes = [s for s in (1, 2, 4) if s <= max_batch] + list(range(8, max_batch + 1, 8))
    if sizes[-1] != max_batch:
        sizes.append(max_batch)
    return tuple(sizes)


def padded_size(sizes: tuple[int, ...], num_seqs: int) -> int | None:
    """The smallest captured size holding ``num_seqs`` rows, or None when none does."""
    return next((s for s in sizes if s >= num_seqs), None)


def graphs_wanted(option, *, device: torch.device, backend: str) -> bool:
    """Whether decode steps are captured: ``option`` None means CUDA with the triton backend.

    Raises
    ------
    ValueError
        ``option`` is not None/True/False, or True where graphs cannot run (no CUDA device, or a
        backend other than triton), naming the value.
    """
    if option is None:
        return device.type == "cuda" and backend == "triton"
    if not isinstance(option, bool):
        raise ValueError(f"cuda_graphs={option!r} must be None (auto), True or False")
    if option and device.type != "cuda":
        raise ValueError(f"cuda_graphs=True needs a CUDA device; the model is on {device}")
    if option and backend != "triton":
        raise ValueError(f"cuda_graphs=True needs backend='triton' (the {backend!r} backend plans "
                         "its gathers on the host each step, which a graph cannot replay)")
    return option


def scratch_blocks(option, *, device: torch.device, backend: str) -> int:
    """KV blocks to allocate past the pool: 1 (padded rows write there) when graphs are wanted."""
    return 1 if graphs_wanted(option, device=device, backend=backend) else 0


class StaticDecodeInputs:
    """The buffers a captured decode step reads, for up to ``max_batch`` rows.

    Parameters
    ----------
    max_batch : int
        Rows of the largest captured size.
    max_blocks : int
        Block-table columns (the longest context in blocks).
    block_size : int
        Tokens per block.
    scratch_slot : int
        Cache slot padded rows write their K/V to (the first slot of the scratch block).
    device : torch.device
    """

    def __init__(self, max_batch: int, max_blocks: int, block_size: int, scratch_slot: int,
                 device) -> None:
        if max_blocks < 1:
            raise ValueError(f"max_blocks={max_blocks!r} must be >= 1")
        self.max_batch, self.max_blocks, self.scratch_slot = max_batch, max_blocks, scratch_slot
        self.block_size = block_size
        kw = dict(device=device)
        self.token_ids = torch.zeros(max_batch, dtype=torch.int64, **kw)        # [B]
        self.positions = torch.zeros(max_batch, dtype=torch.int64, **kw)        # [B]
        self.slot_mapping = torch.full((max_batch,), scratch_slot, dtype=torch.int64, **kw)  # [B]
        self.block_tables = torch.zeros(max_batch, max_blocks, dtype=torch.int32, **kw)  # [B, W]
        self.seq_lens = torch.zeros(max_batch, dtype=torch.int32, **kw)         # [B]
        self.rows = torch.arange(max_batch, dtype=torch.int64, **kw)            # logits rows
        self.query_start_loc = torch.arange(max_batch + 1, dtype=torch.int32, **kw)  # [B + 1]: a row each

    def fill(self, size: int, token_ids, positions, slots, tables, seq_lens) -> None:
        """Copy one step's ``n`` rows in and pad rows ``n..size``; the buffers stay the same.

        ``tables`` is a list of block-id lists (any widths up to ``max_blocks``) or an int
        tensor ``[n, width]``; the other inputs are sequences or tensors of ``n`` values.
        """
        n = len(token_ids)
        if not 0 < n <= size <= self.max_batch:
            raise ValueError(f"{n} rows do not fit a padded size of {size} (max {self.max_batch})")
        table = torch.as_tensor(tables, dtype=torch.int32) if not isinstance(tables, torch.Tensor) \
            else tables.to(torch.int32)
        if table.dim() != 2 or table.shape[0] != n or table.shape[1] > self.max_blocks:
            raise ValueError(f"block tables of shape {tuple(table.shape)} do not fit "
                             f"[{n}, <= {self.max_blocks}]")
        for buf, values in ((self.token_ids, token_ids), (self.positions, positions),
                            (self.slot_mapping, slots), (self.seq_lens, seq_lens)):
            buf[:n].copy_(torch.as_tensor(values, dtype=buf.dtype), non_blocking=True)
        self.block_tables[:n, :table.shape[1]].copy_(table, non_blocking=True)
        if size > n:  # padded rows: token 0 at position 0, its K/V in the scratch slot and its one
            self.token_ids[n:size].zero_()  # key read from there (a valid one-token sequence)
            self.positions[n:size].zero_()
            self.seq_lens[n:size].fill_(1)
            self.block_tables[n:size].fill_(self.scratch_slot // self.block_size)
            self.slot_mapping[n:size].fill_(self.scratch_slot)

    def metadata(self, size: int) -> AttentionMetadata:
        """Decode metadata over views of the first ``size`` rows (what the graph reads): one query
        row per sequence, the bounds fixed at 1 and the table's capacity (the kernel is chosen
        for them, and its launches depend on nothing else)."""
        capacity = self.max_blocks * self.block_size
        meta = AttentionMetadata(slot_mapping=self.slot_mapping[:size], prefills=[],
                                 num_prefill_tokens=0, block_tables=self.block_tables[:size],
                                 seq_lens=self.seq_lens[:size], max_seq_len=capacity)
        meta.varlen = VarlenBatch(self.query_start_loc[:size + 1], self.seq_lens[:size],
                                  self.block_tables[:size], max_query_len=1, max_seq_len=capacity)
        return meta


def capture_graph(fn, pool=None, warmup: int = 2):
    """Capture ``fn()`` in a CUDA graph after ``warmup`` eager runs; returns (replay, output).

    The warm-up (on a side stream, as torch requires) compiles kernels and settles allocator
    pools. Two runs: kgen's launcher learns the device's occupancy on its first launch and may
    plan differently (new merge shapes to compile) on the second, and nothing may compile during
    the capture. The runs compute what the replays will, so the state they write (the K/V of the
    step's tokens) is written again, identically, by the replay.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    return graph.replay, out


class DecodeGraphs:
    """Captured decode steps of one engine (see the module docstring).

    Parameters
    ----------
    model : runtime.model.decoder.DecoderModel
    kv_cache : torch.Tensor
        The engine's cache ``[layers, 2, num_blocks + 1, block_size, kv_heads, head_dim]``.
    backend : runtime.attention_triton.TritonAttention
    block_size, max_blocks : int
        Tokens per block; table columns (the longest context in blocks).
    scratch_block : int
        The block past the pool that padded rows write to.
    max_batch : int
        Largest captured batch.
    """

    def __init__(self, model, kv_cache, backend, *, block_size: int, max_blocks: int,
                 scratch_block: int, max_batch: int = DEFAULT_MAX_BATCH) -> None:
        self.model, self.kv_cache, self.backend = model, kv_cache, backend
        self.sizes = capture_sizes(max_batch)
        self.inputs = StaticDecodeInputs(self.sizes[-1], max_blocks, block_size,
                                         scratch_block * block_size, kv_cache.device)
        self._graphs: dict[int, tuple] = {}  # size -> (replay, logits, meta)
        self._pool = None
        self.replays = 0

    @classmethod
    def for_engine(cls, engine, scratch_block: int, max_batch: int = DEFAULT_MAX_BATCH):
        """The runner of an :class:`runtime.engine.Engine` (its model, cache, backend, limits)."""
        max_blocks = kv_layout.blocks_for_tokens(engine.max_len, engine.block_size)
        return cls(engine.model, engine.kv_cache, engine.backend, block_size=engine.block_size,
                   max_blocks=max_blocks, scratch_block=scratch_block,
                   max_batch=min(max_batch, engine.scheduler.max_num_seqs))

    @property
    def captured(self) -> tuple[int, ...]:
        return tuple(sorted(self._graphs))

    def _forward(self, size: int, meta: AttentionMetadata):
        s = self.inputs
        return self.model.forward(s.token_ids[:size], s.positions[:size], self.kv_cache, meta,
                                  self.backend, s.rows[:size])

    def _capture(self, size: int) -> tuple:
        meta = self.inputs.metadata(size)
        self.backend.prepare(meta)  # the kernels for (size, full context): chosen once
        if self._pool is None and self.kv_cache.device.type == "cuda":
            self._pool = torch.cuda.graph_pool_handle()
        replay, logits = capture_graph(lambda: self._forward(size, meta), self._pool)
        return replay, logits, meta

    def replay(self, token_ids, positions, slots, tables, seq_lens) -> torch.Tensor | None:
        """Logits ``[n, vocab]`` (float32) of one decode-only step, or None when no captured size
        fits it (the caller then runs it eagerly). Captures the padded size on its first use."""
        size = padded_size(self.sizes, len(token_ids))
        width = max((len(t) for t in tables), default=0)
        if size is None or width > self.inputs.max_blocks:
            return None
        self.inputs.fill(size, token_ids, positions, slots, tables, seq_lens)
        entry = self._graphs.get(size)
        if entry is None:
            entry = self._graphs[size] = self._capture(size)
        replay, logits, _ = entry
        out = replay()
        self.replays += 1
        if out is None:  # a CUDA graph replays into its captured output tensor
            out = logits
        return out[: len(token_ids)].clone()
