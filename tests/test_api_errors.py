"""Bad input to load_model() / generate() fails with an error that names the bad value."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import runtime
from helpers_checkpoint import make_llama
from runtime import SamplingParams


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("errors")
    make_llama(path, hidden=32, heads=2, kv_heads=1, layers=1, vocab=64, max_pos=40)
    return path


def _copy(src, dst, *, config=None, weights=None):
    """A copy of checkpoint ``src`` with config.json and/or the weights changed."""
    dst.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(config(cfg) if config else cfg))
    tensors = load_file(src / "model.safetensors")
    save_file(weights(tensors) if weights else tensors, dst / "model.safetensors")
    return dst


@pytest.mark.parametrize("prompts,match", [
    ([[5, 6], []], r"prompts\[1\] is empty"),
    ([""], r"prompts\[0\] is text but the model has no tokenizer.json"),
    ([[5, 64]], r"prompts\[0\] holds token id 64, outside 0..63"),
    ([[5, -1]], r"prompts\[0\] holds token id -1"),
    ([[5, 6.0]], r"prompts\[0\] holds 6.0 of type float; token ids are ints"),  # the type, not the range
    ([[5, 2.0]], r"prompts\[0\] holds 2.0 of type float; token ids are ints"),
    ([[5, True]], r"prompts\[0\] holds True of type bool; token ids are ints"),
    ("just a string", "prompts must be a list"),
    ([[3] * 40], r"prompts\[0\] has 40 tokens; the model's context \(max_position_embeddings=40\)"),
])
def test_bad_prompts(ckpt, prompts, match):
    with pytest.raises(ValueError, match=match):
        runtime.generate(ckpt, prompts)


def test_prompt_longer_than_the_pool(ckpt):
    with pytest.raises(ValueError, match=r"prompts\[0\] \(request 0: 20 prompt tokens \+ max_tokens=1\) needs up to "
                                         r"5 KV blocks of 4 \(5 to admit its prompt\); the KV pool has num_blocks=4"):
        runtime.generate(ckpt, [[3] * 20], SamplingParams(max_tokens=1), block_size=4, num_blocks=4)


@pytest.mark.parametrize("options,match", [
    ({"backend": "cuda-magic"}, "backend='cuda-magic'"),
    ({"block_size": 0}, "block_size=0"),
    ({"num_blocks": 0}, "num_blocks=0"),
    ({"kv_cache_bytes": 10}, "kv_cache_bytes=10"),
    ({"num_blocks": 4, "kv_cache_bytes": 1 << 20}, "num_blocks=4 and kv_cache_bytes"),
    ({"dtype": "int8"}, "dtype='int8'"),
    ({"sampling_params": [SamplingParams()] * 3}, "one per prompt"),
    ({"backend": "triton", "block_size": 4}, "backend='triton': head_dim=16 is not supported"),
    ({"max_num_seqs": "8"}, "max_num_seqs must be a positive int, got '8'"),
    ({"max_num_batched_tokens": 0}, "max_num_batched_tokens must be an int >= max_num_seqs=256, got 0"),
    ({"seed": "7"}, "seed='7' must be an int or None"),
    ({"seed": 1.5}, "seed=1.5 must be an int or None"),
    ({"device": "tpu"}, "device='tpu' is not a device torch knows"),
    ({"kv_cache_dtype": "int4"}, "kv_cache_dtype='int4' is not supported; use one of auto, fp8, fp8_e4m3"),
    ({"num_threads": 0}, "num_threads=0 must be a positive int"),
    ({"num_threads": 1000}, r"num_threads=1000 exceeds the \d+ CPUs this process may run on"),
    ({"calculate_kv_scales": "yes"}, "calculate_kv_scales='yes' must be True or False"),
    ({"sampling_params": SamplingParams(stop_token_ids=[10**9])},
     r"stop_token_ids holds token id 1000000000, outside 0..63 \(the vocabulary\)"),
])
def test_bad_engine_options(ckpt, options, match):
    with pytest.raises(ValueError, match=match):
        runtime.generate(ckpt, [[3, 4]], **options)


def test_calculate_kv_scales_without_an_fp8_cache_is_warned_about_and_ignored(ckpt):
    """Harmless (there is nothing to calibrate), so a warning, not an error."""
    with pytest.warns(RuntimeWarning, match="calculate_kv_scales=True has no effect with kv_cache_dtype='auto'"):
        out = runtime.generate(ckpt, [[3, 4]], SamplingParams(max_tokens=2), calculate_kv_scales=True)
    assert out.stats["k_scales"] == [1.0] * len(out.stats["k_scales"])
    with pytest.raises(ValueError, match="calculate_kv_scales=1 must be True or False"):
        runtime.Engine(runtime.load_model(ckpt, device="cpu"), num_blocks=8, calculate_kv_scales=1)


def test_generation_is_capped_by_the_context(ckpt):
    out = runtime.generate(ckpt, [[3] * 30], SamplingParams(max_tokens=50, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 10 and out[0].outputs[0].finish_reason == "length"


def test_unknown_architecture(ckpt, tmp_path):
    bad = _copy(ckpt, tmp_path / "gpt", config=lambda c: {**c, "architectures": ["GPTNeoXForCausalLM"]})
    with pytest.raises(ValueError, match="architecture='GPTNeoXForCausalLM' is not supported"):
        runtime.load_model(bad)


def test_missing_weight(ckpt, tmp_path):
    name = "model.layers.0.mlp.up_proj.weight"
    bad = _copy(ckpt, tmp_path / "missing", weights=lambda w: {k: v for k, v in w.items() if k != name})
    with pytest.raises(ValueError, match=f"weight '{name}' is missing"):
        runtime.generate(bad, [[3, 4]])


def test_mismatched_weight_shape(ckpt, tmp_path):
    name = "model.layers.0.self_attn.k_proj.weight"
    bad = _copy(ckpt, tmp_path / "shape", weights=lambda w: {**w, name: torch.zeros(32, 32)})
    with pytest.raises(ValueError, match=rf"weight '{name}' has shape \(32, 32\), expected \(16, 32\)"):
        runtime.load_model(bad)


def test_config_that_does_not_match_the_weights(ckpt, tmp_path):
    bad = _copy(ckpt, tmp_path / "layers", config=lambda c: {**c, "num_hidden_layers": 2})
    with pytest.raises(ValueError, match=r"weight 'model.layers.1\..*' is missing"):
        runtime.load_model(bad)
    extra = _copy(ckpt, tmp_path / "extra", weights=lambda w: {**w, "model.layers.0.mlp.extra.weight": torch.ones(2)})
    with pytest.raises(ValueError, match="weight 'model.layers.0.mlp.extra.weight' in the checkpoint is not part"):
        runtime.load_model(extra)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        runtime.load_model(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        runtime.load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "vocab_size": 8,
                                                      "hidden_size": 8, "intermediate_size": 8,
                                                      "num_hidden_layers": 1, "num_attention_heads": 2}))
    with pytest.raises(FileNotFoundError, match="has neither model.safetensors"):
        runtime.load_model(tmp_path)
    index = tmp_path / "model.safetensors.index.json"
    index.write_text("{}")
    with pytest.raises(ValueError, match="model.safetensors.index.json in .* has no 'weight_map'"):
        runtime.load_model(tmp_path)
    index.write_text(json.dumps({"weight_map": {"model.norm.weight": "model-00001.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="shard 'model-00001.safetensors' named in"):
        runtime.load_model(tmp_path)


def test_loaded_model_options_must_agree(ckpt):
    loaded = runtime.load_model(ckpt, device="cpu")
    with pytest.raises(ValueError, match="dtype='bf16' differs"):
        runtime.generate(loaded, [[3]], dtype="bf16")
    with pytest.raises(ValueError, match="model=42"):
        runtime.generate(42, [[3]])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without a usable CUDA device")
def test_cuda_device_without_cuda(ckpt):
    for call in (lambda: runtime.generate(ckpt, [[3, 4]], device="cuda"),
                 lambda: runtime.load_model(ckpt, device="cuda:0")):
        with pytest.raises(ValueError, match=r"device='cuda(:0)?' but CUDA is not available"):
            call()


def test_engine_seed_must_be_an_int(ckpt):
    loaded = runtime.load_model(ckpt, device="cpu")
    for bad in ("1", 2.0, True):
        with pytest.raises(ValueError, match=f"seed={bad!r} must be an int or None"):
            runtime.Engine(loaded, num_blocks=8, seed=bad)
