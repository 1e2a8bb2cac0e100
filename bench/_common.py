"""Small helpers shared by the bench scripts: machine description and output files."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # let the scripts run from a checkout without installing kgen
    sys.path.insert(0, str(REPO))

import kgen  # noqa: E402  (after the checkout is on sys.path)
from kgen.device import normalize_gpu_name  # noqa: E402


def use_interpreter_without_gpu(force: bool = False) -> None:
    """Set TRITON_INTERPRET=1 (before any kernel module loads) when there is no GPU."""
    if "TRITON_INTERPRET" in os.environ and not force:
        return
    import torch

    if force or not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def gpu_name(torch) -> str:
    """Normalized name of the GPU present (kgen.device's names, e.g. 'h100')."""
    return normalize_gpu_name(torch.cuda.get_device_name())


def machine_info() -> dict:
    """Where and with what a benchmark ran: enough to tell two result files apart."""
    import torch

    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host_cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(), sm_count=props.multi_processor_count,
                    compute_capability=f"{props.major}.{props.minor}",
                    gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda)
    info["kgen"] = kgen.__version__
    return info


def kernel_key(fn) -> str | None:
    """The variant key of a kernel callable from a kgen-rendered module."""
    return getattr(fn, "__globals__", {}).get("VARIANT_KEY")


def add_output_args(ap) -> None:
    """The ``--json`` / ``--md`` options every script writes its results to."""
    ap.add_argument("--json", type=Path, help="write the results as JSON here")
    ap.add_argument("--md", type=Path, help="write the table as Markdown here")


def publish(result: dict, table_text: str, args) -> None:
    """Print the table, then write the JSON and Markdown where ``args.json`` / ``args.md`` ask."""
    print(table_text)
    write_outputs(result, table_text, json_path=args.json, md_path=args.md)


def write_outputs(result: dict, table_text: str, *, json_path=None, md_path=None,
                  quiet: bool = False) -> None:
    """Write the JSON result and the Markdown table where asked (folders created)."""
    if json_path:
        path = Path(json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2, default=str) + "\n")
        if not quiet:
            print(f"wrote {path}")
    if md_path:
        path = Path(md_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(table_text + "\n")
        if not quiet:
            print(f"wrote {path}")


def build_checkpoint(folder: Path, model: dict) -> None:
    """Save a random fp32 Llama (no EOS, so every request runs to its token budget)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**model, eos_token_id=None, bos_token_id=None, pad_token_id=0,
                         initializer_range=0.05, rms_norm_eps=1e-5)
    LlamaForCausalLM(config).save_pretrained(folder)
