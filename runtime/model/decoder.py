"""The shared decoder forward over a paged KV cache, for every supported family.

RMSNorm (Llama or Gemma style), RoPE (default, linear or llama3 scaling), grouped-query attention
with per-layer sliding windows, soft-capped logits and the query scale (:meth:`ModelConfig.layer_attention`),
a gated MLP (SwiGLU or GELU-tanh), tied or untied embeddings. What a family changes is data in
:mod:`runtime.model.families`; this file has no per-architecture branches beyond reading it.

One forward runs a flat batch of tokens: the prefill tokens of several sequences followed by one
decode token per running sequence. Projections run on the whole batch; attention is split into
per-sequence prefill (SDPA) and one batched paged decode call per layer.

The numerics follow transformers (fp32 norm statistics, RoPE angles in fp32, rotate-half
convention, softmax in fp32) so that greedy decoding matches it token for token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from runtime.attention import AttentionMetadata, prefill_attention, soft_cap, write_kv
from runtime.config import ModelConfig
from runtime.model.ops import ACTIVATIONS, RMSNorm, rotate_half
from runtime.model.weights import LayerWeights, pack_layers


class DecoderModel:
    """A causal LM of a supported family whose attention reads and writes a paged KV cache.

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
        fam = config.family

        def w(name):
            return weights[name].to(device=self.device, dtype=dtype).contiguous()

        def opt(name):
            return w(name) if name in weights else None

        self.embed = w("model.embed_tokens.weight")                       # [vocab, hidden]
        self.lm_head = self.embed if config.tie_word_embeddings else w("lm_head.weight")
        self.final_norm = RMSNorm(w("model.norm.weight"), config.rms_norm_eps, fam.norm_offset)
        # Gemma: embeddings times sqrt(hidden), the factor rounded to the compute dtype first
        self.embed_scale = (torch.tensor(config.hidden_size ** 0.5, dtype=dtype, device=self.device)
                            if fam.embed_scale else None)
        self.layers: list[LayerWeights] = pack_layers(config, w, opt)
        self.attention = [config.layer_attention(i) for i in range(config.num_hidden_layers)]
        self.act = ACTIVATIONS[config.hidden_act]
        self.inv_freq = config.inv_freq().to(self.device)                 # float32 [head_dim // 2]

    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        """``[num_layers, 2 (K, V), num_blocks, block_size, num_kv_heads, head_dim]``."""
        c = self.config
        return (c.num_hidden_layers, 2, num_blocks, block_size, c.num_key_value_heads, c.head_dim)

    def bytes_per_block(self, block_size: int) -> int:
        """KV-cache bytes of one block across all layers."""
        c = self.config
        elem = torch.empty((), dtype=self.dtype).element_size()
        return c.num_hidden_layers * 2 * block_size * c.num_key_value_heads * c.head_dim * elem

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin: [tokens, 1, head_dim] in the compute dtype for int64 positions [tokens]."""
        freqs = positions[:, None].float() * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(self.dtype)[:, None, :], emb.sin().to(self.dtype)[:, None, :]

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata, decode_backend, logits_indices: torch.Tensor) -> torch.Tensor:
        """Run one engine step.

        Parameters
        ----------
        input_ids, positions : torch.Tensor
            int64 ``[num_tokens]``: prefill tokens first, then one token per decode sequence.
        kv_cache : torch.Tensor
            ``[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]``, written in place.
        meta : AttentionMetadata
            Slot mapping, prefill spans and decode block tables for this step.
        decode_backend
            A :mod:`runtime.attention` decode backend (already ``prepare``-d for ``meta``).
        logits_indices : torch.Tensor
            int64 ``[num_outputs]``: rows whose next-token logits are wanted.

        Returns
        -------
        torch.Tensor
            float32 logits ``[num_outputs, vocab_size]``.
        """
        c = self.config
        heads, kvh, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        num_tokens = input_ids.shape[0]
        cos, sin = self.rope(positions)
        x = self.embed.index_select(0, input_ids)                          # [T, hidden]
        if self.embed_scale is not None:
            x = x * self.embed_scale
        for li, layer in enumerate(self.layers):
            qkv = F.linear(layer.attn_norm(x), layer.qkv, layer.qkv_bias)
            qk = qkv[:, : (heads + kvh) * d].view(num_tokens, heads + kvh, d)
            if layer.q_norm is not None:  # Qwen3: per-head RMSNorm of q and k before RoPE
                qk = torch.cat((layer.q_norm(qk[:, :heads]), layer.k_norm(qk[:, heads:])), dim=1)
            qk = qk * cos + rotate_half(qk) * sin                              # RoPE on q and k at once
            q, k = qk[:, :heads], qk[:, heads:]                                # [T, heads, D], [T, kvh, D]
            v = qkv[:, (heads + kvh) * d:].view(num_tokens, kvh, d)
            key_cache, value_cache = kv_cache[li, 0], kv_cache[li, 1]
            write_kv(key_cache, value_cache, k, v, meta.slot_mapping)
            attn = self._attention(q, k, v, key_cache, value_cache, meta, decode_backend, li)
            out = F.linear(attn.reshape(num_tokens, heads * d), layer.o_proj, layer.o_bias)
            x = x + (out if layer.attn_out_norm is None else layer.attn_out_norm(out))
            gate, up = F.linear(layer.mlp_norm(x), layer.gate_up, layer.gate_up_bias).chunk(2, dim=-1)
            out = F.linear(self.act(gate) * up, layer.down, layer.down_bias)
            x = x + (out if layer.mlp_out_norm is None else layer.mlp_out_norm(out))
        logits = F.linear(self.final_norm(x.index_select(0, logits_indices)), self.lm_head)
        if c.final_logit_softcapping is not None:
            logits = soft_cap(logits, c.final_logit_softcapping)
        return logits.float()

    def _attention(self, q, k, v, key_cache, value_cache, meta: AttentionMetadata, decode_backend,
                   li: int) -> torch.Tensor:
        """Layer ``li``'s attention for the whole batch: per-sequence prefill, one batched decode."""
        la = self.attention[li]
        opts = dict(sliding_window=la.sliding_window, logits_soft_cap=la.logits_soft_cap)
        npf, num_tokens = meta.num_prefill_tokens, q.shape[0]
        if npf == num_tokens and len(meta.prefills) == 1:
            return prefill_attention(q, k, v, key_cache, value_cache, meta.prefills[0], la.scale, **opts)
        attn = torch.empty_like(q)
        for span in meta.prefills:
            s, e = span.start, span.end
            attn[s:e] = prefill_attention(q[s:e], k[s:e], v[s:e], key_cache, value_cache, span,
                                          la.scale, **opts)
        if npf < num_tokens:
            attn[npf:] = decode_backend.decode(q[npf:], key_cache, value_cache, meta, la.scale, **opts)
        return attn
