"""The shared decoder forward over a paged KV cache, for every supported family.

RMSNorm (Llama or Gemma style), RoPE (default, linear or llama3 scaling), grouped-query attention
with per-layer sliding windows, soft-capped logits and the query scale (:meth:`ModelConfig.layer_attention`),
a gated MLP (SwiGLU or GELU-tanh), tied or untied embeddings. What a family changes is data in
:mod:`runtime.model.families`; this file has no per-architecture branches beyond reading it.

One forward runs a flat batch of tokens: the prefill tokens of several sequences followed by one
decode token per running sequence. Projections run on the whole batch; attention
(:func:`runtime.attention.attend_layer`) is one kgen launch per layer for all rows with the
``triton`` backend, else per-sequence prefill (SDPA) and one batched paged decode call.

The numerics follow transformers (fp32 norm statistics, RoPE angles in fp32, rotate-half
convention, softmax in fp32) so that greedy decoding matches it token for token.
"""

from __future__ import annotations

import torch

from runtime.attention import AttentionMetadata, attend_layer
from runtime.config import ModelConfig
from runtime.kv_cache import PagedKVCache, storage_dtype
from runtime.model.linear import Linear
from runtime.model.native_ops import NativeOps
from runtime.model.ops import ACTIVATIONS, RMSNorm, rotate_half
from runtime.model.weights import LayerWeights, pack_layers
from runtime.sdpa import soft_cap


class DecoderModel:
    """A causal LM of a supported family whose attention reads and writes a paged KV cache.

    Parameters
    ----------
    config : ModelConfig
    weights : dict[str, torch.Tensor]
        Hugging Face tensor names -> tensors (checked by :func:`runtime.loader.load_weights`).
    device : torch.device
    dtype : torch.dtype
        Compute dtype of weights and activations (and of the KV cache unless it is fp8).
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
        # tied unless the loader kept a stored head (a checkpoint whose head differs, as in transformers)
        self.lm_head = Linear(w("lm_head.weight") if "lm_head.weight" in weights else self.embed)
        self.final_norm = RMSNorm(w("model.norm.weight"), config.rms_norm_eps, fam.norm_offset)
        # Gemma: embeddings times sqrt(hidden), the factor rounded to the compute dtype first
        self.embed_scale = (torch.tensor(config.hidden_size ** 0.5, dtype=dtype, device=self.device)
                            if fam.embed_scale else None)
        self.layers: list[LayerWeights] = pack_layers(config, w, opt)
        self.attention = [config.layer_attention(i) for i in range(config.num_hidden_layers)]
        self.act = ACTIVATIONS[config.hidden_act]
        self.native_ops = NativeOps.for_model(dtype, self.device)          # CPU fast paths, or None
        self.native_silu = self.native_ops is not None and config.hidden_act == "silu"
        self.inv_freq = config.inv_freq().to(self.device)                 # float32 [head_dim // 2]

    def cpu_path(self) -> dict:
        """How the projections and the elementwise steps run: ``linear`` (``onednn_packed`` or
        ``aten``, with the dtype) and ``elementwise`` (``native`` C ops or ``torch``)."""
        paths = sorted({lin.path for layer in self.layers for lin in (layer.qkv, layer.o_proj, layer.gate_up,
                                                                      layer.down)} | {self.lm_head.path})
        ops = "torch" if self.native_ops is None else ("native" if self.native_silu else "native (torch activation)")
        return {"dtype": str(self.dtype).replace("torch.", ""), "linear": "+".join(paths), "elementwise": ops}

    def make_kv_cache(self, num_blocks: int, block_size: int, kv_cache_dtype: str = "auto") -> PagedKVCache:
        """A zeroed :class:`runtime.kv_cache.PagedKVCache` in the model's dtype or fp8."""
        c = self.config
        return PagedKVCache(c.num_hidden_layers, num_blocks, block_size, c.num_key_value_heads, c.head_dim,
                            dtype=self.dtype, kv_cache_dtype=kv_cache_dtype, device=self.device)

    def bytes_per_block(self, block_size: int, kv_cache_dtype: str = "auto") -> int:
        """KV-cache bytes of one block across all layers (fp8 caches take one byte per value)."""
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
        cos, sin = self.rope(positions)
        x = self.embed.index_select(0, input_ids)                          # [T, hidden]
        if self.embed_scale is not None:
            x = x * self.embed_scale
        x, h = self._add_norm(x, None, self.layers[0].attn_norm)          # h: the normed input
        for li, layer in enumerate(self.layers):
            qkv = layer.qkv(h)
            qk = qkv[:, : (heads + kvh) * d].view(num_tokens, heads + kvh, d)
            if layer.q_norm is not None:  # Qwen3: per-head RMSNorm of q and k before RoPE
                qk = torch.cat((layer.q_norm(qk[:, :heads]), layer.k_norm(qk[:, heads:])), dim=1)
            qk = self._rope(qk, cos, sin)                                      # RoPE on q and k at once
            q, k = qk[:, :heads], qk[:, heads:]                                # [T, heads, D], [T, kvh, D]
            v = qkv[:, (heads + kvh) * d:].view(num_tokens, kvh, d)
            if calibrate_kv:
                kv_cache.calibrate(li, k, v)
            if meta.write_rows is None:
                kv_cache.write(li, k, v, meta.slot_mapping)
            else:  # a sliding-window prefill skips the positions its window has already left
                kv_cache.write(li, k.index_select(0, meta.write_rows), v.index_select(0, meta.write_rows),
                               meta.slot_mapping)
            attn = attend_layer(decode_backend, q, k, v, kv_cache.layer(li), meta, self.attention[li])
            out = layer.o_proj(attn.reshape(num_tokens, heads * d))
            x, h = self._add_norm(x, out if layer.attn_out_norm is None else layer.attn_out_norm(out), layer.mlp_norm)
            gate_up = layer.gate_up(h)                                         # [T, 2 * intermediate]
            if self.native_silu:
                act = self.native_ops.silu_mul(gate_up)
            else:
                gate, up = gate_up.chunk(2, dim=-1)
                act = self.act(gate) * up
            out = layer.down(act)
            nxt = self.layers[li + 1].attn_norm if li + 1 < len(self.layers) else None
            x, h = self._add_norm(x, out if layer.mlp_out_norm is None else layer.mlp_out_norm(out), nxt)
        logits = self.lm_head(self.final_norm(x.index_select(0, logits_indices)))
        if c.final_logit_softcapping is not None:
            logits = soft_cap(logits, c.final_logit_softcapping)
        return logits.float()

    def _add_norm(self, x: torch.Tensor, delta: torch.Tensor | None, norm: RMSNorm | None):
        """(x + delta, norm(x + delta)): the residual stream and the next block's normed input
        (None without ``norm``). With the native ops x is updated in place (it is this forward's
        own tensor) and both steps are one pass."""
        ops = self.native_ops
        if ops is not None:
            return x, ops.add_rms_norm(x, delta, None if norm is None else norm.weight, 0.0 if norm is None else norm.eps)
        x = x if delta is None else x + delta
        return x, (None if norm is None else norm(x))

    def _rope(self, qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate-half RoPE of qk ``[T, heads + kv_heads, D]``: in place with the native ops, else
        a new tensor."""
        if self.native_ops is not None:
            return self.native_ops.rope_(qk, cos, sin)
        return qk * cos + rotate_half(qk) * sin
