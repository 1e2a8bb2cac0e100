"""ModelConfig: a decoder's hyper-parameters read from a Hugging Face ``config.json``.

Field names follow Hugging Face. The architecture (``architectures[0]``) picks a
:class:`runtime.model.families.Family`, which reads what that family adds (biases, windows,
soft-caps, ...) and refuses by name what the runtime does not implement. RoPE parameters are
accepted in both spellings (the older ``rope_theta`` + ``rope_scaling`` pair and the
``rope_parameters`` dict of transformers 5) and resolved as transformers resolves them
(:mod:`runtime.rope_config`).

Per-layer attention settings live in one place: :meth:`ModelConfig.layer_attention`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kgen.dtypes import torch_dtype
from runtime.model.families import FAMILIES, SUPPORTED_ARCHITECTURES, Family, family_for
from runtime.rope_config import SUPPORTED_ROPE_TYPES, llama3_scale, rope_params

__all__ = ["ModelConfig", "LayerAttention", "kernel_features", "parse_dtype", "SUPPORTED_ARCHITECTURES",
           "SUPPORTED_ROPE_TYPES"]


def parse_dtype(dtype, *, name: str = "dtype") -> torch.dtype:
    """``torch.float16`` / ``"bf16"`` / ``"float32"`` ... -> a torch dtype (fp32, fp16 or bf16).

    The one dtype vocabulary is kgen's (:mod:`kgen.dtypes`).
    """
    return torch_dtype(dtype, name=name)


@dataclass(frozen=True)
class LayerAttention:
    """What one layer's attention computes: ``softmax(cap(scale * q.k))`` over its visible keys.

    Attributes
    ----------
    scale : float
        Multiplies q.k (``head_dim ** -0.5``, or ``query_pre_attn_scalar ** -0.5`` for Gemma 2).
    sliding_window : int or None
        The query at position p sees keys j with ``p - sliding_window < j <= p`` (the last W
        tokens, transformers' convention); None: every earlier key.
    logits_soft_cap : float or None
        Each scaled score s becomes ``c * tanh(s / c)`` before the softmax; None: no cap.
    """

    scale: float
    sliding_window: int | None = None
    logits_soft_cap: float | None = None

    @property
    def features(self) -> tuple[str, ...]:
        """The kernel feature flags this layer needs (kgen's names: ``sliding_window``, ``soft_cap``)."""
        return kernel_features(self.sliding_window, self.logits_soft_cap)


def layer_windows(layers) -> list:
    """The distinct sliding windows of ``layers`` (LayerAttention), None (no window) first; [None]
    when there are no layers. Decode backends plan once per window."""
    return sorted({la.sliding_window for la in layers} or {None}, key=lambda w: w or 0)


def kernel_features(sliding_window: int | None, logits_soft_cap: float | None) -> tuple[str, ...]:
    """kgen's attention feature flags for these settings, in kgen's order."""
    return (("sliding_window",) if sliding_window is not None else ()) + \
        (("soft_cap",) if logits_soft_cap is not None else ())


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a supported decoder (Hugging Face names, family extras resolved)."""

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
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    layer_windows: tuple = ()            # per layer: sliding window (int) or None; () = all None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    query_pre_attn_scalar: float | None = None
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    torch_dtype: torch.dtype = torch.float32
    architecture: str = "LlamaForCausalLM"
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def family(self) -> Family:
        """What this architecture changes in the shared decoder."""
        return FAMILIES[self.architecture]

    def layer_attention(self, layer: int) -> LayerAttention:
        """Layer ``layer``'s attention settings (window, soft-cap, scale)."""
        if not 0 <= layer < self.num_hidden_layers:
            raise ValueError(f"layer={layer!r} is outside 0..{self.num_hidden_layers - 1}")
        scalar = self.query_pre_attn_scalar if self.query_pre_attn_scalar is not None else self.head_dim
        window = self.layer_windows[layer] if self.layer_windows else None
        return LayerAttention(scale=scalar ** -0.5, sliding_window=window,
                              logits_soft_cap=self.attn_logit_softcapping)

    @property
    def sliding_window(self) -> int | None:
        """W when EVERY layer uses the same sliding window W (blocks wholly before the last W
        tokens are then dead for all layers); None when some layer sees the whole context."""
        windows = set(self.layer_windows) or {None}
        return windows.pop() if len(windows) == 1 else None

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        """Build from a parsed ``config.json``; raises ValueError naming a bad or missing field."""
        if not isinstance(data, dict):
            raise ValueError(f"config.json must hold a JSON object, got {type(data).__name__}")
        family = family_for(data)
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads"):
            if isinstance(data.get(key), bool) or not isinstance(data.get(key), int) or data[key] <= 0:
                raise ValueError(f"config.json field {key}={data.get(key)!r} must be a positive int")
        heads = data["num_attention_heads"]
        kv_heads = data.get("num_key_value_heads")
        kv_heads = heads if kv_heads is None else kv_heads
        if not isinstance(kv_heads, int) or kv_heads <= 0 or heads % kv_heads:
            raise ValueError(f"num_key_value_heads={kv_heads!r} must be a positive int dividing "
                             f"num_attention_heads={heads}")
        fam = family.read(data)
        head_dim = fam.pop("head_dim")
        head_dim = data["hidden_size"] // heads if head_dim is None else head_dim
        if not isinstance(head_dim, int) or head_dim <= 0 or head_dim % 2:
            raise ValueError(f"head_dim={head_dim!r} must be a positive even int (RoPE)")
        theta, scaling = rope_params(data, fam["max_position_embeddings"])
        eos_ids = _token_ids(data, "eos_token_id")
        dtype_name = data.get("torch_dtype") or data.get("dtype") or "float32"
        return cls(
            vocab_size=data["vocab_size"], hidden_size=data["hidden_size"],
            intermediate_size=data["intermediate_size"], num_hidden_layers=data["num_hidden_layers"],
            num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
            rms_norm_eps=float(fam.pop("rms_norm_eps")), rope_theta=theta, rope_scaling=scaling,
            max_position_embeddings=int(fam.pop("max_position_embeddings")),
            eos_token_ids=eos_ids, bos_token_id=data.get("bos_token_id"),
            torch_dtype=parse_dtype(dtype_name, name="config.json torch_dtype"),
            architecture=family.architecture, extra=dict(data), **fam,
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
            return llama3_scale(inv, scaling)
        return inv


def _token_ids(data: dict, name: str) -> tuple[int, ...]:
    """``config.json`` field ``name`` (a token id, a list of them, or null) as a tuple; ValueError
    names the field when a value is not a non-negative int."""
    value = data.get(name)
    values = [] if value is None else (list(value) if isinstance(value, (list, tuple)) else [value])
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"config.json field {name}={value!r} must be a non-negative int, a list of "
                             f"them, or null")
    return tuple(values)
