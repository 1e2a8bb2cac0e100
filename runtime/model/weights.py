"""Which Hugging Face tensors a family's checkpoint holds, and how the decoder packs them.

:func:`expected_shapes` is the checkpoint contract the loader checks (every name, every shape);
:func:`pack_layers` turns the checked tensors into one :class:`LayerWeights` per layer, with q/k/v
fused into one projection and gate/up into another.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from runtime.config import ModelConfig
from runtime.model.linear import Linear
from runtime.model.ops import RMSNorm


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Hugging Face tensor name -> shape, for every weight the model needs."""
    fam = config.family
    h, d, i = config.hidden_size, config.head_dim, config.intermediate_size
    q, kv = config.num_attention_heads * d, config.num_key_value_heads * d
    shapes = {"model.embed_tokens.weight": (config.vocab_size, h), "model.norm.weight": (h,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, h)
    for n in range(config.num_hidden_layers):
        layer = {
            "self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h),
            "self_attn.v_proj.weight": (kv, h), "self_attn.o_proj.weight": (h, q),
            "mlp.gate_proj.weight": (i, h), "mlp.up_proj.weight": (i, h), "mlp.down_proj.weight": (h, i),
            "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
        }
        if fam.sandwich_norms:
            layer.update({"pre_feedforward_layernorm.weight": (h,), "post_feedforward_layernorm.weight": (h,)})
        if fam.qk_norm:
            layer.update({"self_attn.q_norm.weight": (d,), "self_attn.k_norm.weight": (d,)})
        if config.qkv_bias:
            layer.update({"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,),
                          "self_attn.v_proj.bias": (kv,)})
        if config.o_bias:
            layer["self_attn.o_proj.bias"] = (h,)
        if config.mlp_bias:
            layer.update({"mlp.gate_proj.bias": (i,), "mlp.up_proj.bias": (i,), "mlp.down_proj.bias": (h,)})
        shapes.update({f"model.layers.{n}.{k}": v for k, v in layer.items()})
    return shapes


@dataclass
class LayerWeights:
    """One decoder layer, projections fused. Norms that a family lacks are None."""

    attn_norm: RMSNorm            # input_layernorm
    qkv: Linear                   # hidden -> (heads + 2 * kv_heads) * head_dim, optional bias
    q_norm: RMSNorm | None        # per head, over head_dim (Qwen3)
    k_norm: RMSNorm | None
    o_proj: Linear                # heads * head_dim -> hidden
    attn_out_norm: RMSNorm | None  # on the attention output (Gemma 2's post_attention_layernorm)
    mlp_norm: RMSNorm             # on the MLP input
    gate_up: Linear               # hidden -> 2 * intermediate
    down: Linear                  # intermediate -> hidden
    mlp_out_norm: RMSNorm | None  # on the MLP output (Gemma 2)


def pack_layers(config: ModelConfig, w, opt) -> list[LayerWeights]:
    """Build every layer from ``w(name)`` (a required tensor on the device, compute dtype) and
    ``opt(name)`` (the same, or None when the checkpoint has no such tensor)."""
    fam, eps = config.family, config.rms_norm_eps

    def norm(name):
        return RMSNorm(w(name), eps, fam.norm_offset)

    def cat_opt(names):
        parts = [opt(n) for n in names]
        return None if parts[0] is None else torch.cat(parts)

    layers = []
    for n in range(config.num_hidden_layers):
        p = f"model.layers.{n}."
        attn = [p + f"self_attn.{x}_proj" for x in "qkv"]
        mlp = [p + "mlp.gate_proj", p + "mlp.up_proj"]
        sandwich = fam.sandwich_norms
        layers.append(LayerWeights(
            attn_norm=norm(p + "input_layernorm.weight"),
            qkv=Linear(torch.cat([w(a + ".weight") for a in attn]), cat_opt([a + ".bias" for a in attn])),
            q_norm=norm(p + "self_attn.q_norm.weight") if fam.qk_norm else None,
            k_norm=norm(p + "self_attn.k_norm.weight") if fam.qk_norm else None,
            o_proj=Linear(w(p + "self_attn.o_proj.weight"), opt(p + "self_attn.o_proj.bias")),
            attn_out_norm=norm(p + "post_attention_layernorm.weight") if sandwich else None,
            mlp_norm=norm(p + ("pre_feedforward_layernorm.weight" if sandwich else "post_attention_layernorm.weight")),
            gate_up=Linear(torch.cat([w(m + ".weight") for m in mlp]), cat_opt([m + ".bias" for m in mlp])),
            down=Linear(w(p + "mlp.down_proj.weight"), opt(p + "mlp.down_proj.bias")),
            mlp_out_norm=norm(p + "post_feedforward_layernorm.weight") if sandwich else None,
        ))
    return layers
