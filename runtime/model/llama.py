"""The Llama-family decoder forward over a paged KV cache.

RMSNorm, RoPE (default, linear or llama3 scaling), grouped-query attention, SwiGLU MLP, tied or
untied embeddings. One forward runs a flat batch of tokens: the prefill tokens of several
sequences followed by one decode token per running sequence. Projections run on the whole batch;
attention is split into per-sequence prefill (SDPA) and one batched paged decode call.

The numerics follow Hugging Face's ``LlamaForCausalLM`` (fp32 RMSNorm statistics, RoPE angles in
fp32, rotate-half convention, softmax in fp32) so that greedy decoding matches it token for token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from runtime.attention import AttentionMetadata, prefill_attention
from runtime.config import ModelConfig
from runtime.kv_cache import PagedKVCache
from runtime.model.linear import Linear

_HAS_RMS_NORM = hasattr(F, "rms_norm")  # torch >= 2.4


@dataclass
class _Layer:
    input_norm: torch.Tensor      # [hidden]
    qkv: Linear                   # hidden -> (heads + 2 * kv_heads) * head_dim
    o_proj: Linear                # heads * head_dim -> hidden
    post_norm: torch.Tensor       # [hidden]
    gate_up: Linear               # hidden -> 2 * intermediate
    down: Linear                  # intermediate -> hidden


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [tokens, hidden] -> same shape and dtype; statistics in fp32 as in Hugging Face."""
    if x.dtype == torch.float32 and _HAS_RMS_NORM:  # one fused op, same math in fp32
        return F.rms_norm(x, weight.shape, weight, eps)
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LlamaModel:
    """A Llama-family causal LM whose attention reads and writes a paged KV cache.

    Parameters
    ----------
    config : ModelConfig
    weights : dict[str, torch.Tensor]
        Hugging Face tensor names -> tensors (checked by :func:`runtime.loader.load_weights`).
    device : torch.device
    dtype : torch.dtype
        Compute dtype of weights, activations and the KV cache.
    """

    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor], *,
                 device: torch.device, dtype: torch.dtype) -> None:
        self.config, self.device, self.dtype = config, torch.device(device), dtype

        def w(name):
            return weights[name].to(device=self.device, dtype=dtype).contiguous()

        def opt(name):
            return w(name) if name in weights else None

        def cat_opt(names):
            parts = [opt(n) for n in names]
            return None if parts[0] is None else torch.cat(parts)

        self.embed = w("model.embed_tokens.weight")                       # [vocab, hidden]
        self.lm_head = Linear(self.embed if config.tie_word_embeddings else w("lm_head.weight"))
        self.final_norm = w("model.norm.weight")
        self.layers: list[_Layer] = []
        for n in range(config.num_hidden_layers):
            p = f"model.layers.{n}."
            attn = [p + f"self_attn.{x}_proj" for x in "qkv"]
            mlp = [p + "mlp.gate_proj", p + "mlp.up_proj"]
            self.layers.append(_Layer(
                input_norm=w(p + "input_layernorm.weight"),
                qkv=Linear(torch.cat([w(a + ".weight") for a in attn]), cat_opt([a + ".bias" for a in attn])),
                o_proj=Linear(w(p + "self_attn.o_proj.weight"), opt(p + "self_attn.o_proj.bias")),
                post_norm=w(p + "post_attention_layernorm.weight"),
                gate_up=Linear(torch.cat([w(m + ".weight") for m in mlp]), cat_opt([m + ".bias" for m in mlp])),
                down=Linear(w(p + "mlp.down_proj.weight"), opt(p + "mlp.down_proj.bias")),
            ))
        self.inv_freq = config.inv_freq().to(self.device)                 # float32 [head_dim // 2]
        self.scale = config.head_dim ** -0.5
        self.layer_windows = [config.sliding_window] * config.num_hidden_layers  # None: full attention

    def make_kv_cache(self, num_blocks: int, block_size: int, kv_cache_dtype: str = "auto") -> PagedKVCache:
        """A zeroed cache ``[num_layers, 2 (K, V), num_blocks, block_size, num_kv_heads, head_dim]``."""
        c = self.config
        return PagedKVCache(c.num_hidden_layers, num_blocks, block_size, c.num_key_value_heads, c.head_dim,
                            dtype=self.dtype, kv_cache_dtype=kv_cache_dtype, device=self.device)

    def bytes_per_block(self, block_size: int, kv_cache_dtype: str = "auto") -> int:
        """KV-cache bytes of one block across all layers (fp8 caches take one byte per value)."""
        from runtime.kv_cache import storage_dtype

        c = self.config
        return PagedKVCache.bytes_per_block(c.num_hidden_layers, block_size, c.num_key_value_heads, c.head_dim,
                                            storage_dtype(kv_cache_dtype, self.dtype))

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin: [tokens, 1, head_dim] in the compute dtype for int64 positions [tokens]."""
        freqs = positions[:, None].float() * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(self.dtype)[:, None, :], emb.sin().to(self.dtype)[:, None, :]

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: PagedKVCache,
                meta: AttentionMetadata, decode_backend, logits_indices: torch.Tensor, *,
                calibrate_kv: bool = False) -> torch.Tensor:
        """Run one engine step.

        Parameters
        ----------
        input_ids, positions : torch.Tensor
            int64 ``[num_tokens]``: prefill tokens first, then one token per decode sequence.
        kv_cache : PagedKVCache
            The paged cache, written in place.
        meta : AttentionMetadata
            Slot mapping, prefill spans and decode block tables for this step.
        decode_backend
            A :mod:`runtime.attention` decode backend (already ``prepare``-d for ``meta``).
        logits_indices : torch.Tensor
            int64 ``[num_outputs]``: rows whose next-token logits are wanted.
        calibrate_kv : bool
            Set each layer's fp8 ``k_scale``/``v_scale`` from this step's K/V before writing them.

        Returns
        -------
        torch.Tensor
            float32 logits ``[num_outputs, vocab_size]``.
        """
        c = self.config
        heads, kvh, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        num_tokens = input_ids.shape[0]
        npf = meta.num_prefill_tokens
        cos, sin = self.rope(positions)
        x = self.embed.index_select(0, input_ids)                          # [T, hidden]
        for li, layer in enumerate(self.layers):
            h = rms_norm(x, layer.input_norm, c.rms_norm_eps)
            qkv = layer.qkv(h)
            qk = qkv[:, : (heads + kvh) * d].view(num_tokens, heads + kvh, d)
            qk = qk * cos + _rotate_half(qk) * sin                             # RoPE on q and k at once
            q, k = qk[:, :heads], qk[:, heads:]                                # [T, heads, D], [T, kvh, D]
            v = qkv[:, (heads + kvh) * d:].view(num_tokens, kvh, d)
            if calibrate_kv:
                kv_cache.calibrate(li, k, v)
            if meta.write_rows is None:
                kv_cache.write(li, k, v, meta.slot_mapping)
            else:  # a sliding-window prefill skips the positions its window has already left
                kv_cache.write(li, k.index_select(0, meta.write_rows), v.index_select(0, meta.write_rows),
                               meta.slot_mapping)
            layer_kv, window = kv_cache.layer(li), self.layer_windows[li]
            if npf == num_tokens and len(meta.prefills) == 1:
                attn = prefill_attention(q, k, v, layer_kv, meta.prefills[0], self.scale, window)
            else:
                attn = torch.empty_like(q)
                for span in meta.prefills:
                    s, e = span.start, span.end
                    attn[s:e] = prefill_attention(q[s:e], k[s:e], v[s:e], layer_kv, span, self.scale, window)
                if npf < num_tokens:
                    attn[npf:] = decode_backend.decode(q[npf:], layer_kv, meta, self.scale, window)
            x = x + layer.o_proj(attn.reshape(num_tokens, heads * d))
            h = rms_norm(x, layer.post_norm, c.rms_norm_eps)
            gate, up = layer.gate_up(h).chunk(2, dim=-1)
            x = x + layer.down(F.silu(gate) * up)
        x = rms_norm(x.index_select(0, logits_indices), self.final_norm, c.rms_norm_eps)
        return self.lm_head(x).float()
