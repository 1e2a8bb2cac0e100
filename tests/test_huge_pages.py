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


def test_only_large_buffers_are_marked_and_at_a_2mb_boundary(monkeypatch):
    """madvise (a spy here, so this holds whatever the machine's THP setting) is asked only for
    buffers of 2 MB or more, over exactly the returned tensor's bytes, from a 2 MB boundary."""
    calls = []
    monkeypatch.setattr(huge_pages, "_state", {"fn": lambda addr, length, advice: calls.append((addr, length,
                                                                                                   advice)) or 0})
    small = huge_pages.empty((100,), torch.float32)
    assert small.shape == (100,) and calls == []
    big = huge_pages.zeros((3, huge_pages.HUGE // 4 + 5), torch.float32)
    assert calls == [(big.data_ptr(), big.numel() * 4, huge_pages._MADV_HUGEPAGE)]
    assert big.data_ptr() % huge_pages.HUGE == 0 and not bool(big.any())


def test_the_off_switch_and_other_devices_take_plain_tensors(monkeypatch):
    monkeypatch.setenv("KGEN_HUGE_PAGES", "0")
    assert huge_pages._madvise() is None
    big = huge_pages.zeros(huge_pages.HUGE, torch.uint8)
    assert big.shape == (huge_pages.HUGE,) and not bool(big.any())
    assert huge_pages.zeros((4, 4), torch.float32, device="meta").device.type == "meta"
