"""End-to-end decode throughput: runtime.generate() vs Hugging Face transformers generate().

Both run the same random-weight Llama checkpoint (4 layers, hidden 256, 8 heads, 2 KV heads,
vocab 512, fp32), built and saved by this script. Workloads:

- ``issue_b``: 32 prompts of 8-64 tokens, 128 new tokens each, greedy;
- ``mixed``: 64 requests of 8-64 prompt tokens with 16-512 new tokens each, greedy. Hugging Face
  generate() batches statically, so it runs the whole batch to the longest output and each
  request's tokens are cut at its own length (the usual way to serve a batch with it).

Reported: useful generated tokens per second (best of ``--repeats`` timed runs after a warm-up),
the ratio ours / HF, whether the tokens are identical, and the runtime's memory stats. vLLM is a
third column when it is installed (never needed). Usage::

    python bench/e2e_throughput.py [--quick] [--json PATH] [--md PATH] [--device cpu|cuda]
                                   [--backend auto|torch|triton] [--threads N] [--repeats N]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401 - puts the checkout on sys.path

import runtime  # noqa: E402  (light: its public names, and torch, load on first use)

MODEL = dict(hidden_size=256, num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=4,
             vocab_size=512, intermediate_size=688, max_position_embeddings=1024)


def build_checkpoint(folder: Path, model: dict) -> None:
    """Save a random fp32 Llama (no EOS, so every request runs to its token budget)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**model, eos_token_id=None, bos_token_id=None, pad_token_id=0,
                         initializer_range=0.05, rms_norm_eps=1e-5)
    LlamaForCausalLM(config).save_pretrained(folder)


def workloads(quick: bool) -> dict:
    """name -> (prompts, new-token counts), deterministic."""
    import torch

    g = torch.Generator().manual_seed(1234)

    def prompts(n):
        lens = torch.randint(8, 65, (n,), generator=g).tolist()
        return [torch.randint(1, MODEL["vocab_size"], (k,), generator=g).tolist() for k in lens]

    if quick:
        return {"issue_b": (prompts(4), [16] * 4),
                "mixed": (prompts(6), torch.randint(4, 33, (6,), generator=g).tolist())}
    return {"issue_b": (prompts(32), [128] * 32),
            "mixed": (prompts(64), torch.randint(16, 513, (64,), generator=g).tolist())}


def run_ours(loaded, prompts, new_tokens, backend):
    params = [runtime.SamplingParams(max_tokens=n, ignore_eos=True) for n in new_tokens]
    start = time.perf_counter()
    outs = runtime.generate(loaded, prompts, params, backend=backend)
    elapsed = time.perf_counter() - start
    return [o.outputs[0].token_ids for o in outs], elapsed, outs.stats


def run_hf(model, prompts, new_tokens, device):
    import torch

    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding, as HF generate() expects for decoders
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids.to(device), attention_mask=mask.to(device), do_sample=False,
                             max_new_tokens=max(new_tokens), pad_token_id=0)
        tokens = out[:, width:].tolist()
    elapsed = time.perf_counter() - start
    return [t[:n] for t, n in zip(tokens, new_tokens)], elapsed


def run_vllm(folder, prompts, new_tokens):
    """vLLM's offline generate, when installed; None otherwise."""
    try:
        from vllm import LLM, SamplingParams, TokensPrompt
    except Exception:  # noqa: BLE001 - optional third column
        return None
    llm = LLM(model=str(folder), dtype="float32", skip_tokenizer_init=True)
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in new_tokens]
    reqs = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    llm.generate(reqs[:2], params[:2])
    start = time.perf_counter()
    outs = llm.generate(reqs, params)
    return [list(o.outputs[0].token_ids) for o in outs], time.perf_counter() - start


def best_of(fn, repeats):
    """(result of the fastest run, its seconds)."""
    best = None
    for _ in range(repeats):
        result = fn()
        if best is None or result[1] < best[1]:
            best = result
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny workloads (smoke test)")
    ap.add_argument("--json", type=Path, help="write the results as JSON here")
    ap.add_argument("--md", type=Path, help="write a markdown table here")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"])
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for both engines")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per engine (best is kept)")
    ap.add_argument("--heads", type=int, default=MODEL["num_attention_heads"],
                    help="attention heads (4 gives head_dim 64, which the triton backend supports)")
    ap.add_argument("--kv-heads", type=int, default=MODEL["num_key_value_heads"])
    args = ap.parse_args(argv)
    model = dict(MODEL, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads)

    # the triton backend on a CPU runs under the interpreter, which must be on before triton loads
    _common.use_interpreter_without_gpu(force=args.device == "cpu" and args.backend == "triton")
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda"):
        ap.error(f"--device={device!r} must be cpu or cuda")
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (1 if args.quick else 3)
    from transformers import LlamaForCausalLM

    info = _common.machine_info()
    info.update(device=device, transformers=_transformers_version())
    results = {"machine": info, "model": model, "backend": args.backend, "repeats": repeats,
               "quick": args.quick, "workloads": {}}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        build_checkpoint(folder, model)
        loaded = runtime.load_model(folder, device=device)
        hf = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).eval()
        warm = ([[5, 6, 7]] * 2, [4, 4])
        run_ours(loaded, *warm, args.backend)
        run_hf(hf, *warm, device)
        for name, (prompts, new_tokens) in workloads(args.quick).items():
            useful = sum(new_tokens)
            ours_tokens, ours_s, stats = best_of(lambda: run_ours(loaded, prompts, new_tokens, args.backend), repeats)
            hf_tokens, hf_s = best_of(lambda: run_hf(hf, prompts, new_tokens, device), repeats)
            vllm = run_vllm(folder, prompts, new_tokens)
            row = {
                "requests": len(prompts), "generated_tokens": useful,
                "ours_s": ours_s, "ours_tokens_per_s": useful / ours_s,
                "hf_s": hf_s, "hf_tokens_per_s": useful / hf_s, "ratio_ours_over_hf": hf_s / ours_s,
                "identical_requests": sum(a == b for a, b in zip(ours_tokens, hf_tokens)),
                "vllm_tokens_per_s": None if vllm is None else useful / vllm[1],
                "memory_stats": {k: v for k, v in stats.items() if k not in ("elapsed_s", "tokens_per_s")},
            }
            results["workloads"][name] = row
    text = table(results)
    print(text)
    _common.write_outputs(results, text, json_path=args.json, md_path=args.md)
    return 0


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def table(results: dict) -> str:
    m = results["machine"]
    lines = [f"Machine: {m['host_cpu']} ({m['cpu_count']} CPUs, torch threads {m['torch_threads']})"
             + (f", GPU {m['gpu']}" if "gpu" in m else "")
             + f"; torch {m['torch']}, transformers {m['transformers']}; device {m['device']}, "
             f"backend {results['backend']}; best of {results['repeats']}",
             f"Model: random Llama, {results['model']['num_hidden_layers']} layers, hidden "
             f"{results['model']['hidden_size']}, {results['model']['num_attention_heads']} heads, "
             f"{results['model']['num_key_value_heads']} KV heads, vocab {results['model']['vocab_size']}, fp32",
             "",
             "| workload | requests | tokens | ours tok/s | HF tok/s | ours/HF | identical | vLLM tok/s |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in results["workloads"].items():
        vllm = "not installed" if r["vllm_tokens_per_s"] is None else f"{r['vllm_tokens_per_s']:.0f}"
        lines.append(f"| {name} | {r['requests']} | {r['generated_tokens']} | {r['ours_tokens_per_s']:.0f} | "
                     f"{r['hf_tokens_per_s']:.0f} | {r['ratio_ours_over_hf']:.2f}x | "
                     f"{r['identical_requests']}/{r['requests']} | {vllm} |")
    lines += ["", "Runtime memory stats:", ""]
    for name, r in results["workloads"].items():
        s = r["memory_stats"]
        lines.append(f"- {name}: {s['num_blocks']} blocks of {s['block_size']} "
                     f"({s['kv_cache_bytes'] / 2**20:.1f} MiB), peak {s['peak_blocks_in_use']} in use, "
                     f"utilization at peak {s['at_peak'].get('utilization', 0):.3f}, mean "
                     f"{s['mean_utilization']:.3f}, preemptions {s['preemptions']}, "
                     f"{s['num_steps']} steps, backend {s['backend']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
