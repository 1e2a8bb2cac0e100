"""runtime.huge_pages: large CPU buffers asked for on 2 MB pages, the same tensors either way."""

import pytest
import torch

from runtime import huge_pages


@pytest.fixture(autouse=True)
def _fresh_state(monkeypatch):
    monkeypatch.setattr(huge_pages, "_state", {})


def _thp_offered() -> bool:
    try:
        return "[never]" not in huge_pages._THP.read_text()
    except OSError:
        return False


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.uint8])
def test_large_buffers_are_aligned_zeroed_and_live(dtype):
    shape = (3, 5, huge_pages.HUGE // 8 + 7)
    t = huge_pages.zeros(shape, dtype)
    assert t.shape == shape and t.dtype == dtype and t.is_contiguous() and not bool(t.any())
    if _thp_offered():
        assert t.data_ptr() % huge_pages.HUGE == 0
    t.view(-1)[-1] = 1                                 # the last element is inside the allocation
    import gc
    gc.collect()
    assert int(t.view(-1)[-1]) == 1 and int(t.sum()) == 1


def test_small_buffers_and_the_off_switch_take_plain_tensors(monkeypatch):
    small = huge_pages.empty((100,), torch.float32)
    assert small.shape == (100,)
    monkeypatch.setenv("KGEN_HUGE_PAGES", "0")
    assert huge_pages._madvise() is None
    big = huge_pages.zeros(huge_pages.HUGE, torch.uint8)
    assert big.shape == (huge_pages.HUGE,) and not bool(big.any())
