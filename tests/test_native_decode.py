"""The native C decode kernel's own cases: its register tiles and head sizes, the build without
OpenMP, and what it refuses (float64 references from test_model_parity)."""

import pytest
import torch

from helpers_native import require_native
from runtime.attention import AttentionMetadata
from runtime.decode_native import NativeDecode, native_lacks
from runtime.kv_cache import LayerKV
from test_model_parity import NATIVE, cpu_backend, prepare_on_threads, random_paged_case, reference_decode


@pytest.mark.parametrize("d", [64, 80, 128])
@pytest.mark.parametrize("group", [1, 2, 5, 8])
def test_native_decode_head_tiles_match_float64(d, group):
    """The native kernel's register tiles: 4, 2 and 1 query heads per KV head, 64-float chunks and
    a 16-float remainder (d=80), K rows prefetched across block jumps (contexts past AHEAD=8), a
    soft-cap, and an fp8 cache."""
    bs = 16
    lens = [1, 15, 16, 17, 33, 70]
    q, kc, vc, tables, seq_lens = random_paged_case(bs, 2, group, d, lens, seed=d + group)
    meta = AttentionMetadata(slot_mapping=None, prefills=[], num_prefill_tokens=0, block_tables=tables,
                             seq_lens=seq_lens, max_seq_len=max(lens))
    backend = cpu_backend("native", bs, 2, 2 * group, d, kc.shape[0])
    backend.prepare(meta)
    out = backend.decode(q, LayerKV(kc, vc, 1.0, 1.0, kc.dtype), meta, scale=d ** -0.5, logits_soft_cap=3.0)
    torch.testing.assert_close(out.double(), reference_decode(q, kc, vc, tables, seq_lens, d ** -0.5, cap=3.0),
                               rtol=1e-4, atol=1e-4)
    kq, vq = kc.clamp(-400, 400).to(torch.float8_e4m3fn), vc.clamp(-400, 400).to(torch.float8_e4m3fn)
    out = backend.decode(q, LayerKV(kq, vq, 0.5, 2.0, torch.float32), meta, scale=d ** -0.5)
    ref = reference_decode(q, kq.double(), vq.double(), tables, seq_lens, d ** -0.5, k_scale=0.5, v_scale=2.0)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)


def test_native_decode_without_openmp_splits_over_python_threads():
    """The build without OpenMP (a compiler lacking it): chunks of about equal work on Python
    threads, each with its own scratch, equal the float64 reference."""
    import ctypes

    from runtime import native_build

    require_native()  # fails (never skips) without a compiler, saying how to get one
    assert not NATIVE, NATIVE
    cc, version = native_build._compiler()
    lib = ctypes.CDLL(str(native_build._build(cc, version, *native_build.FLAG_SETS[1])))
    assert lib.kgen_paged_decode_openmp() == 0
    fn = lib.kgen_paged_decode
    fn.argtypes, fn.restype, fn.openmp = native_build.ARGTYPES, ctypes.c_int, False
    lens = [70, 1, 33, 16, 17, 5, 64]
    q, kc, vc, tables, seq_lens = random_paged_case(16, 2, 4, 64, lens, seed=11)
    meta = AttentionMetadata(slot_mapping=None, prefills=[], num_prefill_tokens=0, block_tables=tables,
                             seq_lens=seq_lens, max_seq_len=max(lens))
    backend = cpu_backend("native", 16, 2, 8, 64, kc.shape[0])
    backend.fn = fn
    prepare_on_threads(backend, meta, 2)
    assert len(meta.extra[("native_decode", None)][2]) == 2
    out = backend.decode(q, LayerKV(kc, vc, 1.0, 1.0, kc.dtype), meta, scale=0.125)
    torch.testing.assert_close(out.double(), reference_decode(q, kc, vc, tables, seq_lens, 0.125),
                               rtol=1e-4, atol=1e-4)


def test_native_decode_refuses_head_dims_off_its_vector_width():  # refused before any build
    assert "head_dim=40" in native_lacks(torch.float32, 8, 40, torch.device("cpu"))
    with pytest.raises(ValueError, match="head_dim=40: the native kernel needs a multiple of 16"):
        NativeDecode(16, 2, 8, 40, 64)


def test_native_decode_refuses_a_block_outside_the_pool():
    q, kc, vc, tables, seq_lens = random_paged_case(4, 1, 2, 16, [5, 9], seed=1)
    tables[1, 1] = kc.shape[0]  # one past the pool, inside sequence 1's live range
    meta = AttentionMetadata(slot_mapping=None, prefills=[], num_prefill_tokens=0, block_tables=tables,
                             seq_lens=seq_lens, max_seq_len=9)
    backend = cpu_backend("native", 4, 1, 2, 16, kc.shape[0])
    backend.prepare(meta)
    with pytest.raises(RuntimeError, match=r"decode sequence 1 has a block id outside \[0, "):
        backend.decode(q, LayerKV(kc, vc, 1.0, 1.0, kc.dtype), meta, scale=0.25)
