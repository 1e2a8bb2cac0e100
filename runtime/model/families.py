"""Model families: what each supported architecture changes in the one shared decoder.

A :class:`Family` is a small description (which projections carry biases, which norms exist and how
they scale, the MLP activation's config field, the embedding scale, the attention extras) plus one
hook that reads the family's per-layer sliding windows from ``config.json``. Defaults follow the
Hugging Face config classes of transformers 5, so that a ``config.json`` that leaves a field out
means what it means to transformers (e.g. Gemma 2's ``head_dim`` defaults to 256, Qwen3's to 128,
Mistral's ``sliding_window`` to 4096).

Every field that changes the math is either implemented or refused by name
(:func:`Family.read`); fields that transformers' own model class ignores for an architecture
(e.g. ``attention_bias`` on Mistral, ``sliding_window`` on Llama) are ignored here too.

No torch here: this module is pure data and config parsing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

FULL, SLIDING = "full_attention", "sliding_attention"
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")  # names as in config.json (transformers' ACT2FN keys)


def _bad(name: str, value, why: str) -> ValueError:
    return ValueError(f"config.json field {name}={value!r} {why}")


def _window_value(data: dict, get) -> int | None:
    """``sliding_window`` as a positive int, or None (no window)."""
    w = get("sliding_window")
    if w is None:
        return None
    if isinstance(w, bool) or not isinstance(w, int) or w < 1:
        raise _bad("sliding_window", w, "must be a positive int or null")
    return w


def _layer_types(data: dict, n_layers: int, default: list[str]) -> list[str]:
    """``layer_types`` from config.json (checked), else the family's default pattern."""
    types = data.get("layer_types")
    if types is None:
        return default
    if not isinstance(types, list) or len(types) != n_layers:
        raise _bad("layer_types", types, f"must be a list of {n_layers} entries (num_hidden_layers)")
    for i, t in enumerate(types):
        if t not in (FULL, SLIDING):
            raise _bad(f"layer_types[{i}]", t, f"is not supported; supported: {FULL!r}, {SLIDING!r}")
    return types


def _windows_from_types(types: list[str], window: int | None) -> tuple[int | None, ...]:
    if window is None and SLIDING in types:
        raise ValueError(f"config.json field layer_types names {SLIDING!r} layers (layer "
                         f"{types.index(SLIDING)}) but sliding_window is null")
    return tuple(window if t == SLIDING else None for t in types)


def _no_windows(data: dict, n_layers: int, get) -> tuple[int | None, ...]:
    return (None,) * n_layers  # transformers' Llama reads neither sliding_window nor layer_types


def _mistral_windows(data: dict, n_layers: int, get) -> tuple[int | None, ...]:
    # MistralForCausalLM applies sliding_window to every layer and ignores layer_types
    return (_window_value(data, get),) * n_layers


def _qwen_windows(data: dict, n_layers: int, get) -> tuple[int | None, ...]:
    use = get("use_sliding_window")
    if not isinstance(use, bool):
        raise _bad("use_sliding_window", use, "must be true or false")
    window = _window_value(data, get) if use else None  # transformers drops the window unless used
    first = get("max_window_layers")
    if isinstance(first, bool) or not isinstance(first, int) or first < 0:
        raise _bad("max_window_layers", first, "must be a non-negative int")
    default = [SLIDING if window is not None and i >= first else FULL for i in range(n_layers)]
    types = _layer_types(data, n_layers, default)
    if not use and SLIDING in types:
        raise ValueError(f"config.json field layer_types names {SLIDING!r} layers (layer {types.index(SLIDING)}) "
                         f"but use_sliding_window is false (transformers then has no window for them)")
    return _windows_from_types(types, window)


def _gemma2_windows(data: dict, n_layers: int, get) -> tuple[int | None, ...]:
    window = _window_value(data, get)
    default = [SLIDING if i % 2 == 0 else FULL for i in range(n_layers)]  # layers 0, 2, 4 ... slide
    return _windows_from_types(_layer_types(data, n_layers, default), window)


@dataclass(frozen=True)
class Family:
    """What one architecture changes in the shared decoder.

    Attributes
    ----------
    bias : str
        Projection biases: ``"config"`` (q, k, v and o when ``attention_bias`` is true),
        ``"qkv"`` (always q, k, v; never o) or ``"none"``.
    mlp_bias_field : bool
        Whether ``mlp_bias`` is read (gate/up/down biases).
    act_field : str
        The config field naming the MLP activation (``hidden_act`` or ``hidden_activation``).
    qk_norm : bool
        Per-head RMSNorm of q and k before RoPE (``self_attn.q_norm`` / ``k_norm``).
    norm_offset : float
        RMSNorm multiplies by ``norm_offset + weight`` (Gemma's ``1 + w``), in fp32 before the cast.
    sandwich_norms : bool
        Extra norms on the attention and MLP outputs (``post_attention_layernorm`` then normalizes
        the attention output and ``pre_feedforward_layernorm`` the MLP input).
    embed_scale : bool
        Embeddings multiplied by ``sqrt(hidden_size)`` (rounded to the compute dtype).
    soft_caps, query_scalar : bool
        Reads ``attn_logit_softcapping`` / ``final_logit_softcapping``, ``query_pre_attn_scalar``.
    windows : callable
        ``(config dict, num_layers, get) -> per-layer sliding window (int or None)``.
    refused : mapping
        Fields the model class reads that must be absent, false or null here -> why.
    defaults : mapping
        Transformers' config-class defaults for fields a ``config.json`` may leave out.
    """

    architecture: str
    model_type: str
    bias: str = "config"
    mlp_bias_field: bool = False
    act_field: str = "hidden_act"
    qk_norm: bool = False
    norm_offset: float = 0.0
    sandwich_norms: bool = False
    embed_scale: bool = False
    soft_caps: bool = False
    query_scalar: bool = False
    windows: Callable = _no_windows
    refused: Mapping[str, str] = field(default_factory=dict)
    defaults: Mapping[str, object] = field(default_factory=dict)

    def read(self, data: dict) -> dict:
        """The family's ModelConfig fields from a parsed config.json (raises ValueError by name)."""

        def get(name):
            return data[name] if name in data else self.defaults.get(name, _COMMON_DEFAULTS.get(name))

        if data.get("quantization_config") is not None:
            method = data["quantization_config"]
            method = method.get("quant_method", method) if isinstance(method, dict) else method
            raise _bad("quantization_config", method, "is not supported: the runtime reads fp32, fp16 "
                       "or bf16 weights only")
        for name, why in self.refused.items():
            if data.get(name):
                raise _bad(name, data[name], f"is not supported: {why}")
        act = get(self.act_field)
        if act not in ACTIVATIONS:
            raise _bad(self.act_field, act, f"is not supported; supported: {', '.join(ACTIVATIONS)}")
        attn_bias = bool(get("attention_bias"))
        out = dict(
            hidden_act=act,
            qkv_bias=self.bias == "qkv" or (self.bias == "config" and attn_bias),
            o_bias=self.bias == "config" and attn_bias,
            mlp_bias=self.mlp_bias_field and bool(get("mlp_bias")),
            tie_word_embeddings=bool(get("tie_word_embeddings")),
            head_dim=get("head_dim"),
            max_position_embeddings=get("max_position_embeddings"),
            rms_norm_eps=get("rms_norm_eps"),
        )
        max_pos, eps = out["max_position_embeddings"], out["rms_norm_eps"]
        if isinstance(max_pos, bool) or not isinstance(max_pos, int) or max_pos < 1:
            raise _bad("max_position_embeddings", max_pos, "must be a positive int")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or eps <= 0:
            raise _bad("rms_norm_eps", eps, "must be a positive number")
        if self.soft_caps:
            for name in ("attn_logit_softcapping", "final_logit_softcapping"):
                cap = get(name)
                if cap is not None and (isinstance(cap, bool) or not isinstance(cap, (int, float)) or cap <= 0):
                    raise _bad(name, cap, "must be a positive number or null")
                out[name] = None if cap is None else float(cap)
        if self.query_scalar:
            qs = get("query_pre_attn_scalar")
            if isinstance(qs, bool) or not isinstance(qs, (int, float)) or qs <= 0:
                raise _bad("query_pre_attn_scalar", qs, "must be a positive number")
            out["query_pre_attn_scalar"] = float(qs)
        n_layers = data["num_hidden_layers"]
        windows = self.windows(data, n_layers, get)
        # a window at least as long as any position can reach never masks anything: drop it
        out["layer_windows"] = tuple(None if w is not None and w >= max_pos else w for w in windows)
        return out


_COMMON_DEFAULTS = {
    "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
    "head_dim": None, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
}
_QWEN_DEFAULTS = {"use_sliding_window": False, "sliding_window": 4096, "max_window_layers": 28,
                  "max_position_embeddings": 32768}

FAMILIES: dict[str, Family] = {f.architecture: f for f in (
    Family("LlamaForCausalLM", "llama", mlp_bias_field=True),
    Family("MistralForCausalLM", "mistral", bias="none", windows=_mistral_windows,
           defaults={"sliding_window": 4096, "max_position_embeddings": 4096 * 32}),
    Family("Qwen2ForCausalLM", "qwen2", bias="qkv", windows=_qwen_windows, defaults=_QWEN_DEFAULTS),
    Family("Qwen3ForCausalLM", "qwen3", qk_norm=True, windows=_qwen_windows,
           defaults={**_QWEN_DEFAULTS, "head_dim": 128}),
    Family("Gemma2ForCausalLM", "gemma2", act_field="hidden_activation", norm_offset=1.0,
           sandwich_norms=True, embed_scale=True, soft_caps=True, query_scalar=True,
           windows=_gemma2_windows,
           refused={"use_bidirectional_attention": "the runtime decodes causally"},
           defaults={"hidden_activation": "gelu_pytorch_tanh", "head_dim": 256, "tie_word_embeddings": True,
                     "query_pre_attn_scalar": 256, "sliding_window": 4096, "attn_logit_softcapping": 50.0,
                     "final_logit_softcapping": 30.0, "max_position_embeddings": 8192}),
)}
SUPPORTED_ARCHITECTURES = tuple(FAMILIES)


def family_for(data: dict) -> Family:
    """The family of a parsed config.json, from ``architectures`` (else ``model_type``)."""
    archs = data.get("architectures")
    if archs is None:
        by_type = {f.model_type: f.architecture for f in FAMILIES.values()}
        arch = by_type.get(data.get("model_type"), data.get("model_type"))
    elif isinstance(archs, list) and archs and isinstance(archs[0], str):
        arch = archs[0]
    else:
        raise _bad("architectures", archs, "must be a list holding the architecture name")
    if arch not in FAMILIES:
        raise ValueError(f"architecture={arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    return FAMILIES[arch]
