"""The engines bench/e2e_throughput.py times, each returning (tokens, seconds, facts).

``facts`` always holds ``useful_tokens`` (generated tokens the caller asked for and got) and
``computed_tokens`` (tokens the engine generated, wasted ones included: a static batch runs every
row to its longest request), plus the thread settings the run had.

- :func:`run_ours`: ``runtime.generate()``, prefix caching off.
- :func:`run_hf_static`: transformers' ``generate()`` over static batches (left padding).
- :func:`run_hf_continuous`: transformers' continuous batching (the manager behind
  ``generate_batch``, with a per-request ``max_new_tokens``; block sharing, i.e. prefix
  caching, off).
- :class:`VllmPeer`: vLLM's ``LLM.generate`` in vLLM's own venv (bench/vllm_peer.py), one
  engine per variant, started once and timed per ``run()``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import runtime

PEER_SCRIPT = Path(__file__).resolve().parent / "vllm_peer.py"
LOG_PATTERN = re.compile(r"thread|OMP|core ids|reserved|compil|inductor|graph|eager|LD_PRELOAD|libiomp|dtype=",
                         re.IGNORECASE)
"""vLLM log lines kept in the results: threads, core binding, compilation."""


def torch_threads() -> dict:
    import torch

    return {"torch_threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY")}


def run_ours(loaded, prompts, new_tokens, backend, threads=None):
    params = [runtime.SamplingParams(max_tokens=n, ignore_eos=True) for n in new_tokens]
    start = time.perf_counter()
    outs = runtime.generate(loaded, prompts, params, backend=backend, num_threads=threads,
                            enable_prefix_caching=False)
    elapsed = time.perf_counter() - start
    tokens = [o.outputs[0].token_ids for o in outs]
    stats = {k: v for k, v in outs.stats.items() if k not in ("elapsed_s", "tokens_per_s")}
    useful = sum(map(len, tokens))
    facts = {"useful_tokens": useful, "computed_tokens": useful, "forward_tokens": stats["forward_tokens"],
             "threads": {"num_threads": stats["num_threads"], "omp_wait_policy": stats["omp_wait_policy"]},
             "stats": stats}
    return tokens, elapsed, facts


def run_hf_static(model, prompts, new_tokens, device, batch):
    """HF generate() over static batches of ``batch`` requests (left padding), each batch run to
    its longest request (every row computes that many tokens) and each request's tokens cut at
    its own length."""
    import torch

    tokens: list[list[int]] = []
    computed = padded_prompt = 0
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
        computed += len(chunk) * max(want)
        padded_prompt += len(chunk) * width
    elapsed = time.perf_counter() - start
    facts = {"useful_tokens": sum(map(len, tokens)), "computed_tokens": computed,
             "padded_prompt_tokens": padded_prompt, "batch": batch, "threads": torch_threads()}
    return tokens, elapsed, facts


def run_hf_continuous(model, prompts, new_tokens, block_size=16):
    """transformers' continuous batching over all requests at once: paged KV blocks, a
    per-request ``max_new_tokens``, no block sharing (no prefix caching), no CUDA graphs."""
    import torch
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    gen = GenerationConfig(do_sample=False, max_new_tokens=max(new_tokens), eos_token_id=None, pad_token_id=0)
    blocks = sum(-(-(len(p) + n) // block_size) for p, n in zip(prompts, new_tokens)) + 16
    config = ContinuousBatchingConfig(page_size=block_size, num_blocks=blocks, allow_block_sharing=False,
                                      use_cuda_graph=False, use_async_batching=False,
                                      max_batch_tokens=max(512, max(map(len, prompts))))
    start = time.perf_counter()
    with model.continuous_batching_context_manager(generation_config=gen, block=True, timeout=5,
                                                   continuous_batching_config=config, warmup=False) as manager:
        ids = [manager.add_request(p, max_new_tokens=n, eos_token_id=-1) for p, n in zip(prompts, new_tokens)]
        done: dict = {}
        while len(done) < len(ids):
            result = manager.get_result(timeout=1)
            if result is not None and result.is_finished():
                done[result.request_id] = result
            elif result is None and not manager.is_running():
                raise RuntimeError("transformers' continuous batching manager stopped before finishing")
    elapsed = time.perf_counter() - start
    tokens = [list(done[i].generated_tokens) for i in ids]
    errors = [done[i].error for i in ids if done[i].error]
    if errors:
        raise RuntimeError(f"transformers' continuous batching failed: {errors[0]}")
    useful = sum(map(len, tokens))
    facts = {"useful_tokens": useful, "computed_tokens": useful, "block_size": block_size, "num_blocks": blocks,
             "attn_implementation": model.config._attn_implementation, "threads": torch_threads()}
    return tokens, elapsed, facts


PEER_KV_GIB = 1
"""vLLM's KV cache space per peer (GiB). The mixed workload's whole cache, every request at its
longest at once, is under 0.5 GiB in fp32; four peers live side by side during a run, and at 4 GiB
each they filled a 24 GiB machine and swapped."""


class VllmPeer:
    """A vllm_peer.py worker in vLLM's venv: started once, one timed ``generate`` per ``run()``.

    ``settings``: ``dtype`` and ``enforce_eager`` (written to its workload file); ``env``: extra
    environment (e.g. ``VLLM_CPU_NUM_OF_RESERVED_CPU=0``). vLLM's log lines about threads, core
    binding and compilation are kept in :attr:`log_lines`."""

    def __init__(self, python: str, folder: Path, prompts, new_tokens, *, settings: dict, env: dict,
                 work_dir: Path, max_model_len: int, tag: str) -> None:
        spec = work_dir / f"vllm_workload_{tag}.json"
        spec.write_text(json.dumps({"prompts": prompts, "max_tokens": new_tokens, "max_model_len": max_model_len,
                                    "kv_cache_gib": int(env.get("VLLM_CPU_KVCACHE_SPACE", PEER_KV_GIB)), **settings}))
        self.env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(PEER_KV_GIB), "VLLM_PLUGINS": "", **env}
        self.settings, self.extra_env, self.log_lines = dict(settings), dict(env), []
        self.useful = sum(new_tokens)
        self.log_path = work_dir / f"vllm_{tag}.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([python, str(PEER_SCRIPT), str(folder), str(spec)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, text=True, env=self.env)
        self.info = self._read()

    def _read(self) -> dict:
        for line in self.proc.stdout:  # vLLM logs to stdout too: JSON lines are ours, the rest its log
            if line.startswith("{"):
                return json.loads(line)
            if LOG_PATTERN.search(line):
                self.log_lines.append(line.rstrip()[-300:])
        raise RuntimeError(f"the vLLM peer exited (code {self.proc.wait()}); see {self.log_path}")

    def run(self):
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        out = self._read()
        return out["tokens"], out["seconds"], {"useful_tokens": self.useful, "computed_tokens": self.useful}

    def _listed(self, key: str) -> int | None:
        """How many ids vLLM's ``key=[...]`` log line lists (None without one)."""
        for line in self.log_lines:
            m = re.search(key + r"=\[([0-9, ]*)\]", line)
            if m:
                return len([c for c in m.group(1).split(",") if c.strip()])
        return None

    def computing_cores(self) -> int | None:
        """The cores vLLM's worker computes on, from its ``core ids=[...]`` log line."""
        return self._listed("core ids")

    def cpus_used(self) -> int | None:
        """Computing cores plus the CPUs vLLM reserves for its frontend (``reserved_cpus=[...]``)."""
        cores, reserved = self.computing_cores(), self._listed("reserved_cpus")
        return None if cores is None else cores + (reserved or 0)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()
        with open(self.log_path) as f:  # stderr: warnings, binding notes
            self.log_lines += [ln.rstrip()[-300:] for ln in f if LOG_PATTERN.search(ln)]
