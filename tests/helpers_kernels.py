"""Helpers shared by the kernel tests: non-contiguous copies of the contract's tensors."""

import os
import subprocess
import sys
import textwrap

import torch

# L18 orthogonal array, levels 1..3 (column 1 has two): the pairwise design of the feature suites.
# Columns: window, dtype, kv dtype, split, scale form, soft cap, alibi, sinks; a 3-level column
# drives a 2-level factor as 1 -> off, 2/3 -> on.
L18 = ("11111111 11222222 11333333 12112233 12223311 12331122 13121323 13232131 13313212 "
       "21133221 21211332 21322113 22123132 22231213 22312321 23132312 23213123 23321231").split()


def strided(t: torch.Tensor) -> torch.Tensor:
    """The same values in a non-contiguous view: the two dims before head_dim swapped in storage
    (HND pages for caches, head-major for query/out) and 8 padding elements after each row."""
    perm = list(range(t.dim()))
    perm[-3], perm[-2] = perm[-2], perm[-3]
    storage_shape = [t.shape[p] for p in perm]
    storage_shape[-1] += 8
    big = torch.full(storage_shape, float("nan"), dtype=t.dtype, device=t.device)
    view = big.permute(*perm)[..., : t.shape[-1]]  # permute is its own inverse here
    view.copy_(t)
    return view


def strided_index_view(t: torch.Tensor, garbage: int) -> torch.Tensor:
    """An integer tensor (seq_lens [n] or block_tables [n, m]) as a view with non-unit strides:
    every other element of a larger buffer along each dim, the others holding ``garbage`` (a value
    that gives a wrong result, or an out-of-range block id, if a kernel reads it)."""
    big = torch.full([2 * s + 1 for s in t.shape], garbage, dtype=t.dtype, device=t.device)
    view = big[tuple(slice(1, None, 2) for _ in t.shape)]
    view.copy_(t)
    assert not view.is_contiguous() and all(s % 2 == 0 for s in view.stride())
    return view


def make_strided(inputs: dict, out: torch.Tensor, *, noncontig: bool, index_views: bool,
                 index_garbage=(("seq_lens", 1), ("block_tables", 0))) -> torch.Tensor:
    """Replace the contract's tensors in ``inputs`` by strided views holding the same values:
    query and caches (and ``out``, returned) with ``noncontig``; the integer tensors named in
    ``index_garbage`` (with the value between their elements) with ``index_views``."""
    if noncontig:
        for name in ("query", "key_cache", "value_cache"):
            inputs[name] = strided(inputs[name])
        out = strided(out)
    if index_views:
        for name, garbage in index_garbage:
            inputs[name] = strided_index_view(inputs[name], garbage=garbage)
    return out


_RUN_EMITTED = textwrap.dedent('''
    import importlib.util, sys
    sys.modules["kgen"] = None  # any import of kgen now raises ImportError
    import torch

    spec = importlib.util.spec_from_file_location("emitted", sys.argv[1])
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    inputs = torch.load(sys.argv[2])
    out = torch.full_like(inputs["query"], float("nan"))
    getattr(mod, sys.argv[4])(**inputs, out=out, validate=True)
    torch.save(out, sys.argv[3])
    print(mod.VARIANT_KEY)
    assert "kgen" not in [m.split(".")[0] for m in sys.modules if sys.modules[m] is not None]
''')


def run_emitted(path, inputs: dict, entry_point: str, folder) -> tuple[torch.Tensor, str]:
    """Run the emitted module at ``path`` in a fresh process where ``import kgen`` fails:
    ``entry_point(**inputs, out=NaN-filled, validate=True)``. Returns (out, the module's key)."""
    torch.save(inputs, folder / "inputs.pt")
    env = {**os.environ, "PYTHONPATH": ""}
    result = subprocess.run([sys.executable, "-I", "-c", _RUN_EMITTED, str(path),
                             str(folder / "inputs.pt"), str(folder / "out.pt"), entry_point],
                            cwd=folder, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(folder / "out.pt"), result.stdout.strip()
