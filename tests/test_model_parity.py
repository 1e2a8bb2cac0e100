"""The paged model forward against Hugging Face, and the decode backends against float64.

Block tables are random permutations of the pool, with blocks shared between sequences; lengths
sit at block edges; unused cache slots and output buffers hold large garbage.
"""

import itertools

import pytest
import torch

from helpers_checkpoint import make_llama
from helpers_native import native_missing
from runtime.attention import AttentionMetadata, PrefillSpan, TritonAttention, VarlenBatch
from runtime.decode_native import NativeDecode
from runtime.decode_torch import TorchDecode
from runtime.config import LayerAttention
from runtime.kv_cache import LayerKV
from runtime.loader import load_model


def reference_decode(q, key_cache, value_cache, tables, lens, scale, window=None, k_scale=1.0, v_scale=1.0,
                     cap=None):
    """float64 paged decode, one sequence at a time, over the last ``window`` positions when given
    (reading only those blocks), scores soft-capped at ``cap``. q: [B, H, D] -> [B, H, D] float64."""
    bs, kvh = key_cache.shape[1], key_cache.shape[2]
    group = q.shape[1] // kvh
    out = torch.empty(q.shape, dtype=torch.float64)
    for i, n in enumerate(lens.tolist()):
        start = max(0, n - window) if window else 0
        blocks = tables[i, start // bs: -(-n // bs)].long()
        lo, hi = start % bs, start % bs + n - start
        k = key_cache[blocks].reshape(-1, kvh, q.shape[2])[lo:hi].double().repeat_interleave(group, dim=1) * k_scale
        v = value_cache[blocks].reshape(-1, kvh, q.shape[2])[lo:hi].double().repeat_interleave(group, dim=1) * v_scale
        s = torch.einsum("hd,thd->ht", q[i].double(), k) * scale
        p = torch.softmax(cap * torch.tanh(s / cap) if cap else s, dim=-1)
        out[i] = torch.einsum("ht,thd->hd", p, v)
    return out


def random_paged_case(bs, kvh, group, d, lens, seed=0, dtype=torch.float32):
    """Random q and caches; tables are permuted pool blocks, sequences 0 and 1 share a prefix block."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-n // bs) for n in lens]
    num_blocks = sum(need) + 4
    key_cache = (torch.rand(num_blocks, bs, kvh, d, generator=g) * 2e4 - 1e4).to(dtype)  # garbage
    value_cache = (torch.rand(num_blocks, bs, kvh, d, generator=g) * 2e4 - 1e4).to(dtype)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables = torch.zeros(len(lens), max(need), dtype=torch.int32)
    for i, nb in enumerate(need):
        tables[i, :nb] = torch.tensor([perm.pop() for _ in range(nb)])
    tables[1, 0] = tables[0, 0]  # a shared block
    for i, n in enumerate(lens):  # real values where sequences have tokens
        for j in range(n):
            b = int(tables[i, j // bs])
            key_cache[b, j % bs] = torch.randn(kvh, d, generator=g).to(dtype)
            value_cache[b, j % bs] = torch.randn(kvh, d, generator=g).to(dtype)
    q = torch.randn(len(lens), kvh * group, d, generator=g).to(dtype)
    return q, key_cache, value_cache, tables, torch.tensor(lens, dtype=torch.int32)


NATIVE = native_missing(8, 64)


def cpu_backend(name, bs, kvh, heads, d, num_blocks, window=None, layers=None, dtype=torch.float32, **kw):
    """The torch or the native (C) decode backend for ``dtype`` over ``layers`` (default: one
    layer with ``window``); the native one is skipped without a C compiler."""
    layers = layers or [LayerAttention(scale=1.0, sliding_window=window)]
    if name == "torch":
        return TorchDecode(bs, kvh, d, dtype, layers=layers, **kw)
    if NATIVE:
        pytest.skip(NATIVE)
    return NativeDecode(bs, kvh, heads, d, num_blocks, layers=layers, dtype=dtype)


def prepare_on_threads(backend, meta, threads):
    """``backend.prepare(meta)`` planned for ``threads`` torch threads (the count restored after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        backend.prepare(meta)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("name", ["torch", "native"])
@pytest.mark.parametrize("bs,group", [(1, 1), (16, 4), (32, 3)])
def test_cpu_decode_matches_float64(name, bs, group):
    lens = [bs, bs + 1, 2 * bs - 1 if bs > 1 else 3, 1, 3 * bs]
    q, kc, vc, tables, seq_lens = random_paged_case(bs, 2, group, 32, lens, seed=bs)
    meta = AttentionMetadata(slot_mapping=None, prefills=[], num_prefill_tokens=0, block_tables=tables,
                             seq_lens=seq_lens, max_seq_len=max(lens))
    backend = cpu_backend(name, bs, 2, 2 * group, 32, kc.shape[0])
    backend.prepare(meta)
    out = backend.decode(q, LayerKV(kc, vc, 1.0, 1.0, kc.dtype), meta, scale=32 ** -0.5)
    ref = reference_decode(q, kc, vc, tables, seq_lens, 32 ** -0.5)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("window", [None, 1, 5, 16])
@pytest.mark.parametrize("group_tokens", [8, 4096, "native"])
def test_cpu_decode_windows_never_read_freed_blocks(window, group_tokens):
    """torch with many length groups (budget 8 rows) or one, and the native kernel (2 threads);
    entries a window has freed, and the padding, point at a NaN block."""
    bs = 4
    lens = [1, 3, 4, 5, 8, 9, 16, 17, 31]
    q, kc, vc, tables, seq_lens = random_paged_case(bs, 2, 3, 16, lens, seed=7)
    used = {int(tables[i, j]) for i, n in enumerate(lens) for j in range(-(-n // bs))}
    poison = min(set(range(kc.shape[0])) - used)  # a block no sequence holds
    kc[poison] = float("nan")
    vc[poison] = float("nan")
    if window:
        for i, n in enumerate(lens):
            tables[i, : max(0, n - window) // bs] = poison   # freed: may hold anything
    for i, n in enumerate(lens):
        tables[i, -(-n // bs):] = poison                     # padding too
    meta = AttentionMetadata(slot_mapping=None, prefills=[], num_prefill_tokens=0, block_tables=tables,
                             seq_lens=seq_lens, max_seq_len=max(lens))
    if group_tokens == "native":
        backend = cpu_backend("native", bs, 2, 6, 16, kc.shape[0], window=window)
        prepare_on_threads(backend, meta, 2)
        chunks, work = meta.extra[("native_decode", window)][2:]
        assert meta.extra["native_threads"] == 2
        # OpenMP build: one chunk, a scratch area per thread; else one chunk per Python thread
        assert (len(chunks), work[0].shape[0]) == ((1, 2) if backend.fn.openmp else (2, 1))
    else:
        backend = cpu_backend("torch", bs, 2, 6, 16, kc.shape[0], window=window, group_tokens=group_tokens)
        backend.prepare(meta)
        groups = meta.extra[("torch_decode", window)]
        assert (len(groups) > 1) == (group_tokens == 8)
    out = backend.decode(q, LayerKV(kc, vc, 1.0, 1.0, kc.dtype), meta, scale=0.25, sliding_window=window)
    ref = reference_decode(q, kc, vc, tables, seq_lens, 0.25, window=window)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["torch", "native"])
@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2"])
def test_cpu_decode_reads_fp8_with_scales(name, fmt):
    """An fp8 cache: the decode equals float64 attention over the dequantized cache."""
    from runtime.kv_cache import storage_dtype

    bs = 16
    q, kc, vc, tables, seq_lens = random_paged_case(bs, 2, 4, 32, [1, 15, 16, 17, 40], seed=3)
    fp8 = storage_dtype(fmt, torch.float32)
    k_scale, v_scale = 0.02, 0.5
    kq = (kc.clamp(-1e3, 1e3) / k_scale).clamp(-torch.finfo(fp8).max, torch.finfo(fp8).max).to(fp8)
    vq = (vc.clamp(-1e3, 1e3) / v_scale).clamp(-torch.finfo(fp8).max, torch.finfo(fp8).max).to(fp8)
    meta = AttentionMetadata(slot_mapping=None, prefills=[], num_prefill_tokens=0, block_tables=tables,
                             seq_lens=seq_lens, max_seq_len=40)
    backend = cpu_backend(name, bs, 2, 8, 32, kq.shape[0], **({"group_tokens": 32} if name == "torch" else {}))
    backend.prepare(meta)
    out = backend.decode(q, LayerKV(kq, vq, k_scale, v_scale, torch.float32), meta, scale=32 ** -0.5)
    ref = reference_decode(q, kq.double(), vq.double(), tables, seq_lens, 32 ** -0.5, k_scale=k_scale,
                           v_scale=v_scale)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-4)


def test_triton_backend_decodes_against_float64():
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # CPU: the interpreter
    case = random_paged_case(16, 2, 2, 64, [16, 17, 1, 40], seed=5)
    q, kc, vc, tables, seq_lens = (t.to(device) for t in case)
    starts = torch.arange(5, dtype=torch.int32, device=device)
    meta = AttentionMetadata(slot_mapping=None, prefills=[], num_prefill_tokens=0,
                             varlen=VarlenBatch(starts, seq_lens, tables, max_query_len=1, max_seq_len=40))
    backend = TritonAttention(16, 2, 4, 64, torch.float32, device)
    backend.prepare(meta)
    out = backend.attend(q, LayerKV(kc, vc, 1.0, 1.0, kc.dtype), meta, LayerAttention(0.125))
    torch.testing.assert_close(out.double().cpu(), reference_decode(*case, 0.125), rtol=1e-4, atol=1e-4)
    assert backend.launches == 1


def mixed_step(model, prompts, bs, *, shared, sharers=(0, 2, 3), decode_extra=1, backend=None,
               triton=False):
    """One forward over a mixed batch on a garbage-filled cache of permuted, shared blocks.

    prompts[0] prefills its tokens after a cached prefix, prompts[1] prefills whole, prompts[2:]
    decode their last token (their earlier tokens already in the cache). The sequences in
    ``sharers`` start with the same ``shared`` tokens (whole blocks): their block tables point at
    the same physical blocks for that prefix, written once, and the later tokens of each read it
    back. Every other block is its own, drawn from a random permutation of the pool.

    Returns logits of: the last token of each prefill, each decode token; decoded by ``backend``
    (default: the torch backend). With ``triton`` the step runs kgen's kernel over every row in
    one launch per layer (the prefills' keys, cached and new, read from the cache).
    """
    assert shared % bs == 0 and all(prompts[i][:shared] == prompts[sharers[0]][:shared] for i in sharers)
    assert all(len(prompts[i]) > shared for i in sharers)  # the shared blocks stay full and read-only
    cache = model.make_kv_cache(64, bs)
    cache.data.copy_(torch.rand(cache.data.shape) * 2e4 - 1e4)  # garbage everywhere first
    perm = torch.randperm(64).tolist()
    prefix_blocks = [perm.pop() for _ in range(shared // bs)]
    tables = []
    for i, p in enumerate(prompts):
        own = prefix_blocks if i in sharers else []
        tables.append(own + [perm.pop() for _ in range(-(-(len(p) + decode_extra) // bs) - len(own))])
    cached = {i: shared if i in sharers else 0 for i in range(len(prompts))}

    def slots(i, positions):
        return [tables[i][p // bs] * bs + p % bs for p in positions]

    def prefill_span(i, row, end):
        """Positions cached[i]:end of sequence i as batch rows row.. (reading its cached prefix)."""
        ctx = torch.tensor(slots(i, range(cached[i]))) if cached[i] else None
        return PrefillSpan(row, row + end - cached[i], cached[i], end, ctx)

    # Fill the cache with the model itself: the shared prefix once (as sequence sharers[0]'s), then
    # each decode sequence's context after it, reading the shared prefix back from the cache.
    warm = [(sharers[0], PrefillSpan(0, shared, 0, shared), range(shared))]
    warm += [(i, prefill_span(i, 0, len(prompts[i]) - 1), range(cached[i], len(prompts[i]) - 1))
             for i in range(2, len(prompts)) if len(prompts[i]) - 1 > cached[i]]
    for i, span, rng in warm:
        meta = AttentionMetadata(torch.tensor(slots(i, rng)), [span], len(rng))
        model.forward(torch.tensor([prompts[i][p] for p in rng]), torch.tensor(list(rng)), cache, meta,
                      None, torch.tensor([len(rng) - 1]))
    ids, pos, slot, spans, rows = [], [], [], [], []
    for i, start in ((0, cached[0]), (1, cached[1])):
        n = len(prompts[i])
        spans.append(prefill_span(i, len(ids), n))
        ids += prompts[i][start:]
        pos += range(start, n)
        slot += slots(i, range(start, n))
        rows.append(len(ids) - 1)
    npf = len(ids)
    dec = list(range(2, len(prompts)))
    ids += [prompts[i][-1] for i in dec]
    pos += [len(prompts[i]) - 1 for i in dec]
    slot += [slots(i, [len(prompts[i]) - 1])[0] for i in dec]
    rows += list(range(npf, npf + len(dec)))
    width = max(len(tables[i]) for i in dec)
    meta = AttentionMetadata(torch.tensor(slot), spans, npf,
                             block_tables=torch.tensor([tables[i] + [0] * (width - len(tables[i])) for i in dec],
                                                       dtype=torch.int32),
                             seq_lens=torch.tensor([len(prompts[i]) for i in dec], dtype=torch.int32),
                             max_seq_len=max(len(prompts[i]) for i in dec))
    backend = backend or TorchDecode(bs, model.config.num_key_value_heads, model.config.head_dim)
    if triton:
        order = [0, 1] + dec  # the rows' order: the two prefills, then the decodes
        q_lens = [len(prompts[0]) - cached[0], len(prompts[1])] + [1] * len(dec)
        width = max(len(t) for t in tables)
        meta.varlen = VarlenBatch(
            torch.tensor([0] + list(itertools.accumulate(q_lens)), dtype=torch.int32),
            torch.tensor([len(prompts[i]) for i in order], dtype=torch.int32),
            torch.tensor([tables[i] + [0] * (width - len(tables[i])) for i in order], dtype=torch.int32),
            max_query_len=max(q_lens), max_seq_len=max(len(p) for p in prompts))
        c = model.config
        backend = TritonAttention(bs, c.num_key_value_heads, c.num_attention_heads, c.head_dim,
                                  model.dtype, torch.device("cpu"), layers=model.attention)
    backend.prepare(meta)
    return model.forward(torch.tensor(ids), torch.tensor(pos), cache, meta, backend, torch.tensor(rows)), tables


@pytest.mark.parametrize("hidden,heads,kv_heads,head_dim,bs", [
    (64, 4, 4, 16, 16),   # MHA (group 1)
    (48, 8, 2, 8, 1),     # GQA group 4, block size 1, head_dim != hidden / heads
    (48, 3, 1, 16, 32),   # odd head count, group 3
    (40, 5, 5, 8, 4),     # odd head count, group 1
])
def test_mixed_prefill_and_decode_batch_matches_transformers(tmp_path, hidden, heads, kv_heads, head_dim, bs):
    """Sequences 0 (prefill after a cached prefix), 2 and 3 (decode) share their first blocks."""
    _mixed_matches_transformers(tmp_path, hidden, heads, kv_heads, head_dim, bs, triton=False)


@pytest.mark.parametrize("hidden,heads,kv_heads,head_dim,bs", [
    (128, 4, 2, 64, 16),  # GQA group 2
    (96, 6, 2, 64, 8),    # group 3, head_dim != hidden / heads, small blocks
])
def test_mixed_batch_in_one_kgen_launch_per_layer_matches_transformers(tmp_path, hidden, heads, kv_heads,
                                                                        head_dim, bs):
    """The same mixed step with the triton backend: one kgen launch per layer runs the extend,
    the whole prefill and the decodes together, every key read from the (garbage-filled,
    permuted, shared) cache."""
    _mixed_matches_transformers(tmp_path, hidden, heads, kv_heads, head_dim, bs, triton=True)


def _mixed_matches_transformers(tmp_path, hidden, heads, kv_heads, head_dim, bs, *, triton):
    hf = make_llama(tmp_path, hidden=hidden, heads=heads, kv_heads=kv_heads, head_dim=head_dim, layers=3, vocab=128)
    model = load_model(tmp_path, device="cpu").model
    g = torch.Generator().manual_seed(heads)
    shared = bs if bs > 1 else 2  # whole blocks

    def tokens(n):
        return torch.randint(3, 128, (n,), generator=g).tolist()

    prefix = tokens(shared)
    # tails put lengths at block edges: 2 fills its prefix block and starts a new one with its
    # decode token, 4 ends exactly on a block; 1 and 4 share nothing
    prompts = [prefix + tokens(bs + 3), tokens(bs if bs > 1 else 5), prefix + tokens(1),
               prefix + tokens(bs + 2 if bs > 1 else 3), tokens(2 * bs)]
    logits, tables = mixed_step(model, prompts, bs, shared=shared, triton=triton)
    n_shared = shared // bs
    assert tables[0][:n_shared] == tables[2][:n_shared] == tables[3][:n_shared]
    flat = [b for i, t in enumerate(tables) for b in (t[n_shared:] if i in (0, 2, 3) else t)]
    assert len(set(flat)) == len(flat) and not set(flat) & set(tables[0][:n_shared])
    assert any(t != sorted(t) for t in tables)  # really permuted
    with torch.no_grad():
        ref = torch.stack([hf(torch.tensor([p])).logits[0, -1] for p in prompts])
    torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)
