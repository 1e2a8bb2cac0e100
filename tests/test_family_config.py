"""Reading each family's config.json: transformers' defaults and windows, refusals by field name."""

import json

import pytest

from runtime.config import ModelConfig
from runtime.model.families import SUPPORTED_ARCHITECTURES

SIZES = {"vocab_size": 100, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 5,
         "num_attention_heads": 4, "num_key_value_heads": 2}
CLASSES = {"LlamaForCausalLM": "LlamaConfig", "MistralForCausalLM": "MistralConfig",
           "Qwen2ForCausalLM": "Qwen2Config", "Qwen3ForCausalLM": "Qwen3Config",
           "Gemma2ForCausalLM": "Gemma2Config"}


def _hf(arch, fields):
    """transformers' config for ``fields`` as a config.json would hold it after save_pretrained."""
    import transformers

    cfg = getattr(transformers, CLASSES[arch])(**fields)
    return cfg, {**json.loads(cfg.to_json_string()), "architectures": [arch]}


def _hf_windows(arch, cfg):
    """Per-layer window as transformers' attention modules take it."""
    if arch == "LlamaForCausalLM":
        return [None] * cfg.num_hidden_layers
    if arch == "MistralForCausalLM":
        return [cfg.sliding_window] * cfg.num_hidden_layers
    return [cfg.sliding_window if t == "sliding_attention" else None for t in cfg.layer_types]


@pytest.mark.parametrize("arch,fields", [
    ("LlamaForCausalLM", {}),
    ("MistralForCausalLM", {}),                                    # window default 4096
    ("MistralForCausalLM", {"sliding_window": 6}),
    ("MistralForCausalLM", {"sliding_window": None}),
    ("Qwen2ForCausalLM", {}),                                      # use_sliding_window default false
    ("Qwen2ForCausalLM", {"sliding_window": 6}),                   # window given but not used
    ("Qwen2ForCausalLM", {"use_sliding_window": True, "sliding_window": 6, "max_window_layers": 2}),
    ("Qwen3ForCausalLM", {"use_sliding_window": True, "sliding_window": 6, "max_window_layers": 0}),
    ("Qwen3ForCausalLM", {"head_dim": 24, "attention_bias": True}),
    ("Gemma2ForCausalLM", {}),                                     # head_dim 256, alternating windows
    ("Gemma2ForCausalLM", {"sliding_window": 6, "head_dim": 16, "query_pre_attn_scalar": 20,
                           "attn_logit_softcapping": None, "layer_types": ["full_attention"] * 2
                           + ["sliding_attention"] * 3}),
])
def test_fields_resolve_as_in_transformers(arch, fields):
    fields = {**SIZES, "max_position_embeddings": 8192, **fields}
    hf, saved = _hf(arch, fields)
    minimal = {**fields, "architectures": [arch]}  # what a hand-written config.json may hold
    for data in (saved, minimal):
        ours = ModelConfig.from_dict(data)
        assert ours.architecture == arch
        assert ours.head_dim == (getattr(hf, "head_dim", None) or 64 // 4)
        assert list(ours.layer_windows) == _hf_windows(arch, hf)
        assert ours.tie_word_embeddings == hf.tie_word_embeddings
        for i in range(hf.num_hidden_layers):
            la = ours.layer_attention(i)
            assert la.sliding_window == _hf_windows(arch, hf)[i]
            if arch == "Gemma2ForCausalLM":
                assert la.scale == hf.query_pre_attn_scalar ** -0.5
                assert la.logits_soft_cap == hf.attn_logit_softcapping
                assert ours.final_logit_softcapping == hf.final_logit_softcapping
            else:
                assert la.scale == ours.head_dim ** -0.5 and la.logits_soft_cap is None


def test_biases_per_family():
    def biases(arch, **fields):
        c = ModelConfig.from_dict({**SIZES, "architectures": [arch], **fields})
        return c.qkv_bias, c.o_bias, c.mlp_bias

    assert biases("Qwen2ForCausalLM") == (True, False, False)
    assert biases("Qwen2ForCausalLM", attention_bias=False) == (True, False, False)  # transformers ignores it
    assert biases("MistralForCausalLM", attention_bias=True) == (False, False, False)
    assert biases("Qwen3ForCausalLM", attention_bias=True, mlp_bias=True) == (True, True, False)
    assert biases("LlamaForCausalLM", attention_bias=True, mlp_bias=True) == (True, True, True)


def test_shared_window_for_the_memory_manager():
    def shared(arch, **fields):
        return ModelConfig.from_dict({**SIZES, "architectures": [arch], "max_position_embeddings": 512,
                                      **fields}).sliding_window

    assert shared("MistralForCausalLM", sliding_window=32) == 32
    assert shared("Qwen2ForCausalLM", use_sliding_window=True, sliding_window=32, max_window_layers=0) == 32
    assert shared("Qwen2ForCausalLM", use_sliding_window=True, sliding_window=32, max_window_layers=1) is None
    assert shared("Gemma2ForCausalLM", sliding_window=32) is None       # full layers between
    assert shared("LlamaForCausalLM") is None
    # a window no position can outgrow is no window (the triton backend need not refuse it)
    assert shared("MistralForCausalLM", sliding_window=512) is None


def test_unsupported_architecture_lists_the_supported_ones():
    with pytest.raises(ValueError, match="architecture='Gemma3ForCausalLM' is not supported; supported: "
                                         + ", ".join(SUPPORTED_ARCHITECTURES)):
        ModelConfig.from_dict({**SIZES, "architectures": ["Gemma3ForCausalLM"]})
    assert len(SUPPORTED_ARCHITECTURES) == 5
    assert ModelConfig.from_dict({**SIZES, "model_type": "qwen3"}).architecture == "Qwen3ForCausalLM"


@pytest.mark.parametrize("arch,fields,match", [
    ("LlamaForCausalLM", {"quantization_config": {"quant_method": "gptq", "bits": 4}},
     "quantization_config='gptq' is not supported"),
    ("Gemma2ForCausalLM", {"use_bidirectional_attention": True}, "use_bidirectional_attention=True"),
    ("Gemma2ForCausalLM", {"hidden_activation": "gelu_new"}, "hidden_activation='gelu_new' is not supported"),
    ("Gemma2ForCausalLM", {"hidden_act": "gelu", "hidden_activation": "relu"}, "hidden_activation='relu'"),
    ("MistralForCausalLM", {"hidden_act": "relu"}, "hidden_act='relu' is not supported"),
    ("MistralForCausalLM", {"sliding_window": 0}, "sliding_window=0 must be a positive int"),
    ("Gemma2ForCausalLM", {"layer_types": ["full_attention"] * 4 + ["chunked_attention"]},
     r"layer_types\[4\]='chunked_attention' is not supported"),
    ("Gemma2ForCausalLM", {"layer_types": ["full_attention"] * 2}, "must be a list of 5 entries"),
    ("Gemma2ForCausalLM", {"sliding_window": None}, "names 'sliding_attention' layers .* sliding_window is null"),
    ("Qwen2ForCausalLM", {"layer_types": ["sliding_attention"] * 5}, "use_sliding_window is false"),
    ("Qwen2ForCausalLM", {"use_sliding_window": True, "max_window_layers": -1}, "max_window_layers=-1"),
    ("Gemma2ForCausalLM", {"query_pre_attn_scalar": 0}, "query_pre_attn_scalar=0"),
    ("Gemma2ForCausalLM", {"attn_logit_softcapping": -1.0}, "attn_logit_softcapping=-1.0"),
    ("Gemma2ForCausalLM", {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e4},
                                               "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}},
     "per-layer-type RoPE"),
    ("LlamaForCausalLM", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}, "partial_rotary_factor": 0.5},
     "partial_rotary_factor=0.5"),
    ("LlamaForCausalLM", {"architectures": "LlamaForCausalLM"}, "architectures='LlamaForCausalLM' must be a list"),
    ("LlamaForCausalLM", {"max_position_embeddings": "4k"}, "max_position_embeddings='4k' must be a positive int"),
    ("Qwen3ForCausalLM", {"rms_norm_eps": 0}, "rms_norm_eps=0 must be a positive number"),
])
def test_math_changing_fields_are_refused_by_name(arch, fields, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_dict({**SIZES, "architectures": [arch], **fields})
