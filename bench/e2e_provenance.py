"""What an e2e run needs to be judged later: the commit, the settings that change speed, the load.

Kept under the results' ``e2e_provenance`` key (bench/_common.py's generic ``provenance`` block,
where present, sits beside it).
"""

from __future__ import annotations

import os
import subprocess
import sys

from _common import REPO

ENV_PREFIXES = ("TRITON_INTERPRET", "OMP_", "GOMP_", "KMP_", "VLLM_", "LD_PRELOAD", "MKL_", "ONEDNN_", "DNNL_",
                "KGEN_", "PYTORCH_", "TORCH_", "CUDA_VISIBLE_DEVICES")
"""Environment variables recorded: threads and their wait policy, vLLM's CPU settings, preloaded
libraries, oneDNN's ISA caps, the runtime's switches."""


def git_state() -> dict:
    """``{"commit": sha or None, "dirty": bool or None}`` of the checkout the bench runs from."""
    def git(*args):
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=30)

    try:
        head = git("rev-parse", "HEAD")
        status = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    if head.returncode:
        return {"commit": None, "dirty": None}
    return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip())}


def environment() -> dict:
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith(ENV_PREFIXES)}


def collect(argv) -> dict:
    from runtime.native_build import native_info

    return {**git_state(), "command": [sys.executable, *sys.argv[:1], *(argv if argv is not None else sys.argv[1:])],
            "environment": environment(), "loadavg_start": list(os.getloadavg()), "native": native_info(),
            "vllm_logs": {}}
