"""vLLM's offline ``LLM.generate`` as a peer of bench/e2e_throughput.py, run in vLLM's own venv.

Started by ``e2e_throughput.py --peer-python PATH`` as ``PATH bench/vllm_peer.py MODEL_DIR
WORKLOAD_JSON``; it never imports kgen or the runtime. The workload file says the dtype
(``float32`` or ``bfloat16``) and whether to run eagerly (``enforce_eager``; vLLM's default is
torch.compile); prefix caching is off (``enable_prefix_caching=False``), so repeats on one engine
recompute every prompt as the first run did. Greedy, ``ignore_eos``, ``skip_tokenizer_init``.
It loads the model once (compiling, unless eager), warms up, prints ``{"ready": ...}``, then
answers each ``run`` line on stdin with one JSON line: the generated token ids per request (input
order) and the seconds ``generate`` took. ``quit`` (or end of input) exits. vLLM's facts for the
CPU: the script must guard ``__main__`` (vLLM starts worker processes), and
``VLLM_CPU_KVCACHE_SPACE`` (GiB) must be set or it reserves most of the RAM; third-party vLLM
plugins are not loaded (``VLLM_PLUGINS=""``), so this is stock vLLM. vLLM's own log lines (threads,
core binding, compilation) go to stdout and stderr, where the parent collects them.
"""

from __future__ import annotations

import json
import os
import sys
import time

ENV_KEYS = ("VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU", "OMP_NUM_THREADS",
            "LD_PRELOAD")


def main() -> int:
    model_dir, workload_path = sys.argv[1], sys.argv[2]
    with open(workload_path) as f:
        work = json.load(f)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(work.get("kv_cache_gib", 4)))
    os.environ.setdefault("VLLM_PLUGINS", "")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    eager = bool(work.get("enforce_eager", False))
    llm = LLM(model=model_dir, dtype=work.get("dtype", "float32"), skip_tokenizer_init=True, enforce_eager=eager,
              enable_prefix_caching=False, max_model_len=work["max_model_len"], seed=0)
    prompts = [TokensPrompt(prompt_token_ids=p) for p in work["prompts"]]
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, detokenize=False)
              for n in work["max_tokens"]]
    start = time.perf_counter()
    llm.generate(prompts[:2], params[:2], use_tqdm=False)  # warm-up
    import torch
    import vllm

    info = {"ready": True, "vllm": vllm.__version__, "torch": torch.__version__,
            "frontend_torch_threads": torch.get_num_threads(), "dtype": work.get("dtype", "float32"),
            "enforce_eager": eager, "enable_prefix_caching": False,
            "warmup_s": time.perf_counter() - start, "env": {k: os.environ.get(k) for k in ENV_KEYS}}
    print(json.dumps(info), flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        print(json.dumps({"seconds": elapsed, "tokens": [list(o.outputs[0].token_ids) for o in outs]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
