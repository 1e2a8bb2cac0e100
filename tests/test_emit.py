"""An emitted module works on its own: imported by path in a fresh process where ``import kgen``
fails, checked against a float64 reference computed there with torch only."""

import os
import subprocess
import sys
import textwrap

import pytest

from helpers_kernels import run_emitted
from kgen.cli import main

CHECK = textwrap.dedent('''
    import importlib.util, sys
    sys.modules["kgen"] = None  # any import of kgen now raises ImportError
    import torch

    spec = importlib.util.spec_from_file_location("emitted", sys.argv[1])
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = mod.CONFIG
    bs, d, g, kv = cfg["block_size"], cfg["head_dim"], cfg["group_size"], 2
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[cfg["dtype"]]
    gen = torch.Generator().manual_seed(0)
    lens = [0, 1, bs - 1, bs, bs + 1, 300]
    need = [-(-n // bs) for n in lens]
    num_blocks = sum(need) + 2
    perm = torch.randperm(num_blocks, generator=gen)
    tables = torch.randint(num_blocks, 10 * num_blocks, (len(lens), max(need) + 1), generator=gen)
    start = 0
    for s, nb in enumerate(need):
        tables[s, :nb] = perm[start:start + nb]
        start += nb
    tables[3, 0] = tables[5, 0]  # a block shared by two sequences (both full there)
    k = torch.randn(num_blocks, bs, kv, d, generator=gen).to(dtype)
    v = torch.randn(num_blocks, bs, kv, d, generator=gen).to(dtype)
    q = torch.randn(len(lens), kv * g, d, generator=gen).to(dtype)
    out = torch.full_like(q, float("nan"))
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    args = [t.to(dev) for t in (q, k, v, tables.int(), torch.tensor(lens, dtype=torch.int32), out)]
    mod.paged_attention_decode(*args[:5], out=args[5], validate=True)
    out = args[5].cpu()
    worst = 0.0
    for s, n in enumerate(lens):
        idx = torch.arange(n)
        pages = tables[s, idx // bs].long()
        ks = k[pages, idx % bs].double().repeat_interleave(g, dim=1)  # [n, heads, d]
        vs = v[pages, idx % bs].double().repeat_interleave(g, dim=1)
        w = torch.softmax(torch.einsum("hd,nhd->hn", q[s].double(), ks) / d ** 0.5, dim=-1)
        ref = torch.einsum("hn,nhd->hd", w, vs) if n else torch.zeros(kv * g, d, dtype=torch.float64)
        worst = max(worst, float((out[s].double() - ref).abs().max()))
    print(mod.VARIANT_KEY, worst)
    assert worst < float(sys.argv[2]), worst
    assert "kgen" not in [m.split(".")[0] for m in sys.modules if sys.modules[m] is not None]
''')


@pytest.mark.parametrize("options, tol", [
    (["--head-dim", "128", "--block-size", "16", "--group-size", "4", "--split-k", "4",
      "--dtype", "bf16"], 5e-2),
    (["--head-dim", "96", "--block-size", "32", "--group-size", "3", "--split-k", "auto",
      "--dtype", "fp16", "--tile-tokens", "16"], 5e-3),
    (["--head-dim", "64", "--block-size", "8", "--dtype", "fp32"], 1e-4),
])
def test_emitted_module_runs_without_kgen(tmp_path, capsys, options, tol):
    path = tmp_path / "decode.py"
    assert main(["emit", *options, "-o", str(path)]) == 0
    assert path.name in capsys.readouterr().out
    text = path.read_text()
    assert "kgen" not in "".join(line for line in text.splitlines() if line.startswith(("import", "from")))
    env = {**os.environ, "PYTHONPATH": ""}
    result = subprocess.run([sys.executable, "-I", "-c", CHECK, str(path), str(tol)], cwd=tmp_path,
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("paged_decode-")


def test_emitted_feature_module_runs_without_kgen(tmp_path):
    """An fp8, every-feature module: run in a process without kgen on inputs made here, compared
    here with the float64 reference."""
    import torch

    from kgen.reference import make_paged_inputs, paged_attention_reference, within_tolerance

    kv_dtype, split = "fp8_e4m3", "auto"
    path = tmp_path / "decode.py"
    assert main(["emit", "--head-dim", "64", "--block-size", "16", "--group-size", "2",
                 "--dtype", "fp16", "--kv-dtype", kv_dtype, "--split-k", split, "--features",
                 "sliding_window,soft_cap,alibi,sinks", "-o", str(path)]) == 0
    inputs = make_paged_inputs(4, 4, 2, 64, 16, [0, 9, 40, 90], "fp16", seed=2,
                               poison_unused=True, kv_dtype=kv_dtype, scale_kind="head",
                               features="sliding_window,soft_cap,alibi,sinks", sliding_window=33)
    out, key = run_emitted(path, inputs, "paged_attention_decode", tmp_path)
    assert key.endswith(f"fp16-kvfp8{kv_dtype[4:].replace('_', '')}-swa-cap-alibi-sinks")
    assert within_tolerance(out, paged_attention_reference(**inputs), "fp16")
