"""Compiled kernels on a CUDA GPU against the float64 reference: what the interpreter cannot test.

Marked ``gpu``: skipped without CUDA (see conftest.py), run by ``bench/gpu_check.sh``. Under the
interpreter bf16 dots run in fp32 (its bf16 ``tl.dot`` is wrong), so only here do the bf16
tensor-core dots run; only here are contexts long enough for many split-K partitions cheap; and
only here does dispatch pick a record for a real GPU.

Inputs come from :func:`kgen.reference.make_paged_inputs`: permuted physical blocks, blocks shared
between sequences, garbage table entries past each sequence's end, NaN in every unused cache slot,
and NaN in ``out`` before the call. Tolerances are kgen.reference.TOLERANCES (bf16 3e-2 + 2e-2|ref|).
"""

import re

import pytest
import torch

from kgen.build import load_kernel
from kgen.dispatch import get_dispatcher
from kgen.shape import AttentionShape
from kgen.reference import (TOLERANCES, make_paged_inputs, max_abs_error,
                            paged_attention_reference, within_tolerance)
from kgen.space import default_config
from kgen.variant import SPLIT_AUTO, VariantConfig

pytestmark = pytest.mark.gpu

# head dim, block size, group size, split-K: every group padding (1 -> 16 rows, 16 exactly),
# a padded head dim (80), single pass and split-K with the merge
BF16_CASES = [
    (128, 16, 1, 1), (128, 16, 4, SPLIT_AUTO), (128, 32, 8, 4), (128, 16, 16, SPLIT_AUTO),
    (64, 16, 8, 1), (64, 32, 1, SPLIT_AUTO), (256, 16, 4, 2), (256, 16, 8, SPLIT_AUTO),
    (80, 16, 3, SPLIT_AUTO), (96, 32, 6, 1),
]
DEVICE = "cuda"
MMA_BF16 = re.compile(r"\bw?g?mma[\w.]*\.bf16")  # mma.sync.aligned.m16n8k16...bf16, wgmma...bf16


def _run(config: VariantConfig, lens, *, seed, num_kv_heads=2, **kwargs):
    inputs = make_paged_inputs(len(lens), num_kv_heads * config.group_size, num_kv_heads,
                               config.head_dim, config.block_size, lens, config.dtype, seed=seed,
                               device=DEVICE, poison_unused=True)
    out = torch.full_like(inputs["query"], float("nan"))
    module = load_kernel(config)
    assert module.paged_attention_decode(**inputs, out=out, validate=True, **kwargs) is out
    return module, out, paged_attention_reference(**inputs)


def compiled_ptx(module) -> dict[str, str]:
    """Kernel name -> PTX of the kernels Triton's JIT compiled for this module (what ran)."""
    found = {}
    for name in module.KERNELS:
        for caches in getattr(module, name).device_caches.values():
            for kernel in caches[0].values():
                found[name] = kernel.asm["ptx"]
    return found


@pytest.mark.parametrize("head_dim, block_size, group_size, split_k", BF16_CASES,
                         ids=lambda v: str(v))
def test_bf16_tensor_core_dots_match_float64(head_dim, block_size, group_size, split_k):
    config = default_config(head_dim=head_dim, block_size=block_size, group_size=group_size,
                            dtype="bf16", split_k=split_k)
    bs = block_size
    lens = [0, 1, bs - 1, bs, bs + 1, 1000, 2 * 1024 + 1]
    module, out, ref = _run(config, lens, seed=head_dim + group_size)
    assert within_tolerance(out, ref, "bf16"), \
        f"{config.key}: max abs err {max_abs_error(out, ref):.3g} > {TOLERANCES['bf16']}"
    assert torch.all(out[0] == 0), "an empty context must give exact zeros"
    # the attention kernels ran bf16 tensor-core dots (not the interpreter's fp32 fallback)
    ptx = compiled_ptx(module)
    attend = [name for name in ptx if name != "_merge_kernel"]
    assert attend, f"no compiled kernel found for {config.key}: {sorted(ptx)}"
    for name in attend:
        assert MMA_BF16.search(ptx[name]), f"{config.key} {name}: no bf16 mma in its PTX"


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("num_splits", [None, 66])  # auto, and more partitions than one merge step
def test_long_context_split_k_matches_float64(dtype, num_splits):
    """1 x 32k and 3 shorter sequences, group 8: hundreds of tiles per sequence, the merge kernel
    combining partitions 16 per step (66 -> five steps, the last one partial)."""
    config = default_config(head_dim=128, block_size=16, group_size=8, dtype=dtype,
                            split_k=SPLIT_AUTO)
    lens = [32768, 8191, 4097, 16]
    _, out, ref = _run(config, lens, seed=32, num_kv_heads=1, num_splits=num_splits,
                       max_seq_len=max(lens))
    assert within_tolerance(out, ref, dtype), f"max abs err {max_abs_error(out, ref):.3g}"


def test_dispatch_gives_a_correct_kernel_for_this_gpu():
    """The runtime's door on a real GPU: the GPU's name, a database lookup, a compiled kernel."""
    dispatcher = get_dispatcher()
    assert dispatcher.gpu not in ("interpreter", "synthetic")
    plan = dispatcher.plan(AttentionShape("bf16", 128, 8, block_size=16))
    assert plan.problem is None
    kernel = plan.decode_kernel(num_seqs=4, max_context=8192)
    assert plan.decode_kernel(num_seqs=4, max_context=8192) is kernel  # cached step
    inputs = make_paged_inputs(4, 16, 2, 128, 16, [8192, 5000, 17, 1], "bf16", seed=9,
                               device=DEVICE, poison_unused=True)
    out = torch.full_like(inputs["query"], float("nan"))
    kernel(**inputs, out=out, max_seq_len=8192)
    ref = paged_attention_reference(**inputs)
    assert within_tolerance(out, ref, "bf16"), f"max abs err {max_abs_error(out, ref):.3g}"
    chosen = plan.lookup(num_seqs=4, max_context=8192)
    assert kernel.__globals__["VARIANT_KEY"] == chosen.config.key, chosen.reason
