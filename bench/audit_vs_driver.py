"""On a GPU: does ``kgen inspect`` (compiled without a GPU) match what the driver reports?

For a few variants the script launches the kernels for real (Triton's JIT, on the GPU present),
reads ``n_regs`` / ``n_spills`` / ``shared`` from the loaded kernels and the K/V load widths from
their PTX, and compares them with :func:`kgen.audit.audit_variant` for the same compute
capability. Output: a table and optional JSON. Needs a CUDA GPU of compute capability 8.0 or 9.0.

    python bench/audit_vs_driver.py --json bench/results/h100/audit_vs_driver.json
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from kgen.audit import audit_variant  # noqa: E402
from kgen.audit.asm import ptx_loads  # noqa: E402
from kgen.build import load_kernel  # noqa: E402
from kgen.paths import template_hash  # noqa: E402
from kgen.variant import VariantConfig  # noqa: E402

KEYS = ("paged_decode-d128-b16-g4-s1-t64-w4-st2-bf16", "paged_decode-d128-b16-g4-s4-t64-w4-st2-bf16",
        "paged_decode-d80-b1-g8-s4-t64-w4-st2-fp16", "paged_decode-d256-b256-g1-s1-t32-w4-st2-bf16")


def driver_view(module) -> dict:
    """Kernel name -> (n_regs, n_spills, shared, kv_load_bits) of the JIT-compiled kernels."""
    kv_names = {"k_cache_ptr", "v_cache_ptr"}
    out = {}
    for name in module.KERNELS:
        fn = getattr(module, name)
        kv = {i for i, n in enumerate(fn.arg_names) if n in kv_names}
        for caches in fn.device_caches.values():
            for kernel in caches[0].values():
                kernel._init_handles()
                bits = Counter(l.bits for l in ptx_loads(kernel.asm["ptx"]) if l.params & kv)
                out[name] = (kernel.n_regs, kernel.n_spills, kernel.metadata.shared, dict(bits))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", default=None, metavar="PATH")
    args = parser.parse_args(argv)
    import torch

    from kgen.reference import make_paged_inputs  # imports torch, like the line above

    major, minor = torch.cuda.get_device_capability()
    target = f"sm_{major}{minor}"
    rows, lines = [], ["| variant | kernel | regs driver / audit | spills driver / audit | "
                       "shared driver / audit | K/V bits driver / audit |", "|---|---|---|---|---|---|"]
    for key in KEYS:
        config = VariantConfig.from_key(key)
        module = load_kernel(config)
        inputs = make_paged_inputs(2, 2 * config.group_size, 2, config.head_dim, config.block_size,
                                   [1000, 999], config.dtype, seed=0, device="cuda")
        module.paged_attention_decode(inputs["query"], inputs["key_cache"], inputs["value_cache"],
                                      inputs["block_tables"], inputs["seq_lens"])
        torch.cuda.synchronize()
        seen = driver_view(module)
        audit = {k.name: k for k in audit_variant(config, target).kernels}
        for name, (regs, spills, shared, bits) in seen.items():
            mine = audit.get(name)
            row = {"variant": key, "kernel": name, "driver_regs": regs, "driver_spills": spills,
                   "driver_shared": shared, "driver_kv_bits": bits,
                   "audit_regs": mine and mine.registers, "audit_spill_bytes": mine and mine.spill_bytes,
                   "audit_shared": mine and mine.shared_bytes,
                   "audit_kv_bits": mine and mine.kv_load_bits}
            rows.append(row)
            lines.append(f"| {key} | {name} | {regs} / {row['audit_regs']} | {spills} / "
                         f"{row['audit_spill_bytes']} | {shared} / {row['audit_shared']} | "
                         f"{bits} / {row['audit_kv_bits']} |")
    text = "\n".join([f"# kgen inspect vs the driver on {torch.cuda.get_device_name()} ({target})", ""]
                     + lines)
    print(text)
    result = {"benchmark": "audit_vs_driver", "machine": _common.machine_info(),
              "template_hash": template_hash(), "rows": rows}
    md = str(Path(args.json).with_suffix(".md")) if args.json else None
    _common.write_outputs(result, text, json_path=args.json, md_path=md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
