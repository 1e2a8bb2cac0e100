"""runtime.generate() on a CUDA GPU with kgen's compiled kernels, against Hugging Face.

Marked ``gpu``: skipped without CUDA (see conftest.py), run by ``bench/gpu_check.sh``. The CPU
suite runs the triton backend under the interpreter only; here the engine builds its batch
tensors on the GPU, dispatches through the tuning database for the GPU present and decodes with
compiled kernels (head dim 128, GQA group 4, fp32 so that greedy tokens must match exactly).
"""

import pytest

import runtime
from helpers_checkpoint import hf_greedy, make_llama, random_prompts
from runtime import SamplingParams

pytestmark = pytest.mark.gpu

NEW = 12
DEVICE = "cuda"


def test_triton_backend_on_gpu_matches_transformers(tmp_path):
    pytest.importorskip("transformers", reason="the reference model is Hugging Face's")
    hf = make_llama(tmp_path, hidden=256, heads=4, kv_heads=1, head_dim=128, layers=2, vocab=256,
                    seed=7, eos_token_id=None)  # no EOS: every request runs NEW tokens
    prompts = random_prompts([1, 15, 16, 17, 100], 256, seed=7)  # around block edges of 16
    outs = runtime.generate(tmp_path, prompts, SamplingParams(max_tokens=NEW), block_size=16,
                            backend="triton", device=DEVICE)
    assert outs.stats["backend"] == "triton"
    for prompt, out in zip(prompts, outs):
        ref_ids, ref_logprob = hf_greedy(hf, prompt, NEW)
        assert out.outputs[0].token_ids == ref_ids
        assert out.outputs[0].cumulative_logprob == pytest.approx(ref_logprob, abs=1e-3)
