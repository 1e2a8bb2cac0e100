"""What an fp8 KV cache costs in accuracy: fp8-cache logits against fp32-cache logits.

A random-weight Llama (the e2e benchmark's model: 8 layers, hidden 512, 8 heads, 2 KV heads,
vocab 4096, fp32) reads prompts; the fp32-cache greedy continuation of each is then fed,
teacher-forced, through the engine's paged path (prefill, then one decode per token, so most
rows read the cache back) once with ``kv_cache_dtype="auto"`` (fp32) and once per fp8 format,
with scales 1.0 and with ``calculate_kv_scales=True``. Reported per format: the largest and mean
absolute logit difference (also relative to the fp32 logits' standard deviation), the mean KL
divergence of the next-token distributions, and the share of positions whose top-1 token
agrees. Usage::

    python bench/fp8_kv_accuracy.py [--quick] [--json PATH] [--md PATH]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import _common  # noqa: F401 - puts the checkout on sys.path
from _common import build_checkpoint

MODEL = dict(hidden_size=512, num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=8,
             vocab_size=4096, intermediate_size=1376, max_position_embeddings=1024)
QUICK_MODEL = dict(MODEL, hidden_size=128, num_hidden_layers=2, vocab_size=512, intermediate_size=344)
FORMATS = [("fp8_e4m3", False), ("fp8_e4m3", True), ("fp8_e5m2", False), ("fp8_e5m2", True)]


def compare(ref, got) -> dict:
    """Figures of fp8 logits ``got`` against fp32-cache logits ``ref`` (lists of [n, vocab])."""
    import torch

    r, g = torch.cat(ref).double(), torch.cat(got).double()
    diff = (g - r).abs()
    lp_r, lp_g = r.log_softmax(-1), g.log_softmax(-1)
    kl = (lp_r.exp() * (lp_r - lp_g)).sum(-1)
    std = float(r.std())
    return {
        "positions": int(r.shape[0]),
        "max_abs_logit_diff": float(diff.max()),
        "mean_abs_logit_diff": float(diff.mean()),
        "logit_std": std,
        "max_abs_diff_over_std": float(diff.max()) / std,
        "mean_kl": float(kl.mean()),
        "max_kl": float(kl.max()),
        "top1_agreement": float((g.argmax(-1) == r.argmax(-1)).double().mean()),
    }


def measure(folder: Path, *, num_prompts: int, prompt_len: int, new_tokens: int, block_size: int = 16) -> dict:
    """Run the comparison on the checkpoint in ``folder``; returns {name: figures}."""
    import torch

    import runtime
    from runtime.scoring import teacher_forced_logits

    loaded = runtime.load_model(folder, device="cpu")
    g = torch.Generator().manual_seed(7)
    vocab = loaded.config.vocab_size
    lens = torch.randint(prompt_len // 2, prompt_len + 1, (num_prompts,), generator=g).tolist()
    prompts = [torch.randint(1, vocab, (n,), generator=g).tolist() for n in lens]
    greedy = runtime.generate(loaded, prompts, runtime.SamplingParams(max_tokens=new_tokens, ignore_eos=True))
    conts = [o.outputs[0].token_ids for o in greedy]
    blocks = sum(-(-(len(p) + len(c)) // block_size) for p, c in zip(prompts, conts)) + 4

    def logits(kv_cache_dtype, calculate):
        engine = runtime.Engine(loaded, num_blocks=blocks, block_size=block_size, enable_prefix_caching=False,
                                kv_cache_dtype=kv_cache_dtype, calculate_kv_scales=calculate)
        return teacher_forced_logits(engine, prompts, conts), engine.kv_cache

    ref, _ = logits("auto", False)
    out = {}
    for fmt, calculate in FORMATS:
        got, cache = logits(fmt, calculate)
        row = compare(ref, got)
        row.update(kv_cache_dtype=fmt, calculate_kv_scales=calculate,
                   k_scale_range=[min(cache.k_scales), max(cache.k_scales)],
                   v_scale_range=[min(cache.v_scales), max(cache.v_scales)])
        out[f"{fmt}{'+scales' if calculate else ''}"] = row
    return out


def table(results: dict) -> str:
    lines = [f"Model: random Llama {results['model']['num_hidden_layers']} layers, hidden "
             f"{results['model']['hidden_size']}, vocab {results['model']['vocab_size']}, fp32; "
             f"{results['num_prompts']} prompts of {results['prompt_len'] // 2}-{results['prompt_len']} tokens, "
             f"{results['new_tokens']} teacher-forced tokens each (the fp32-cache greedy ones)", "",
             "| cache | max abs logit diff | mean abs | max / logit std | mean KL | top-1 agreement |",
             "|---|---|---|---|---|---|"]
    for name, r in results["formats"].items():
        lines.append(f"| {name} | {r['max_abs_logit_diff']:.4f} | {r['mean_abs_logit_diff']:.5f} | "
                     f"{r['max_abs_diff_over_std']:.4f} | {r['mean_kl']:.2e} | {r['top1_agreement']:.4f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a 2-layer model and few tokens (smoke test)")
    _common.add_output_args(ap)
    args = ap.parse_args(argv)
    model = QUICK_MODEL if args.quick else MODEL
    sizes = dict(num_prompts=4, prompt_len=24, new_tokens=8) if args.quick else \
        dict(num_prompts=16, prompt_len=128, new_tokens=64)
    with tempfile.TemporaryDirectory() as tmp:
        build_checkpoint(Path(tmp), model)
        formats = measure(Path(tmp), **sizes)
    results = {"machine": _common.machine_info(), "model": model, **sizes, "formats": formats}
    text = table(results)
    _common.publish(results, text, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
