"""generate() in bfloat16 and float16 on the CPU: the native path is taken and said in stats; its
greedy tokens equal transformers' in the same dtype, or part from them only where the float32
model has a near-tie (bench/e2e_parity.py's report); the build without BF16 instructions agrees;
and a mixed prefill + decode step over permuted, shared, garbage-filled blocks stays within
rounding of float32 transformers."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import runtime
from helpers_checkpoint import make_family, make_llama, random_prompts
from runtime.native_build import native_info
from test_model_parity import NATIVE, mixed_step

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import e2e_parity  # noqa: E402

pytestmark = pytest.mark.skipif(bool(NATIVE), reason=str(NATIVE))
NEAR_TIE = {torch.bfloat16: 0.1, torch.float16: 0.02}
"""nats: float32 log-probability gaps below which a dtype's rounding may pick either token (this
model's median gap between its top two tokens is about 0.3; its bfloat16 runs part at 0.002-0.04)."""
PROMPTS = random_prompts([2, 17, 40, 5, 33, 64], 160, seed=4)


def _model(path):
    return make_llama(path, layers=3, init_std=0.1, hidden=128, heads=4, kv_heads=2, vocab=160)   # head_dim 32


def hf_greedy_tokens(hf, prompts, n):
    """transformers' greedy tokens, one prompt at a time, stopping at EOS as generate() does."""
    outs = []
    for p in prompts:
        ids = torch.tensor([p])
        with torch.no_grad():
            seq = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                              pad_token_id=0)
        outs.append(seq[0, len(p):].tolist())
    return outs


def assert_parts_only_at_near_ties(fp32_hf, prompts, ref, got, dtype):
    """Where ``got`` leaves ``ref``, the float32 model's two tokens are nearly tied: closer than
    the dtype's rounding reaches, and far closer than its usual top-two gap."""
    report = e2e_parity.rounding_report(fp32_hf, prompts, ref, {"got": got})
    usual = report["fp32_top2_gap_median"]
    for d in report["engines"]["got"]["divergences"]:
        assert d["gap"] < NEAR_TIE[dtype] and d["gap"] < usual / 4, (d, usual)
    return report


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_generate_takes_the_native_path_and_matches_transformers(tmp_path, dtype):
    hf = _model(tmp_path)
    outs = runtime.generate(tmp_path, PROMPTS, runtime.SamplingParams(max_tokens=24), dtype=dtype)
    path, info = outs.stats["cpu_path"], native_info()
    assert outs.stats["backend"] == "native" and path["elementwise"] == "native"
    assert path["dtype"] == str(dtype)[6:] and f"native paged decode, {str(dtype)[6:]}" in path["decode"]
    assert path["isa"] == info["isa"] and path["bf16_dot"] == (info["bf16_dot"] and dtype == torch.bfloat16)
    native_bf16 = dtype == torch.bfloat16 and info["bf16_gemm"]
    assert path["linear"] == ("native_gemm" if native_bf16 else "onednn_packed") or path["linear"] == "aten"
    got = [o.outputs[0].token_ids for o in outs]
    ref = hf_greedy_tokens(hf.to(dtype), PROMPTS, 24)
    assert_parts_only_at_near_ties(hf.float(), PROMPTS, ref, got, dtype)


@pytest.mark.parametrize("family,config", [
    ("mistral", dict(sliding_window=8)),                                       # a window the kernel honours
    ("qwen2", {}),                                                             # biased q/k/v projections
    ("qwen3", dict(head_dim=32)),                                              # per-head q/k norms in torch
    ("gemma2", dict(sliding_window=8, head_dim=64, query_pre_attn_scalar=48, attn_logit_softcapping=20.0,
                    final_logit_softcapping=30.0)),                            # soft-caps, (1 + w) norms in fp32
])
def test_bf16_families_match_transformers_up_to_near_ties(tmp_path, family, config):
    hf = make_family(tmp_path, family, hidden=128, heads=4, kv_heads=2, layers=3, init_std=0.1, **config)
    prompts = random_prompts([5, 19, 33], 128, seed=1)
    outs = runtime.generate(tmp_path, prompts, runtime.SamplingParams(max_tokens=16), dtype=torch.bfloat16)
    assert outs.stats["backend"] == "native" and outs.stats["cpu_path"]["elementwise"].startswith("native")
    ref = hf_greedy_tokens(hf.to(torch.bfloat16), prompts, 16)
    assert_parts_only_at_near_ties(hf.float(), prompts, ref, [o.outputs[0].token_ids for o in outs], torch.bfloat16)


def test_bf16_build_without_bf16_instructions_agrees(tmp_path):
    """A CPU without AVX512-BF16 (forced: KGEN_NATIVE_BF16=0 for the C kernels, oneDNN capped at
    AVX-512 core): the fallback path says so in stats and its tokens agree with the usual path's
    (equal, or parting only at near-ties)."""
    hf = _model(tmp_path)
    params = runtime.SamplingParams(max_tokens=24)
    usual = [o.outputs[0].token_ids for o in runtime.generate(tmp_path, PROMPTS, params, dtype=torch.bfloat16)]
    code = ("import json, sys, torch, runtime\n"
            f"o = runtime.generate({str(tmp_path)!r}, {PROMPTS!r}, runtime.SamplingParams(max_tokens=24), "
            "dtype=torch.bfloat16)\n"
            "print(json.dumps([[r.outputs[0].token_ids for r in o], o.stats['cpu_path']]))\n")
    env = dict(os.environ, KGEN_NATIVE_BF16="0", ONEDNN_MAX_CPU_ISA="AVX512_CORE",
               PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    tokens, path = json.loads(done.stdout.strip().splitlines()[-1])
    assert path["bf16_dot"] is False and path["isa"] != "avx512_bf16" and "VDPBF16PS" not in path["decode"]
    assert path["decode"].startswith("native paged decode, bfloat16")
    assert path["linear"] in ("onednn_packed", "aten")  # no VDPBF16PS GEMM in that build
    assert_parts_only_at_near_ties(hf, PROMPTS, usual, tokens, torch.bfloat16)


def test_bf16_mixed_step_over_shared_blocks_is_within_rounding_of_float32(tmp_path):
    """One forward over a cached-prefix prefill, a whole prefill and decodes whose blocks are
    shared and permuted in a garbage-filled bfloat16 cache: the native backend's logits equal the
    torch backend's to bfloat16 rounding, and both are near float32 transformers'."""
    from runtime.attention import make_decode_backend
    from runtime.loader import load_model

    hf = make_llama(tmp_path, hidden=64, heads=4, kv_heads=2, head_dim=16, layers=3, vocab=128)
    model = load_model(tmp_path, device="cpu", dtype=torch.bfloat16).model
    g = torch.Generator().manual_seed(3)
    prefix = torch.randint(3, 128, (16,), generator=g).tolist()
    prompts = [prefix + torch.randint(3, 128, (n,), generator=g).tolist() for n in (19, 1, 18)]
    prompts.insert(1, torch.randint(3, 128, (16,), generator=g).tolist())
    logits = {}
    for name in ("native", "torch"):
        torch.manual_seed(0)  # the same garbage in both caches
        backend = make_decode_backend(name, block_size=16, num_heads=4, num_kv_heads=2, head_dim=16,
                                      dtype=torch.bfloat16, device=torch.device("cpu"), num_blocks=64)
        logits[name], _ = mixed_step(model, prompts, 16, shared=16, backend=backend)
    with torch.no_grad():
        ref = torch.stack([hf(torch.tensor([p])).logits[0, -1] for p in prompts])
    assert logits["native"].dtype == torch.float32
    torch.testing.assert_close(logits["native"], logits["torch"], rtol=0.02, atol=0.05)
    torch.testing.assert_close(logits["native"], ref, rtol=0.05, atol=0.1)
    assert (logits["native"] - ref).abs().max() > 1e-3   # really computed in bfloat16
