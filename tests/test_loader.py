"""Loading Hugging Face Llama folders: config spellings, RoPE scaling, shards, dtypes, tokenizer."""

import json

import pytest
import torch

from helpers_checkpoint import make_llama
from runtime.config import ModelConfig
from runtime.loader import load_model

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64, "rope_theta": 500000.0}


def _base_config(**changes):
    data = {"architectures": ["LlamaForCausalLM"], "vocab_size": 100, "hidden_size": 64,
            "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 512, "eos_token_id": [2, 7]}
    data.update(changes)
    return data


@pytest.mark.parametrize("head_dim", [16, 32])
def test_llama3_inv_freq_matches_transformers(head_dim):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_cfg = LlamaConfig(hidden_size=64, num_attention_heads=64 // head_dim, head_dim=head_dim,
                         rope_scaling=dict(LLAMA3_ROPE), rope_theta=500000.0, max_position_embeddings=512)
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
    ours = ModelConfig.from_dict(json.loads(hf_cfg.to_json_string()) | {"architectures": ["LlamaForCausalLM"],
                                                                        "vocab_size": 10,
                                                                        "intermediate_size": 8,
                                                                        "num_hidden_layers": 1})
    assert ours.rope_scaling["rope_type"] == "llama3"
    plain = 1.0 / (500000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    assert not torch.allclose(ref, plain)  # the scaling really changes something here
    torch.testing.assert_close(ours.inv_freq(), ref.float(), rtol=1e-6, atol=0)


def test_both_rope_spellings_parse_the_same():
    old = ModelConfig.from_dict(_base_config(rope_theta=500000.0, rope_scaling={
        k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"}))
    new = ModelConfig.from_dict(_base_config(rope_parameters=dict(LLAMA3_ROPE)))
    legacy_type = ModelConfig.from_dict(_base_config(rope_theta=500000.0, rope_scaling={
        "type": "llama3", **{k: v for k, v in LLAMA3_ROPE.items() if k not in ("rope_theta", "rope_type")}}))
    assert old.rope_theta == new.rope_theta == legacy_type.rope_theta == 500000.0
    assert old.rope_scaling == new.rope_scaling == legacy_type.rope_scaling
    torch.testing.assert_close(old.inv_freq(), new.inv_freq())
    default = ModelConfig.from_dict(_base_config(rope_parameters={"rope_type": "default", "rope_theta": 1234.0}))
    assert default.rope_theta == 1234.0 and default.rope_scaling is None
    assert ModelConfig.from_dict(_base_config()).eos_token_ids == (2, 7)
    assert ModelConfig.from_dict(_base_config()).head_dim == 16


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="architecture='GPT2LMHeadModel'"):
        ModelConfig.from_dict(_base_config(architectures=["GPT2LMHeadModel"]))
    with pytest.raises(ValueError, match="rope_type='yarn'"):
        ModelConfig.from_dict(_base_config(rope_scaling={"rope_type": "yarn", "factor": 2.0}))
    with pytest.raises(ValueError, match="num_key_value_heads=3"):
        ModelConfig.from_dict(_base_config(num_key_value_heads=3))
    with pytest.raises(ValueError, match="hidden_size"):
        ModelConfig.from_dict(_base_config(hidden_size=0))
    with pytest.raises(ValueError, match="num_key_value_heads=0"):
        ModelConfig.from_dict(_base_config(num_key_value_heads=0))
    with pytest.raises(ValueError, match="num_key_value_heads='2'"):
        ModelConfig.from_dict(_base_config(num_key_value_heads="2"))
    with pytest.raises(ValueError, match="head_dim=0"):
        ModelConfig.from_dict(_base_config(hidden_size=2, num_attention_heads=4))
    with pytest.raises(ValueError, match="head_dim=7"):
        ModelConfig.from_dict(_base_config(head_dim=7))


def _prefill_logits(loaded, ids):
    """Logits of every position of one prompt through the runtime model (block size 4)."""
    from runtime.attention import AttentionMetadata, PrefillSpan

    model = loaded.model
    n = len(ids)
    blocks = -(-n // 4)
    cache = model.make_kv_cache(blocks + 3, 4)
    table = torch.randperm(blocks + 3)[:blocks]
    slots = table.repeat_interleave(4)[:n] * 4 + torch.arange(n) % 4
    meta = AttentionMetadata(slot_mapping=slots, prefills=[PrefillSpan(0, n, 0, n)], num_prefill_tokens=n)
    return model.forward(torch.tensor(ids), torch.arange(n), cache, meta, None, torch.arange(n))


def test_sharded_tied_llama3_checkpoint_matches_transformers(tmp_path):
    hf = make_llama(tmp_path, hidden=64, heads=4, kv_heads=2, layers=2, vocab=96, tie=True,
                    rope=LLAMA3_ROPE, max_shard_size="40KB", max_pos=512)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    loaded = load_model(tmp_path, device="cpu")
    assert loaded.config.tie_word_embeddings
    x = torch.randn(3, 64)
    torch.testing.assert_close(loaded.model.lm_head(x), x @ loaded.model.embed.T, rtol=1e-5, atol=1e-5)
    ids = torch.randint(3, 96, (40,)).tolist()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(_prefill_logits(loaded, ids), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_checkpoints_load_in_their_dtype(tmp_path, dtype):
    hf = make_llama(tmp_path, dtype=dtype, vocab=96)
    loaded = load_model(tmp_path, device="cpu")
    assert loaded.dtype == dtype and loaded.model.embed.dtype == dtype
    assert loaded.config.torch_dtype == dtype
    ids = torch.randint(3, 96, (12,)).tolist()
    with torch.no_grad():
        ref = hf.to(dtype)(torch.tensor([ids])).logits[0].float()
    got = _prefill_logits(loaded, ids)
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()
    up = load_model(tmp_path, device="cpu", dtype="float32")  # upcast on load
    assert up.dtype == torch.float32 and up.model.layers[0].qkv.dtype == torch.float32


def test_tokenizer_is_loaded_when_present(tmp_path):
    make_llama(tmp_path, vocab=96, tokenizer=True)
    loaded = load_model(tmp_path, device="cpu")
    assert loaded.tokenizer is not None
    ids = loaded.tokenizer.encode("the cat sat").ids
    assert ids == [3, 4, 5]
    assert loaded.tokenizer.decode(ids) == "the cat sat"
    make_llama(tmp_path / "plain", vocab=96)
    assert load_model(tmp_path / "plain", device="cpu").tokenizer is None
