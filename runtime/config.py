"""ModelConfig: the Llama-family hyper-parameters read from a Hugging Face ``config.json``.

Field names follow Hugging Face. RoPE parameters are accepted in both spellings: the older
``rope_theta`` + ``rope_scaling`` pair and the ``rope_parameters`` dict of transformers 5.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from kgen.dispatch import torch_dtype

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def parse_dtype(dtype, *, name: str = "dtype") -> torch.dtype:
    """``torch.float16`` / ``"bf16"`` / ``"float32"`` ... -> a torch dtype (fp32, fp16 or bf16).

    The one dtype vocabulary is kgen's (:mod:`kgen.dtypes`, re-exported by the dispatch door).
    """
    return torch_dtype(dtype, name=name)


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a Llama-family decoder (Hugging Face names)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    torch_dtype: torch.dtype = torch.float32
    architecture: str = "LlamaForCausalLM"
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        """Build from a parsed ``config.json``; raises ValueError naming a bad or missing field."""
        archs = data.get("architectures") or [_arch_from_model_type(data.get("model_type"))]
        arch = archs[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"architecture={arch!r} is not supported; supported: "
                             f"{', '.join(SUPPORTED_ARCHITECTURES)}")
        if data.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act={data['hidden_act']!r} is not supported; only 'silu' (SwiGLU)")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads"):
            if not isinstance(data.get(key), int) or data[key] <= 0:
                raise ValueError(f"config.json field {key}={data.get(key)!r} must be a positive int")
        heads = data["num_attention_heads"]
        kv_heads = data.get("num_key_value_heads")
        kv_heads = heads if kv_heads is None else kv_heads
        if not isinstance(kv_heads, int) or kv_heads <= 0 or heads % kv_heads:
            raise ValueError(f"num_key_value_heads={kv_heads!r} must be a positive int dividing "
                             f"num_attention_heads={heads}")
        head_dim = data.get("head_dim")
        head_dim = data["hidden_size"] // heads if head_dim is None else head_dim
        if not isinstance(head_dim, int) or head_dim <= 0 or head_dim % 2:
            raise ValueError(f"head_dim={head_dim!r} must be a positive even int (RoPE)")
        theta, scaling = _rope_params(data)
        eos = data.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
        dtype_name = data.get("torch_dtype") or data.get("dtype") or "float32"
        return cls(
            vocab_size=data["vocab_size"], hidden_size=data["hidden_size"],
            intermediate_size=data["intermediate_size"], num_hidden_layers=data["num_hidden_layers"],
            num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
            rms_norm_eps=float(data.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling=scaling,
            max_position_embeddings=int(data.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(data.get("tie_word_embeddings", False)),
            attention_bias=bool(data.get("attention_bias", False)),
            mlp_bias=bool(data.get("mlp_bias", False)),
            eos_token_ids=eos_ids, bos_token_id=data.get("bos_token_id"),
            torch_dtype=parse_dtype(dtype_name, name="config.json torch_dtype"),
            architecture=arch, extra=dict(data),
        )

    def inv_freq(self) -> torch.Tensor:
        """RoPE inverse frequencies, float32 ``[head_dim // 2]``, with the configured scaling."""
        dim = self.head_dim
        inv = 1.0 / (self.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        scaling = self.rope_scaling or {}
        kind = scaling.get("rope_type", "default")
        if kind == "linear":
            return inv / float(scaling["factor"])
        if kind == "llama3":
            return _llama3_scale(inv, scaling, self.max_position_embeddings)
        return inv


def _arch_from_model_type(model_type) -> str:
    return {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}.get(model_type, str(model_type))


def _rope_params(data: dict) -> tuple[float, dict | None]:
    """(rope_theta, scaling dict or None) from either spelling of the RoPE settings."""
    params = data.get("rope_parameters")
    if isinstance(params, dict) and "layer_types" not in params:
        theta = params.get("rope_theta", data.get("rope_theta", 10000.0))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = data.get("rope_theta", 10000.0)
        scaling = dict(data.get("rope_scaling") or {})
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    kind = scaling.get("rope_type", "default")
    if kind not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"rope_type={kind!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    if kind in ("linear", "llama3") and not scaling.get("factor"):
        raise ValueError(f"rope scaling {kind!r} needs a 'factor'; got {scaling!r}")
    if not isinstance(theta, (int, float)) or theta <= 0:
        raise ValueError(f"rope_theta={theta!r} must be a positive number")
    return float(theta), (scaling if kind != "default" else None)


def _llama3_scale(inv: torch.Tensor, scaling: dict, max_pos: int) -> torch.Tensor:
    """Llama 3.1 frequency scaling: long wavelengths divided by ``factor``, a smooth band between."""
    factor = float(scaling["factor"])
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    old_len = float(scaling.get("original_max_position_embeddings", max_pos))
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)
