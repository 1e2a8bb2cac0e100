"""The native C decode kernel's own cases: its register tiles and head sizes, the build without
OpenMP, scores that are NaN or infinite (torch's answers), and what it refuses before reading
anything (float64 references from test_model_parity)."""

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


def _case(lens, seed=1, bs=4, kvh=1, group=2, d=16):
    q, kc, vc, tables, seq_lens = random_paged_case(bs, kvh, group, d, lens, seed=seed)
    meta = AttentionMetadata(slot_mapping=None, prefills=[], num_prefill_tokens=0, block_tables=tables,
                             seq_lens=seq_lens, max_seq_len=max(lens))
    backend = cpu_backend("native", bs, kvh, kvh * group, d, kc.shape[0])
    return q, kc, vc, tables, meta, backend


def test_native_decode_refuses_a_block_outside_the_pool():
    q, kc, vc, tables, meta, backend = _case([5, 9])
    tables[1, 1] = kc.shape[0]  # one past the pool, inside sequence 1's live range
    backend.prepare(meta)
    with pytest.raises(ValueError, match=r"decode sequence 1 has a block id outside \[0, "):
        backend.decode(q, LayerKV(kc, vc, 1.0, 1.0, kc.dtype), meta, scale=0.25)


def test_native_decode_refuses_a_length_beyond_its_block_table():
    """A length past the table's blocks would read the next sequence's row (or past the tensor
    for the last one): refused, naming the sequence and the table's capacity."""
    q, kc, vc, tables, meta, backend = _case([5, 9])   # 3 blocks of 4 per row: 12 positions
    meta.seq_lens[1] = 13
    backend.prepare(meta)
    out = torch.full_like(q, float("nan"))
    with pytest.raises(ValueError, match=r"decode sequence 1: live range \[0, 13\) does not fit its block table "
                                         r"\(3 blocks of 4 = 12 positions\)"):
        out = backend.decode(q, LayerKV(kc, vc, 1.0, 1.0, kc.dtype), meta, scale=0.25)
    assert out.isnan().all()


def test_native_decode_refuses_a_cache_of_another_layout_or_shape():
    q, kc, vc, tables, meta, backend = _case([5, 9])
    backend.prepare(meta)
    wide = torch.randn(*kc.shape[:-1], 2 * kc.shape[-1])
    strided = wide[..., : kc.shape[-1]]                              # right shape, rows not contiguous
    with pytest.raises(ValueError, match=r"the key cache .* has strides .*contiguous NHD blocks only"):
        backend.decode(q, LayerKV(strided, vc, 1.0, 1.0, torch.float32), meta, scale=0.25)
    with pytest.raises(ValueError, match=r"the value cache \(.*\) on cpu must be a CPU tensor \[num_blocks>="):
        backend.decode(q, LayerKV(kc, vc[:, :2], 1.0, 1.0, torch.float32), meta, scale=0.25)
    with pytest.raises(ValueError, match=r"the cache holds torch.float64 but the model computes in torch.float32"):
        backend.decode(q, LayerKV(kc.double(), vc.double(), 1.0, 1.0, torch.float64), meta, scale=0.25)
    with pytest.raises(ValueError, match=r"q \(2, 2, 8\) torch.float32 must be \[2, 2, 16\] of torch.float32"):
        backend.decode(q[..., :8], LayerKV(kc, vc, 1.0, 1.0, torch.float32), meta, scale=0.25)


def test_native_kernel_reports_shapes_and_scratch_as_what_they_are():
    """Called directly, the C kernel refuses a shape it cannot run with its own code (not a
    sequence's), and a scratch area smaller than a sequence needs; the backend's messages say so."""
    q, kc, vc, tables, meta, backend = _case([5, 9])
    lens = meta.seq_lens.contiguous()
    starts, out, work = torch.zeros_like(lens), torch.empty_like(q), torch.empty(1, 2 * (9 + 32))

    def call(heads, work_stride):
        return backend.fn(q.data_ptr(), kc.data_ptr(), vc.data_ptr(), None, tables.data_ptr(), tables.shape[1],
                          starts.data_ptr(), lens.data_ptr(), 0, 2, heads, 1, 16, 4, kc.shape[0], 0.25, 0.0, 1.0,
                          out.data_ptr(), work.data_ptr(), work_stride, 1, 0)

    assert call(300, work.shape[1]) == 1 and "a shape the kernel cannot run" in backend._error(1, meta, starts, lens,
                                                                                               tables)
    assert call(2, 2 * (5 + 32)) == 16 + 4 * 1 + 2                  # sequence 1 (9 positions) needs 2 * 41
    assert "needs more scratch" in backend._error(16 + 4 + 2, meta, starts, lens, tables)
    assert call(2, work.shape[1]) == 0


def sdpa_per_sequence(q, kc, vc, tables, lens, scale):
    """What transformers' decode step computes for each sequence alone: torch's SDPA over its live
    K/V, unmasked (no padding), in float32."""
    bs, kvh, d = kc.shape[1], kc.shape[2], kc.shape[3]
    group = q.shape[1] // kvh
    out = torch.empty_like(q)
    for i, n in enumerate(lens):
        blocks = tables[i, : -(-n // bs)].long()
        k = kc[blocks].reshape(-1, kvh, d)[:n].repeat_interleave(group, dim=1).transpose(0, 1)[None]  # [1, H, n, D]
        v = vc[blocks].reshape(-1, kvh, d)[:n].repeat_interleave(group, dim=1).transpose(0, 1)[None]
        out[i] = torch.nn.functional.scaled_dot_product_attention(q[i][None, :, None], k, v, scale=scale)[0, :, 0]
    return out


@pytest.mark.parametrize("poison", ["nan_row", "nan_head", "inf_score"])
def test_native_decode_non_finite_scores_give_torchs_answers(poison):
    """torch's CPU SDPA, as transformers runs it for a decode step (one sequence, no mask), skips
    NaN when it takes a row's maximum, gives zeros to a head whose every score is NaN (or -inf),
    and NaN where a NaN or +inf score meets finite ones; the native kernel (built without
    -ffast-math) does the same. (With a padding mask torch's SDPA gives NaN for the all-NaN head:
    transformers' unbatched answer is the one kept.)"""
    bs, lens = 4, [3, 9, 6]
    q, kc, vc, tables, seq_lens = random_paged_case(bs, 2, 2, 16, lens, seed=5)
    blk, kvh = int(tables[2, 1]), 0     # sequence 2's own blocks (0 and 1 share one)
    if poison == "nan_row":            # one position of sequence 2: NaN scores among finite ones
        kc[blk, 1, kvh] = float("nan")
    elif poison == "nan_head":         # every position of sequence 2, KV head 0: all scores NaN
        for j in range(lens[2]):
            kc[int(tables[2, j // bs]), j % bs, kvh, 3] = float("nan")
    else:                              # +inf in one K value: a +inf or -inf score
        kc[blk, 0, kvh, 5] = float("inf")
    meta = AttentionMetadata(slot_mapping=None, prefills=[], num_prefill_tokens=0, block_tables=tables,
                             seq_lens=seq_lens, max_seq_len=max(lens))
    backend = cpu_backend("native", bs, 2, 4, 16, kc.shape[0])
    backend.prepare(meta)
    out = backend.decode(q, LayerKV(kc, vc, 1.0, 1.0, kc.dtype), meta, scale=0.25)
    want = sdpa_per_sequence(q, kc, vc, tables, lens, 0.25)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert out[:2].isfinite().all() and out[2, 2:].isfinite().all()   # other sequences, other heads
    if poison == "nan_head":
        assert (out[2, :2] == 0).all()
    else:
        assert out[2, :2].isnan().all()
