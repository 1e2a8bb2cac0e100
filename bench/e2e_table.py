"""The Markdown of bench/e2e_throughput.py's results: one table per dtype, the headline at equal
cores, the thread settings of every run, the token comparison, and where the numbers came from."""

from __future__ import annotations

import re

import e2e_parity

KEY_LINES = (r"core ids=", r"reserve_cpu_num=", r"Torch threads", r"Enforce eager|Warming up model for the compilation",
             r"compiled function|Compil")
"""vLLM's log lines the table quotes (the JSON keeps every matching line): its computing cores,
reserved CPUs, torch threads and whether it compiled."""


def key_lines(logs: list[str]) -> list[str]:
    picked = []
    for pattern in KEY_LINES:
        hit = next((ln for ln in logs if re.search(pattern, ln)), None)
        if hit is not None and hit not in picked:
            picked.append(hit.split("] ", 1)[-1].strip()[:120])
    return picked


def _threads(row: dict) -> str:
    t = row.get("threads") or {}
    if "num_threads" in t:
        return f"{t['num_threads']} torch threads, OMP_WAIT_POLICY={t['omp_wait_policy']}"
    if "torch_threads" in t:
        return f"{t['torch_threads']} torch threads, OMP_NUM_THREADS={t['OMP_NUM_THREADS']}"
    peer = row.get("peer")
    if peer:
        env = {k: v for k, v in peer["env"].items() if v is not None and k != "VLLM_CPU_KVCACHE_SPACE"}
        cores, cpus = row.get("computing_cores"), row.get("cpus_used")
        reserved = "" if cores is None or cpus is None or cpus == cores else f" + {cpus - cores} reserved"
        return (f"computes on {cores if cores is not None else '?'} core(s){reserved}"
                + "".join(f", {k}={v}" for k, v in env.items()))
    return ""


def dtype_table(name: str, res: dict, requests: int) -> list[str]:
    rows = res["engines"]
    ours = [k for k in rows if k.startswith("ours_")]
    ref = ours[-1] if ours else None
    lines = [f"### {name}", "",
             "| engine | what it is | threads / cores | tok/s (best) | times (s) | useful / computed tokens | "
             f"{ref or 'ours'} / engine | identical to hf_static |", "|---|---|---|---|---|---|---|---|"]
    for k, r in rows.items():
        ratio = "" if ref is None or k == ref else f"{rows[ref]['tokens_per_s'] / r['tokens_per_s']:.2f}x"
        same = f"{r['identical_requests']}/{requests}" if "identical_requests" in r else ""
        lines.append(f"| {k} | {r['what']} | {_threads(r)} | {r['tokens_per_s']:.0f} | "
                     f"{', '.join(f'{t:.1f}' for t in r['times_s'])} | {r['useful_tokens']} / {r['computed_tokens']} | "
                     f"{ratio} | {same} |")
    head = res["headline"]
    lines.append("")
    for c, h in head["equal_cores"].items():
        lines.append(f"- Equal cores ({c}): {h['ours']} / {h['vllm']} (vLLM's fastest computing on {c} core(s)) = "
                     f"**{h['ratio']:.2f}x**")
    for c, h in head.get("equal_cpus", {}).items():
        lines.append(f"- Equal CPUs ({c}): {h['ours']} / {h['vllm']} (vLLM's fastest occupying {c} CPU(s), its "
                     f"frontend's included) = **{h['ratio']:.2f}x**")
    if "vs_vllm_best" in head:
        h = head["vs_vllm_best"]
        lines.append(f"- vLLM's fastest setting here: {h['vllm']} on {h['cores']} core(s); {h['ours']} / it = "
                     f"**{h['ratio']:.2f}x**")
    parity = res.get("parity")
    if parity:
        lines += [""] + [f"- {e2e_parity.summary_line(k, parity)}" for k in parity["engines"]]
    return lines


def table(results: dict) -> str:
    m, w, mod, prov = results["machine"], results["workload"], results["model"], results["e2e_provenance"]
    commit = prov.get("commit") or "unknown"
    lines = [f"Machine: {m['host_cpu']} ({m['cpu_count']} CPUs); torch {m['torch']}, transformers {m['transformers']}; "
             f"device {m['device']}, backend {results['backend']}; best of {results['repeats']} (transformers: "
             f"{results.get('hf_repeats', results['repeats'])}); commit "
             f"{commit[:12]}{' (dirty)' if prov.get('dirty') else ''}; load average {prov['loadavg_start'][0]:.2f} "
             f"at start, {prov['loadavg_end'][0]:.2f} at end",
             f"Model: random Llama, {mod['num_hidden_layers']} layers, hidden {mod['hidden_size']}, "
             f"{mod['num_attention_heads']} heads, {mod['num_key_value_heads']} KV heads, vocab {mod['vocab_size']}. "
             f"Workload: {w['requests']} requests, {w['prompt_tokens']} prompt tokens, {w['generated_tokens']} "
             f"generated (greedy, ignore_eos). Prefix caching: {results['prefix_caching']}.",
             "Environment: " + (", ".join(f"{k}={v}" for k, v in prov["environment"].items()) or "nothing set"), ""]
    for name, res in results["dtypes"].items():
        lines += dtype_table(name, res, w["requests"]) + [""]
    if prov.get("vllm_logs"):
        lines.append("vLLM's own lines about threads and compilation (all matching lines are in the JSON):")
        for run, logs in prov["vllm_logs"].items():
            lines += [f"- {run}: " + " / ".join(key_lines(logs))]
    return "\n".join(lines)
