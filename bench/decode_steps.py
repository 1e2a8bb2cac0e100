"""Decode steps per second at small batch, with and without CUDA graphs (issue 13).

A random-weight Llama (built in memory on the device: no checkpoint, no transformers) runs in
:class:`runtime.engine.Engine` with kgen's triton backend. For each batch size the script admits
that many requests of ``--prompt`` tokens, runs the prefill and ``--warmup`` decode steps (the
graph of the padded batch is captured there), then times ``--steps`` decode-only engine steps
(schedule, forward, greedy sampling: what a served step costs) with ``cuda_graphs=False`` and
``cuda_graphs=True``. Reported: steps/s, ms per step, the speedup, and whether both runs produced
the same tokens (graph replay must not change the decode).

Presets: ``llama8b`` (32 layers, hidden 4096, 32 heads, 8 KV heads, head dim 128, bf16: Llama-3-8B
shapes) on a GPU; ``tiny`` (2 layers, head dim 64, fp32) on the CPU, where the kernels run under
the Triton interpreter, there are no CUDA graphs and the figures only show the script works.

Examples::

    python bench/decode_steps.py --json bench/results/h200/decode_steps.json \
        --md bench/results/h200/decode_steps.md                         # on a GPU
    python bench/decode_steps.py --quick --json /tmp/d.json              # CPU smoke run
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
from kgen.paths import template_hash  # noqa: E402  (_common put the checkout on sys.path)

PRESETS = {
    "llama8b": dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
                    num_hidden_layers=32, intermediate_size=14336, vocab_size=128256,
                    max_position_embeddings=16384, dtype="bf16"),
    "small": dict(hidden_size=2048, num_attention_heads=16, num_key_value_heads=4,
                  num_hidden_layers=8, intermediate_size=5632, vocab_size=32000,
                  max_position_embeddings=8192, dtype="bf16"),
    "tiny": dict(hidden_size=128, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=2,
                 intermediate_size=256, vocab_size=96, max_position_embeddings=256, dtype="fp32"),
}


def random_model(preset: dict, *, device, seed: int = 0, std: float = 0.02):
    """A :class:`runtime.loader.LoadedModel` of random weights made on ``device`` directly.

    ``preset``: Llama ``config.json`` fields plus ``dtype`` (fp32, fp16, bf16). Norm weights are
    near 1, other weights N(0, std).
    """
    import torch

    # runtime's model modules import torch: loaded with the first model (tests import PRESETS)
    from runtime.config import ModelConfig
    from runtime.loader import LoadedModel
    from runtime.model.decoder import DecoderModel
    from runtime.model.weights import expected_shapes

    fields = {k: v for k, v in preset.items() if k != "dtype"}
    config = ModelConfig.from_dict(dict(fields, architectures=["LlamaForCausalLM"],
                                        torch_dtype={"fp32": "float32", "fp16": "float16",
                                                     "bf16": "bfloat16"}[preset["dtype"]],
                                        rms_norm_eps=1e-5, eos_token_id=None))
    dtype = config.torch_dtype
    gen = torch.Generator(device=device).manual_seed(seed)
    weights = {}
    for name, shape in expected_shapes(config).items():
        t = torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
        weights[name] = (1.0 + 0.1 * t if name.endswith("norm.weight") else std * t).to(dtype)
    model = DecoderModel(config, weights, device=torch.device(device), dtype=dtype)
    return LoadedModel(model=model, config=config)


def run_steps(loaded, *, batch: int, prompt: int, warmup: int, steps: int, cuda_graphs: bool,
              sync) -> dict:
    """Time ``steps`` decode-only engine steps of ``batch`` sequences; tokens for the check."""
    import torch

    from runtime.engine import Engine  # imports torch, like the line above
    from runtime.sampling import SamplingParams

    block = 16
    total = prompt + warmup + steps + 2
    need = batch * -(-total // block)
    engine = Engine(loaded, num_blocks=int(need / 0.98) + 8, block_size=block,  # over the watermark
                    max_num_seqs=batch, max_num_batched_tokens=batch * prompt,
                    backend="triton", enable_prefix_caching=False, cuda_graphs=cuda_graphs)
    gen = torch.Generator().manual_seed(batch)
    vocab = loaded.config.vocab_size
    for _ in range(batch):
        ids = torch.randint(1, vocab, (prompt,), generator=gen).tolist()
        engine.add_request(ids, SamplingParams(max_tokens=warmup + steps + 1, ignore_eos=True))
    while engine.num_forward_tokens < batch * prompt:
        engine.step()  # the prefill: one step, unless admission held some prompts back
    for _ in range(warmup):
        engine.step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    sync()
    elapsed = time.perf_counter() - start
    while engine.has_unfinished():
        engine.step()
    tokens = [c[0] for done in sorted(engine.pop_finished(), key=lambda d: d.request_id)
              for c in done.completions]
    graphs = engine.graphs
    return dict(steps_per_s=steps / elapsed, ms_per_step=1e3 * elapsed / steps, tokens=tokens,
                captured=list(graphs.captured) if graphs else [],
                replays=graphs.replays if graphs else 0)


def table(result: dict) -> str:
    p = result["preset"]
    lines = [f"Device: {result['device']} ({result['machine'].get('gpu', result['machine']['host_cpu'])}); "
             f"model: random Llama, {p['num_hidden_layers']} layers, hidden {p['hidden_size']}, "
             f"{p['num_attention_heads']} heads, {p['num_key_value_heads']} KV heads, {p['dtype']}; "
             f"prompt {result['prompt']} tokens, {result['steps']} timed decode steps after "
             f"{result['warmup']} warm-up steps", "",
             "| batch | eager steps/s | eager ms/step | graph steps/s | graph ms/step | graph / eager "
             "| same tokens | graphs captured |", "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        g = r.get("graph")
        gtxt = (f"{g['steps_per_s']:.1f} | {g['ms_per_step']:.2f} | "
                f"{g['steps_per_s'] / r['eager']['steps_per_s']:.2f}x | {r['identical']} | "
                f"{g['captured']}") if g else f"- | - | - | - | {r.get('graph_note', '-')}"
        lines.append(f"| {r['batch']} | {r['eager']['steps_per_s']:.1f} | {r['eager']['ms_per_step']:.2f} "
                     f"| {gtxt} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes (the CPU smoke run)")
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None,
                    help="model shape (default: llama8b on a GPU, tiny on the CPU)")
    ap.add_argument("--batches", default=None, help="batch sizes (default 1,4,16; 1,2 on the CPU)")
    ap.add_argument("--prompt", type=int, default=None, help="prompt tokens per sequence")
    ap.add_argument("--warmup", type=int, default=None, help="decode steps before timing")
    ap.add_argument("--steps", type=int, default=None, help="timed decode steps")
    ap.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is present")
    _common.add_output_args(ap)
    args = ap.parse_args(argv)
    cuda, device, sync = _common.torch_device(args.cpu)
    small = args.quick or not cuda
    preset_name = args.preset or ("tiny" if small else "llama8b")
    batches = [int(b) for b in (args.batches or ("1,2" if small else "1,4,16")).split(",")]
    prompt = args.prompt or (8 if small else 1000)
    warmup = args.warmup if args.warmup is not None else (1 if small else 8)
    steps = args.steps or (2 if small else 48)
    for name, value in (("--prompt", prompt), ("--steps", steps)):
        if value < 1:
            ap.error(f"{name}={value} must be >= 1")
    loaded = random_model(PRESETS[preset_name], device=device)
    result = dict(machine=_common.machine_info(), template_hash=template_hash(), device=device,
                  preset_name=preset_name,
                  preset=PRESETS[preset_name], prompt=prompt, warmup=warmup, steps=steps, rows=[])
    for batch in batches:
        row = dict(batch=batch)
        row["eager"] = run_steps(loaded, batch=batch, prompt=prompt, warmup=warmup, steps=steps,
                                 cuda_graphs=False, sync=sync)
        if cuda:
            row["graph"] = run_steps(loaded, batch=batch, prompt=prompt, warmup=warmup, steps=steps,
                                     cuda_graphs=True, sync=sync)
            row["identical"] = row["graph"]["tokens"] == row["eager"]["tokens"]
            row["speedup"] = row["graph"]["steps_per_s"] / row["eager"]["steps_per_s"]
        else:
            row["graph_note"] = "no CUDA device: graphs not run"
        result["rows"].append(row)
        print(f"batch {batch}: eager {row['eager']['steps_per_s']:.1f} steps/s"
              + (f", graphs {row['graph']['steps_per_s']:.1f} steps/s, same tokens {row['identical']}"
                 if cuda else ""), flush=True)
        _common.write_outputs(result, table(result), json_path=args.json, md_path=args.md, quiet=True)
    text = table(result)
    _common.publish(result, text, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
