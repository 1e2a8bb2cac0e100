"""Views of engines' KV cache layouts in kgen's NHD form (kgen.integrations.kv_views), on CPU tensors.

The GPU layouts (vLLM 0.32's [num_blocks, num_kv_heads, block_size, 2 * head_dim] in any physical
stride order, and the older [num_blocks, 2, ...] / [2, num_blocks, ...] ones) cannot run with vLLM
here, so their view building is tested against packed copies of random K/V: the views must equal
the originals element for element, share the cache's memory, and feed kgen's kernel to the float64
reference. vLLM-CPU's own writer for layout 'cpu' is exercised in tests/test_vllm_integration.py.
"""

import pytest
import torch

from kgen.build import load_kernel
from kgen.integrations.kv_views import nhd_views
from kgen.reference import make_paged_inputs, paged_attention_reference, within_tolerance
from kgen.variant import VariantConfig

KVH, D, BS = 2, 64, 16


def _pack(layout: str, key: torch.Tensor, value: torch.Tensor, physical: str = "default") -> torch.Tensor:
    """Pack NHD K/V [nb, bs, kvh, d] into ``layout`` the way the engine stores it (a new tensor)."""
    if layout == "cpu":
        # per (block, head): K transposed [d, bs] then V [bs, d], viewed as [bs, 2d] rows
        k_t = key.permute(0, 2, 3, 1).reshape(key.shape[0], KVH, -1)     # [nb, kvh, d * bs]
        v_r = value.permute(0, 2, 1, 3).reshape(key.shape[0], KVH, -1)   # [nb, kvh, bs * d]
        return torch.cat([k_t, v_r], dim=-1).view(key.shape[0], KVH, BS, 2 * D).contiguous()
    if layout == "bhnc":
        logical = torch.cat([key, value], dim=-1).transpose(1, 2)         # [nb, kvh, bs, 2d]
        if physical == "default":  # LBHNC: the logical order is the memory order
            return logical.contiguous()
        # LBNHC: memory [nb, bs, kvh, 2d], seen through the logical [nb, kvh, bs, 2d] order
        return logical.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "b2nhd":
        return torch.stack([key, value], dim=1).contiguous()
    if layout == "2bnhd":
        return torch.stack([key, value], dim=0).contiguous()
    raise AssertionError(layout)


CASES = [("cpu", "default"), ("bhnc", "default"), ("bhnc", "LBNHC"), ("b2nhd", "default"),
         ("2bnhd", "default")]


@pytest.mark.parametrize("layout,physical", CASES)
def test_views_equal_the_packed_kv_and_share_memory(layout, physical):
    gen = torch.Generator().manual_seed(3)
    nb = 7
    key = torch.randn(nb, BS, KVH, D, generator=gen)
    value = torch.randn(nb, BS, KVH, D, generator=gen)
    cache = _pack(layout, key, value, physical)
    k_view, v_view = nhd_views(cache, layout, num_kv_heads=KVH, head_dim=D, block_size=BS)
    assert k_view.shape == v_view.shape == (nb, BS, KVH, D)
    assert torch.equal(k_view, key) and torch.equal(v_view, value)
    # a view, not a copy: a write into the engine's cache shows through the view
    assert k_view.untyped_storage().data_ptr() == cache.untyped_storage().data_ptr()
    cache.mul_(-2.0)
    assert torch.equal(k_view, -2.0 * key) and torch.equal(v_view, -2.0 * value)


@pytest.mark.parametrize("layout,physical", CASES)
def test_kgen_kernel_through_the_views_matches_the_reference(layout, physical):
    lens = [1, BS - 1, BS, BS + 1, 3 * BS + 5]
    data = make_paged_inputs(len(lens), 2 * KVH, KVH, D, BS, lens, "fp32", seed=11)
    cache = _pack(layout, data["key_cache"], data["value_cache"], physical)
    k_view, v_view = nhd_views(cache, layout, num_kv_heads=KVH, head_dim=D)
    kernel = load_kernel(VariantConfig(head_dim=D, block_size=BS, group_size=2, split_k=2,
                                       dtype="fp32")).paged_attention_decode
    out = torch.full_like(data["query"], float("nan"))
    kernel(data["query"], k_view, v_view, data["block_tables"], data["seq_lens"], out=out)
    ref = paged_attention_reference(data["query"], data["key_cache"], data["value_cache"],
                                    data["block_tables"], data["seq_lens"])
    assert within_tolerance(out, ref, "fp32")


def test_cpu_layout_view_keeps_block_and_head_strides_of_a_strided_cache():
    # vLLM may place several layers' pages side by side: a block stride larger than the page
    gen = torch.Generator().manual_seed(5)
    key = torch.randn(4, BS, KVH, D, generator=gen)
    value = torch.randn(4, BS, KVH, D, generator=gen)
    packed = _pack("cpu", key, value)
    wide = torch.zeros(4, 3, KVH, BS, 2 * D)
    wide[:, 1] = packed
    k_view, v_view = nhd_views(wide[:, 1], "cpu", num_kv_heads=KVH, head_dim=D)
    assert torch.equal(k_view, key) and torch.equal(v_view, value)


@pytest.mark.parametrize("layout,shape,needle", [
    ("cpu", (3, KVH, BS, D), "kv_cache.shape[3]=64"),
    ("cpu", (3, 4, BS, 2 * D), "kv_cache.shape[1] (num_kv_heads)=4"),
    ("bhnc", (3, BS, 2 * D), "kv_cache.shape=(3, 16, 128)"),
    ("b2nhd", (2, 3, BS, KVH, D), "kv_cache.shape=(2, 3, 16, 2, 64)"),
    ("2bnhd", (2, 3, BS, KVH, 32), "kv_cache.shape[4] (head_dim)=32"),
    ("nhd", (3, BS, KVH, D), "layout='nhd'"),
])
def test_bad_shapes_and_layouts_name_the_value(layout, shape, needle):
    with pytest.raises(ValueError) as info:
        nhd_views(torch.zeros(shape), layout, num_kv_heads=KVH, head_dim=D)
    assert needle in str(info.value)


def test_block_size_mismatch_and_non_dense_cpu_page_are_named():
    cache = torch.zeros(3, KVH, BS, 2 * D)
    with pytest.raises(ValueError, match=r"kv_cache.shape\[2\] \(block_size\)=16 differs from block_size=32"):
        nhd_views(cache, "bhnc", num_kv_heads=KVH, head_dim=D, block_size=32)
    strided = torch.zeros(3, KVH, 2 * D, BS).transpose(2, 3)  # token stride 1: not vLLM-CPU's page
    with pytest.raises(ValueError, match="dense"):
        nhd_views(strided, "cpu", num_kv_heads=KVH, head_dim=D)
