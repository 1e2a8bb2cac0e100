"""The physical paged KV cache: one tensor for all layers, in the model's dtype or in fp8.

Layout ``[num_layers, 2 (K, V), num_blocks, block_size, num_kv_heads, head_dim]``; a layer's K
and V caches are NHD views ``[num_blocks, block_size, num_kv_heads, head_dim]`` (what both decode
backends read). With ``kv_cache_dtype="fp8_e4m3"`` or ``"fp8_e5m2"`` (as in vLLM) the cache holds
``x / scale`` cast to fp8 with saturation (values beyond the format's largest finite value are
clamped to it, never inf or NaN), one ``k_scale`` and one ``v_scale`` per layer: 1.0, or computed
from the first prefill by :meth:`PagedKVCache.calibrate` (``amax / fp8 max``, so the largest
magnitude seen maps to the format's largest value). Readers multiply by the scale again.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace

import torch

from kgen.dtypes import kv_torch_dtype, normalize_kv_dtype
from runtime import huge_pages


def parse_kv_cache_dtype(name) -> str:
    """The canonical name (``auto``, ``fp8_e4m3``, ``fp8_e5m2``) of a ``kv_cache_dtype`` option,
    in kgen's one KV dtype vocabulary (:mod:`kgen.dtypes`: ``fp8`` is e4m3, as in vLLM)."""
    return normalize_kv_dtype(name, name="kv_cache_dtype")


def check_calculate_kv_scales(value, kv_cache_dtype: str) -> bool:
    """``calculate_kv_scales`` checked: a bool (a string such as ``"yes"`` is refused, as ``bool()``
    of any non-empty string is true). True with a cache that is not fp8 has nothing to calibrate:
    harmless, so it is warned about (once per call site) and read as False."""
    if not isinstance(value, bool):
        raise ValueError(f"calculate_kv_scales={value!r} must be True or False")
    if value and parse_kv_cache_dtype(kv_cache_dtype) == "auto":
        warnings.warn("calculate_kv_scales=True has no effect with kv_cache_dtype='auto' (scales belong to an "
                      "fp8 cache: kv_cache_dtype='fp8_e4m3' or 'fp8_e5m2'); ignored", RuntimeWarning, stacklevel=3)
        return False
    return value


def storage_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The torch dtype the cache is stored in."""
    return kv_torch_dtype(parse_kv_cache_dtype(kv_cache_dtype), model_dtype)


@dataclass(frozen=True)
class LayerKV:
    """One layer's view of the cache: NHD K and V caches and their dequantization scales."""

    key: torch.Tensor      # [num_blocks, block_size, num_kv_heads, head_dim], storage dtype
    value: torch.Tensor
    k_scale: float
    v_scale: float
    dtype: torch.dtype     # the compute dtype readers convert to

    @property
    def quantized(self) -> bool:
        return self.key.dtype != self.dtype

    def read(self, cache: torch.Tensor, slots: torch.Tensor, scale: float) -> torch.Tensor:
        """Rows ``[len(slots), num_kv_heads, head_dim]`` of ``cache`` (K or V) in the compute dtype."""
        rows = cache.view(-1, cache.shape[-2], cache.shape[-1]).index_select(0, slots)
        if not self.quantized:
            return rows
        return rows.to(self.dtype) * scale


class PagedKVCache:
    """K/V storage of every layer, with fp8 quantization when asked.

    Parameters
    ----------
    num_layers, num_blocks, block_size, num_kv_heads, head_dim : int
    dtype : torch.dtype
        The model's compute dtype (what readers get back).
    kv_cache_dtype : str
        ``auto`` (store in ``dtype``), ``fp8_e4m3`` or ``fp8_e5m2``.
    device : torch.device
    """

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, *,
                 dtype: torch.dtype, kv_cache_dtype: str = "auto", device=None) -> None:
        self.kv_cache_dtype = parse_kv_cache_dtype(kv_cache_dtype)
        self.dtype = dtype
        self.storage_dtype = storage_dtype(self.kv_cache_dtype, dtype)
        self.quantized = self.storage_dtype != dtype
        self.fp8_max = torch.finfo(self.storage_dtype).max if self.quantized else None
        shape = (num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim)
        self.data = huge_pages.zeros(shape, self.storage_dtype, device)  # CPU: on 2 MB pages where offered
        self._layers = [LayerKV(self.data[li, 0], self.data[li, 1], 1.0, 1.0, dtype) for li in range(num_layers)]

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                        storage: torch.dtype) -> int:
        """Bytes of one block across all layers, K and V."""
        return num_layers * 2 * block_size * num_kv_heads * head_dim * torch.empty((), dtype=storage).element_size()

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    @property
    def k_scales(self) -> list[float]:
        """Every layer's K dequantization scale (held by its :class:`LayerKV`)."""
        return [layer.k_scale for layer in self._layers]

    @property
    def v_scales(self) -> list[float]:
        """Every layer's V dequantization scale."""
        return [layer.v_scale for layer in self._layers]

    def layer(self, li: int) -> LayerKV:
        return self._layers[li]

    def set_scales(self, li: int, k_scale: float, v_scale: float) -> None:
        """Layer ``li``'s dequantization scales (positive floats)."""
        for name, value in (("k_scale", k_scale), ("v_scale", v_scale)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name}={value!r} must be a positive finite number")
        self._layers[li] = replace(self._layers[li], k_scale=float(k_scale), v_scale=float(v_scale))

    def calibrate(self, li: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Set layer ``li``'s scales to ``amax(|x|) / fp8 max`` of these K and V (1.0 if all zero)."""
        scales = []
        for x in (k, v):
            amax = float(x.detach().abs().max()) if x.numel() else 0.0
            scales.append(amax / self.fp8_max if amax > 0 and math.isfinite(amax) else 1.0)
        self.set_scales(li, *scales)

    def write(self, li: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        """Scatter new K/V rows ``[num_tokens, num_kv_heads, head_dim]`` into int64 ``slots``."""
        layer = self._layers[li]
        for cache, x, scale in ((layer.key, k, layer.k_scale), (layer.value, v, layer.v_scale)):
            rows = cache.view(-1, x.shape[1], x.shape[2])
            if self.quantized:  # index_copy_ has no fp8 kernel on the CPU: copy the bytes
                q = (x.float() / scale).clamp_(-self.fp8_max, self.fp8_max).to(self.storage_dtype)
                rows.view(torch.uint8).index_copy_(0, slots, q.view(torch.uint8))
            else:
                rows.index_copy_(0, slots, x)

    def copy_blocks(self, src: list[int], dst: list[int]) -> None:
        """Copy whole blocks ``src[i] -> dst[i]`` in every layer, K and V (copy-on-write)."""
        s = torch.tensor(src, device=self.data.device)
        d = torch.tensor(dst, device=self.data.device)
        raw = self.data.view(torch.uint8) if self.quantized else self.data
        raw[:, :, d] = raw[:, :, s]
