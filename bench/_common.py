"""Small helpers shared by the bench scripts: machine description, provenance and output files.

Every results file a script writes through :func:`write_outputs` (or :func:`publish`) carries
``provenance: {commit, dirty, date, machine, command}`` in its JSON and one provenance line at the
end of its Markdown (:func:`provenance_line`), so a figure can always be traced to the code that
made it.
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import os
import platform
import shlex
import subprocess
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


def torch_device(force_cpu: bool = False):
    """(cuda, device name, sync) for a runtime benchmark: the GPU unless ``force_cpu`` or there is
    none (then the interpreter, set before any kernel module loads)."""
    use_interpreter_without_gpu(force=force_cpu)
    import torch

    cuda = torch.cuda.is_available() and not force_cpu
    return cuda, "cuda" if cuda else "cpu", torch.cuda.synchronize if cuda else (lambda: None)


def add_output_args(ap) -> None:
    """The ``--json`` / ``--md`` options every script writes its results to."""
    ap.add_argument("--json", type=Path, help="write the results as JSON here")
    ap.add_argument("--md", type=Path, help="write the table as Markdown here")


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True,
                              timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def _command() -> str:
    """How this process was started, as a command a reader can run from the repository root."""
    script = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else None
    if script is not None and script.is_file() and script.is_relative_to(REPO):
        head = ["python", str(script.relative_to(REPO))]
    else:
        head = ["python", *(sys.argv[:1] or ["-"])]
    return " ".join(shlex.quote(a) for a in head + sys.argv[1:])


def _machine_line(info: dict) -> str:
    where = f"{info.get('host_cpu', '?')} x{info.get('cpu_count', '?')}"
    return f"{info['gpu']}, {where}" if info.get("gpu") else where


@functools.lru_cache(maxsize=None)
def _provenance(command: str | None) -> tuple:
    commit = (_git("rev-parse", "HEAD") or "").strip() or os.environ.get("KGEN_COMMIT") or None
    # results files being rewritten do not make the measuring code dirty
    status = _git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)bench/results")
    dirty = None if status is None else bool(status.strip())
    date = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return tuple({"commit": commit, "dirty": dirty, "date": date,
                  "machine": _machine_line(machine_info()),
                  "command": command or _command()}.items())


def provenance(command: str | None = None) -> dict:
    """``{commit, dirty, date, machine, command}`` of this run (computed once per process).

    ``commit`` is the checkout's ``HEAD`` (``$KGEN_COMMIT`` where the tree has no ``.git``, e.g. a
    copy on a GPU machine; else None), ``dirty`` whether tracked files outside ``bench/results/``
    differ from it (None when git cannot tell), ``date`` UTC, ``machine`` the GPU and CPU,
    ``command`` how the script was started (``sys.argv``) unless given.
    """
    return dict(_provenance(command))


def provenance_line(prov: dict) -> str:
    """The Markdown line a results table ends with, from a JSON's ``provenance``."""
    commit = (prov.get("commit") or "unknown")[:12]
    state = {True: " (dirty)", False: "", None: " (dirty: unknown)"}[prov.get("dirty")]
    command = f"`{prov['command']}`" if prov.get("command") else "command not recorded"
    line = f"Provenance: commit {commit}{state}, {prov.get('date')}, {prov.get('machine')}, {command}."
    if prov.get("backfilled"):
        line += f" Backfilled from git history: {prov.get('note') or ''}".rstrip(". ") + "."
    return line


def publish(result: dict, table_text: str, args) -> None:
    """Print the table and its provenance line, then write the JSON and Markdown where asked."""
    result.setdefault("provenance", provenance())
    print(table_text.rstrip("\n") + "\n\n" + provenance_line(result["provenance"]))
    write_outputs(result, table_text, json_path=args.json, md_path=args.md)


def write_outputs(result: dict, table_text: str, *, json_path=None, md_path=None,
                  quiet: bool = False, new_run: bool = True) -> None:
    """Write the JSON result and the Markdown table where asked (folders created).

    A new run's ``result`` gets this process's :func:`provenance` (in place, once); with
    ``new_run=False`` (re-rendering a table from a JSON written earlier) the result's own
    provenance, if any, is kept. The Markdown ends with the provenance line.
    """
    if new_run:
        result.setdefault("provenance", provenance())
    if result.get("provenance"):
        table_text = table_text.rstrip("\n") + "\n\n" + provenance_line(result["provenance"])
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
