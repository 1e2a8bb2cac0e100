"""RoPE settings resolved as transformers 5 resolves them, case by case against transformers itself.

Each ``config.json`` goes to both: where transformers refuses it (a RoPE type's required field
missing), the runtime refuses it naming the same field; where transformers accepts a type the
runtime implements, both compute the same inverse frequencies; where transformers picks a type the
runtime does not implement (``dynamic`` from a legacy ``rope_scaling`` next to a plain
``rope_parameters``), the runtime refuses it by name instead of decoding with the other dict.
"""

import json
import re
import warnings

import pytest
import torch

from runtime.config import SUPPORTED_ROPE_TYPES, ModelConfig

L3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 64}
BASE = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 64, "hidden_size": 64,
        "intermediate_size": 96, "num_hidden_layers": 1, "num_attention_heads": 4, "max_position_embeddings": 512}


def _drop(d: dict, key: str) -> dict:
    return {k: v for k, v in d.items() if k != key}


CASES = {
    "llama3 without low_freq_factor": {"rope_scaling": _drop(L3, "low_freq_factor")},
    "llama3 without high_freq_factor": {"rope_parameters": {**_drop(L3, "high_freq_factor"), "rope_theta": 5e5}},
    "llama3 without factor": {"rope_scaling": _drop(L3, "factor")},
    "linear without factor": {"rope_scaling": {"rope_type": "linear"}},
    "llama3 without original_max_position_embeddings": {
        "rope_parameters": {**_drop(L3, "original_max_position_embeddings"), "rope_theta": 5e5}},
    "legacy dynamic beside plain rope_parameters": {
        "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}, "rope_scaling": {"type": "dynamic", "factor": 2.0}},
    "legacy linear beside llama3 rope_parameters": {
        "rope_theta": 2e4, "rope_parameters": {**L3, "rope_theta": 5e5}, "rope_scaling": {"type": "linear", "factor": 4.0}},
    "empty legacy beside linear rope_parameters": {
        "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5}, "rope_scaling": {}},
    "theta inside rope_scaling": {"rope_theta": 2e4, "rope_scaling": {"rope_type": "linear", "factor": 2.0,
                                                                      "rope_theta": 3e4}},
    "legacy type key": {"rope_theta": 5e5, "rope_scaling": {"type": "llama3", **_drop(L3, "rope_type")}},
    "yarn": {"rope_scaling": {"rope_type": "yarn", "factor": 2.0}},
}

WARNED = {"llama3 without original_max_position_embeddings", "legacy linear beside llama3 rope_parameters"}


def _transformers(tmp_path, data):
    """(inverse frequencies, rope_type) from transformers' own config and rotary embedding, or the
    KeyError it raises."""
    from transformers import AutoConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    (tmp_path / "config.json").write_text(json.dumps(data))
    try:
        config = AutoConfig.from_pretrained(tmp_path)
    except KeyError as err:
        return err, None
    kind = config.rope_parameters["rope_type"]
    if kind not in SUPPORTED_ROPE_TYPES:
        return None, kind
    return LlamaRotaryEmbedding(config).inv_freq.float(), kind


@pytest.mark.parametrize("case", list(CASES))
def test_rope_settings_resolve_as_in_transformers(tmp_path, case):
    data = {**BASE, **CASES[case]}
    ref, kind = _transformers(tmp_path, data)
    if isinstance(ref, KeyError):  # transformers: "Missing required keys ...: {'low_freq_factor'}"
        fields = re.findall(r"'(\w+)'", str(ref).split(":")[-1])
        with pytest.raises(ValueError, match="needs the field") as err:
            ModelConfig.from_dict(data)
        assert fields and all(f in str(err.value) for f in fields)
    elif ref is None:  # a type transformers knows and the runtime does not implement
        with pytest.raises(ValueError, match=f"rope_type='{kind}' is not supported"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # "rope_scaling is used": said, then refused
            ModelConfig.from_dict(data)
    else:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ours = ModelConfig.from_dict(data)
        # a default transformers fills in, or a dict transformers ignores, is said once
        assert len([w for w in caught if issubclass(w.category, RuntimeWarning)]) == (case in WARNED)
        torch.testing.assert_close(ours.inv_freq(), ref, rtol=1e-6, atol=0)


def test_the_cases_cover_every_outcome(tmp_path):
    """Refusals, agreements and unsupported types all occur, and scaling really changes frequencies."""
    plain = ModelConfig.from_dict(BASE).inv_freq()
    outcomes = set()
    for i, extra in enumerate(CASES.values()):
        (tmp_path / str(i)).mkdir()
        ref, kind = _transformers(tmp_path / str(i), {**BASE, **extra})
        outcomes.add("refused" if isinstance(ref, KeyError) else "unsupported" if ref is None else kind)
        if isinstance(ref, torch.Tensor):
            assert not torch.allclose(ref, plain)
    assert outcomes == {"refused", "unsupported", "linear", "llama3"}


@pytest.mark.parametrize("rope,match", [
    ({"rope_scaling": {"rope_type": "linear", "factor": "2"}}, "factor='2'"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 0}}, "factor=0"),
    ({"rope_scaling": {**L3, "high_freq_factor": 1.0}}, "high_freq_factor=1.0 must be greater"),
    ({"rope_scaling": {**L3, "original_max_position_embeddings": 64.5}}, "original_max_position_embeddings=64.5"),
    ({"rope_scaling": "linear"}, "rope_scaling='linear' must be a JSON object"),
])
def test_bad_rope_values_are_named(rope, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_dict({**BASE, **rope})


@pytest.mark.parametrize("eos", ["x", 2.0, True, [2, "x"], -1])
def test_eos_token_id_of_the_wrong_kind_names_the_field(eos):
    with pytest.raises(ValueError, match=re.escape(f"eos_token_id={eos!r} must be a non-negative int")):
        ModelConfig.from_dict({**BASE, "eos_token_id": eos})
    assert ModelConfig.from_dict({**BASE, "eos_token_id": [2, 7]}).eos_token_ids == (2, 7)
