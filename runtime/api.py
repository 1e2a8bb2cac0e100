"""The public face: ``generate()``, ``SamplingParams``, ``RequestOutput`` and ``CompletionOutput``."""

from __future__ import annotations

import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from runtime import kv_layout
from runtime.attention import default_block_size
from runtime.config import parse_dtype
from runtime.engine import Engine
from runtime.kv_cache import check_calculate_kv_scales, parse_kv_cache_dtype
from runtime.loader import LoadedModel, load_model, parse_device
from runtime.pool_memory import check_pool_fits
from runtime.sampling import SamplingParams, check_seed, check_token_ids
from runtime.threads import torch_threads, wait_policy

__all__ = ["generate", "SamplingParams", "RequestOutput", "CompletionOutput", "GenerateOutputs"]

DEFAULT_KV_CACHE_BYTES = {"cpu": 1 << 30, "cuda": 8 << 30}
WATERMARK = 0.01  # fraction of the pool that admission keeps free (KVCacheManager's default)


@dataclass
class CompletionOutput:
    """One completion (a sample or a beam) of a request."""

    index: int
    text: str | None
    token_ids: list[int]
    cumulative_logprob: float
    finish_reason: str  # "stop" | "length" | "abort" (the KV pool can never hold the request)


@dataclass
class RequestOutput:
    """A request's prompt and its completions (``n`` samples or ``beam_width`` beams, best first);
    ``error`` says why it was aborted (its completions end with ``"abort"``), else None."""

    request_id: int
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = True
    error: str | None = None


class GenerateOutputs(list):
    """The list of :class:`RequestOutput` in input order, with the run's ``stats`` dict."""

    stats: dict


def _as_model(model, dtype, device) -> LoadedModel:
    if isinstance(model, LoadedModel):
        if dtype is not None and parse_dtype(dtype) != model.dtype:
            raise ValueError(f"dtype={dtype!r} differs from the loaded model's {model.dtype}; "
                             f"pass the model folder or load it with that dtype")
        if device is not None and parse_device(device).type != model.device.type:
            raise ValueError(f"device={device!r} differs from the loaded model's {model.device}")
        return model
    if isinstance(model, (str, Path)):
        return load_model(model, dtype=dtype, device=device)
    raise ValueError(f"model={model!r} must be a folder path or a runtime.LoadedModel")


def _tokenize(prompts, loaded: LoadedModel) -> list[list[int]]:
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, (list, tuple)):
        raise ValueError(f"prompts must be a list of strings or token-id lists, got {type(prompts).__name__}")
    vocab = loaded.config.vocab_size
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if loaded.tokenizer is None:
                why = loaded.tokenizer_error or "the model has no tokenizer.json"
                raise ValueError(f"prompts[{i}] is text but {why}; pass token ids")
            ids = loaded.tokenizer.encode(p).ids
        elif isinstance(p, (list, tuple)):
            ids = list(p)
            check_token_ids(f"prompts[{i}]", ids, vocab)
        else:
            raise ValueError(f"prompts[{i}]={p!r} must be a string or a list of token ids")
        if not ids:
            raise ValueError(f"prompts[{i}] is empty; a prompt needs at least one token")
        out.append(ids)
    return out


def _params_list(sampling_params, n: int) -> list[SamplingParams]:
    if sampling_params is None:
        return [SamplingParams()] * n
    if isinstance(sampling_params, SamplingParams):
        return [sampling_params] * n
    params = list(sampling_params)
    if len(params) != n or not all(isinstance(p, SamplingParams) for p in params):
        raise ValueError(f"sampling_params must be one SamplingParams or a list of {n} (one per prompt), "
                         f"got {len(params)} items")
    return params


def _check_stops(params: list[SamplingParams], vocab: int) -> None:
    """A stop token the model cannot produce would never stop anything: refused by name."""
    for i, p in enumerate(params):
        check_token_ids("stop_token_ids" if len(set(params)) == 1 else f"sampling_params[{i}].stop_token_ids",
                        p.stop_token_ids, vocab)


def _pool(loaded: LoadedModel, ids, params, block_size, num_blocks, kv_cache_bytes, kv_cache_dtype) -> int:
    """The KV pool size in blocks; raises ValueError when a request can never fit it."""
    if num_blocks is not None and kv_cache_bytes is not None:
        raise ValueError(f"num_blocks={num_blocks!r} and kv_cache_bytes={kv_cache_bytes!r}: give one")
    per_block = loaded.model.bytes_per_block(block_size, kv_cache_dtype)
    max_pos = loaded.config.max_position_embeddings
    window = loaded.config.sliding_window
    peaks = [kv_layout.request_peak_blocks(len(t), p.max_tokens, block_size, num_seqs=p.num_outputs,
                                           max_len=max_pos, window=window) for t, p in zip(ids, params)]
    if kv_cache_bytes is not None:
        if isinstance(kv_cache_bytes, bool) or not isinstance(kv_cache_bytes, int) or kv_cache_bytes < per_block:
            raise ValueError(f"kv_cache_bytes={kv_cache_bytes!r} must be an int >= one block ({per_block} bytes)")
        blocks = kv_cache_bytes // per_block
    elif num_blocks is not None:
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks={num_blocks!r} must be a positive int")
        blocks = num_blocks
    else:  # every request at its peak at once, capped by the default cache bytes
        cap = DEFAULT_KV_CACHE_BYTES.get(loaded.device.type, 1 << 30) // per_block
        blocks = max(1, min(sum(peaks) + 8, cap))
    given = (f"kv_cache_bytes={kv_cache_bytes}, " if kv_cache_bytes is not None
             else f"num_blocks={num_blocks}, " if num_blocks is not None else "") + f"block_size={block_size}"
    check_pool_fits(blocks, block_size, per_block, loaded.device, given=given)
    usable = blocks - kv_layout.watermark_blocks(blocks, WATERMARK)  # what admission may hand out
    for i, (t, p, peak) in enumerate(zip(ids, params, peaks)):
        if len(t) >= max_pos:
            raise ValueError(f"prompts[{i}] has {len(t)} tokens; the model's context "
                             f"(max_position_embeddings={max_pos}) leaves no room to generate")
        admit = kv_layout.request_peak_blocks(len(t), 1, block_size, max_len=max_pos, window=window)
        if peak > blocks or admit > usable:
            seqs = f" x {p.num_outputs} sequences" if p.num_outputs > 1 else ""
            raise ValueError(f"prompts[{i}] (request {i}: {len(t)} prompt tokens + max_tokens={p.max_tokens}{seqs}) "
                             f"needs up to {peak} KV blocks of {block_size} ({admit} to admit its prompt); "
                             f"the KV pool has num_blocks={blocks} ({usable} usable for admission); "
                             f"give a larger num_blocks/kv_cache_bytes or a smaller max_tokens")
    return blocks


def generate(model, prompts, sampling_params=None, *, block_size: int | None = None, num_blocks: int | None = None,
             kv_cache_bytes: int | None = None, max_num_seqs: int = 256,
             max_num_batched_tokens: int | None = None, backend: str = "auto", dtype=None, device=None,
             enable_prefix_caching: bool = True, seed: int | None = None, kv_cache_dtype: str = "auto",
             calculate_kv_scales: bool = False, num_threads: int | None = None, use_tqdm: bool | None = None,
             return_stats: bool = False, cuda_graphs: bool | None = None):
    """Generate completions for a batch of prompts with paged attention and continuous batching.

    Parameters
    ----------
    model : str, Path or LoadedModel
        A local Hugging Face folder of a supported family (Llama, Mistral, Qwen2, Qwen3, Gemma 2),
        or a model from :func:`runtime.load_model`.
    prompts : list of str or list of list[int]
        Text (needs ``tokenizer.json``) or token ids; each non-empty and shorter than the context.
    sampling_params : SamplingParams or list[SamplingParams], optional
        One for all prompts or one per prompt (default: greedy, 16 tokens).
    block_size : int, optional
        Tokens per KV block. Default: with the triton backend, the block size the tuning
        database recorded as fastest for this GPU, dtype and head dim; otherwise 16.
    num_blocks, kv_cache_bytes : int, optional
        Size of the KV pool (give at most one); default: enough for every request at once,
        capped at 1 GiB on the CPU and 8 GiB on a GPU. A request that could never fit the pool
        (its prompt, or its generation at ``max_tokens`` with all its samples or beams, see
        :func:`runtime.kv_layout.request_peak_blocks`) is a ValueError naming it and the blocks
        it needs, before anything runs.
    max_num_seqs, max_num_batched_tokens : int, optional
        Scheduler limits per step.
    backend : str
        ``auto`` (triton on CUDA; on the CPU the native C kernel for float32, bfloat16 and
        float16 models where it builds, else torch), ``native``, ``torch`` or ``triton``
        (:mod:`runtime.attention`). On the CPU ``stats["cpu_path"]`` says what ran: the decode
        kernel, the projections (oneDNN packed or ``F.linear``), the elementwise ops and the
        instruction set (e.g. ``avx512_bf16``).
    dtype, device : optional
        Compute dtype (fp32, fp16, bf16) and device when ``model`` is a folder.
    enable_prefix_caching : bool
        Reuse KV blocks of identical prompt prefixes.
    cuda_graphs : bool, optional
        Replay decode-only steps from CUDA graphs; default: on for CUDA with the triton backend.
    seed : int, optional
        Seed for sampled requests without their own seed.
    kv_cache_dtype : str
        ``auto`` (the model's dtype), ``fp8_e4m3`` (alias ``fp8``) or ``fp8_e5m2``: the KV cache
        stored in fp8, one byte per value (:mod:`runtime.kv_cache`).
    calculate_kv_scales : bool
        With an fp8 cache, per-layer ``k_scale``/``v_scale`` from the first step's K/V
        (``amax / fp8 max``); otherwise 1.0.
    num_threads : int, optional
        torch intra-op threads while generating (restored on return); default: ``OMP_NUM_THREADS``
        when set, else the CPUs this process may run on (:func:`runtime.threads.default_num_threads`).
    use_tqdm : bool, optional
        Progress bar; default: on when stderr is a terminal and the call is long.
    return_stats : bool
        Also return the memory stats (they are always on ``result.stats``).

    Returns
    -------
    GenerateOutputs (a list of RequestOutput in input order), or ``(outputs, stats)``.
    """
    check_seed("seed", seed)
    kv_cache_dtype = parse_kv_cache_dtype(kv_cache_dtype)
    calculate_kv_scales = check_calculate_kv_scales(calculate_kv_scales, kv_cache_dtype)
    with torch_threads(num_threads) as threads:
        loaded = _as_model(model, dtype, device)
        ids = _tokenize(prompts, loaded)
        params = _params_list(sampling_params, len(ids))
        _check_stops(params, loaded.config.vocab_size)
        if block_size is None:
            block_size = default_block_size(backend, config=loaded.config, dtype=loaded.dtype,
                                            device=loaded.device, kv_cache_dtype=kv_cache_dtype)
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size={block_size!r} must be a positive int")
        blocks = _pool(loaded, ids, params, block_size, num_blocks, kv_cache_bytes, kv_cache_dtype)
        if max_num_batched_tokens is None:  # a bad max_num_seqs is left for the Scheduler to name
            max_num_batched_tokens = max(8192, max_num_seqs) if isinstance(max_num_seqs, int) else 8192
        engine = Engine(loaded, num_blocks=blocks, block_size=block_size, max_num_seqs=max_num_seqs,
                        max_num_batched_tokens=max_num_batched_tokens,
                        backend=backend, enable_prefix_caching=enable_prefix_caching, seed=seed,
                        watermark=WATERMARK, kv_cache_dtype=kv_cache_dtype, calculate_kv_scales=calculate_kv_scales,
                        cuda_graphs=cuda_graphs)
        outputs, stats = _run(engine, ids, params, prompts, loaded, use_tqdm)
    stats.update(num_threads=threads, omp_wait_policy=wait_policy())
    return (outputs, stats) if return_stats else outputs


def _run(engine: Engine, ids, params, prompts, loaded: LoadedModel, use_tqdm):
    for t, p in zip(ids, params):
        engine.add_request(t, p)
    if use_tqdm is None:
        use_tqdm = sys.stderr.isatty() and sum(p.max_tokens * p.num_outputs for p in params) >= 4096
    start = time.perf_counter()
    results = {}
    from tqdm import tqdm

    with tqdm(total=len(ids), desc="generate", unit="req", disable=not use_tqdm) as bar:
        while engine.has_unfinished():
            bar.update(engine.step())
            for done in engine.pop_finished():
                results[done.request_id] = done
    elapsed = time.perf_counter() - start
    outputs = GenerateOutputs(_to_output(results[rid], prompts[rid], loaded.tokenizer) for rid in range(len(ids)))
    stats = engine.stats()
    generated = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    stats.update(elapsed_s=elapsed, generated_tokens=generated,
                 tokens_per_s=generated / elapsed if elapsed > 0 else 0.0)
    outputs.stats = stats
    for out in outputs:
        if out.error:
            warnings.warn(f"aborted: {out.error}", RuntimeWarning, stacklevel=3)
    return outputs, stats


def _to_output(done, prompt, tokenizer) -> RequestOutput:
    def text(tokens):
        return tokenizer.decode(tokens, skip_special_tokens=True) if tokenizer is not None else None

    comps = [CompletionOutput(i, text(toks), list(toks), float(cum), reason)
             for i, (toks, cum, reason) in enumerate(done.completions)]
    return RequestOutput(done.request_id, prompt if isinstance(prompt, str) else None,
                         list(done.prompt_token_ids), comps, error=done.error)
