"""``paged_attention`` (any query length) against the float64 varlen reference.

The matrix is the features suite's pairwise design: the 18 rows of L18 give every pair of values
of sliding window x query dtype x KV dtype x segments (1, 3, auto) x scale form x soft cap x ALiBi
x sinks at least once, plus 3 rows with all four features on. Group sizes run through 1..16 (3,
5, 6, 7 included), head dims and block sizes cycle through every value, every other case takes a
q tile and key tile other than the default's.

Each case runs two launches, each checked against the reference:

* a mixed batch in ONE launch: q_i = 0, 1, 2..17 and 33..300 new rows after cached contexts of
  0..1000 keys (the longest query spans several q tiles);
* a short batch (every q_i <= the q tile's tokens: decode and speculative decode, 0 included),
  which the segmented kernel and the merge serve when the variant segments (checked).

Both have permuted pages shared between sequences, garbage (out-of-range) table entries past each
sequence and before the earliest window of its rows, NaN in every cache slot no row may read and
NaN in ``out`` before the call; windows cross page, q-tile and chunk (context / new rows)
boundaries. Every 3rd case uses strided query / caches / out, every 4th strided seq_lens /
block_tables / query_start_loc. ``validate=True`` throughout; half the cases pass the bounds.
"""

import itertools

import pytest

from helpers_attention import run_varlen
from kgen.build import load_kernel
from helpers_kernels import L18
from kgen.features import FEATURES
from kgen.reference import TOLERANCES, max_abs_error, within_tolerance
from kgen.space_attention import default_attention_config, is_pruned
from kgen.variant import BLOCK_SIZES, HEAD_DIMS, SPLIT_AUTO

DTYPES = ("fp16", "bf16", "fp32")
KV_DTYPES = ("auto", "fp8_e4m3", "fp8_e5m2")
SPLITS = (1, 3, SPLIT_AUTO)
SCALE_KINDS = ("float", "tensor", "head")
GROUPS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 6, 3)
ALL_ON = (  # (dtype, kv dtype, split, scale form, group) with every feature on
    ("bf16", "fp8_e4m3", SPLIT_AUTO, "head", 16),
    ("fp32", "fp8_e5m2", 1, "tensor", 5),
    ("fp16", "auto", 4, None, 7),
)


def _rows():
    for i, row in enumerate(L18):
        a = [int(c) for c in row]
        feats = [f for f, on in zip(FEATURES, (a[0] == 2, a[5] > 1, a[6] > 1, a[7] > 1)) if on]
        yield DTYPES[a[1] - 1], KV_DTYPES[a[2] - 1], SPLITS[a[3] - 1], SCALE_KINDS[a[4] - 1], feats, GROUPS[i]
    yield from ((d, kv, s, sc, list(FEATURES), g) for d, kv, s, sc, g in ALL_ON)


def _case(i, row):
    dtype, kv, split, scales, feats, group = row
    config = default_attention_config(head_dim=HEAD_DIMS[i % 7], block_size=BLOCK_SIZES[(3 * i) % 7],
                                      group_size=group, dtype=dtype, split_k=split, kv_dtype=kv,
                                      features=feats)
    if i % 2:  # a smaller q tile (more q tiles per query) and another key tile, still unpruned
        wanted = (128, 16, 32)[i % 3]
        tiles = sorted((16, 32, 64, 128, 256), key=lambda t: (abs(t - wanted), t))
        config = next(c for c in (config.replace(q_tile=16 if group < 8 or group == 16 else 32, tile_tokens=t)
                                  for t in tiles) if not is_pruned(c))
    return config, (scales if kv != "auto" else None)


CASES = [_case(i, row) for i, row in enumerate(_rows())]


def _window(config, i):
    """Crossing a page, a q tile, the context / new rows boundary; or 1 token (None without)."""
    if not config.has("sliding_window"):
        return None
    return (config.block_size + 3, 2 * config.tokens_per_q_tile + 1, 37, 1)[i % 4]


def _mixed(config, i):
    """q_i = 0, 1, 2..17, 33..300 (and 1, 0) after contexts of 0..1000 keys. The long query
    spans at most 8 q tiles + 1 token (the interpreter's time grows with q tiles x key tiles)."""
    long = max(33, min(33 + (53 * i + 257) % 268, 8 * config.tokens_per_q_tile + 1))
    q_lens = [0, 1, 2 + i % 16, long, 1, 0]
    contexts = [5 + i, 1000 - 29 * i, (97 * i) % 300, (61 * i) % 250, 0, 3]
    return q_lens, contexts


def _short(config, i):
    """Decode and speculative rows (every q_i fits one q tile): 1, 0, 2..tokens per tile."""
    most = config.tokens_per_q_tile
    q_lens = [1, 0, min(most, 2 + i % 15), most, 1]
    contexts = [600 + 17 * i, 9, 0, (83 * i) % 300, 1 + i]
    return q_lens, contexts


@pytest.mark.parametrize("index", range(len(CASES)), ids=lambda i: CASES[i][0].key)
def test_attention_matrix_matches_reference(index):
    config, scales = CASES[index]
    window = _window(config, index)
    for batch, (q_lens, contexts) in (("mixed", _mixed(config, index)), ("short", _short(config, index))):
        bounds = {}
        if index % 2:  # the graph-safe call: both bounds given (loose ones for the mixed batch)
            bounds = dict(max_query_len=max(q_lens) + (batch == "mixed"),
                          max_seq_len=max(q + c for q, c in zip(q_lens, contexts)) + 3)
        out, ref, inputs = run_varlen(config, q_lens, contexts, seed=200 + index, scales=scales,
                                      window=window, noncontig=index % 3 == 2,
                                      index_views=index % 4 == 3, **bounds)
        if batch == "short" and config.split_k != 1 and not window:  # the segmented path ran
            plan = load_kernel(config).plan_launch(
                len(q_lens), inputs["key_cache"].shape[2], bounds.get("max_query_len", max(q_lens)),
                bounds.get("max_seq_len", max(q + c for q, c in zip(q_lens, contexts))), window=window)
            assert plan[2] > 1, plan
        err = max_abs_error(out, ref)
        assert within_tolerance(out, ref, config.dtype), \
            f"{batch} batch: max abs err {err} > {TOLERANCES[config.dtype]}"
        firsts = [max(0, c - window + 1) // config.block_size for c in contexts] if window else []
        if any(firsts):  # the test really has garbage ids before some window (validate looks away)
            tables, num_blocks = inputs["block_tables"], inputs["key_cache"].shape[0]
            assert any(bool(((tables[s, :f] < 0) | (tables[s, :f] >= num_blocks)).any())
                       for s, f in enumerate(firsts))


def test_matrix_covers_every_pair_and_every_group():
    def factors(config, scales):
        return (config.has("sliding_window"), config.dtype, config.kv_dtype, config.split_k,
                scales, config.has("soft_cap"), config.has("alibi"), config.has("sinks"))

    rows = [factors(c, s) for c, s in CASES[:18]]
    levels = [2, 3, 3, 3, 3, 2, 2, 2]
    for a, b in itertools.combinations([0, 1, 2, 3, 5, 6, 7], 2):
        assert len({(r[a], r[b]) for r in rows}) == levels[a] * levels[b], (a, b)
    assert {(r[2], r[4]) for r in rows if r[2] != "auto"} == {
        (k, s) for k in KV_DTYPES[1:] for s in SCALE_KINDS}
    configs = [c for c, _ in CASES]
    assert {c.group_size for c in configs} == set(range(1, 17))
    assert {c.head_dim for c in configs} == set(HEAD_DIMS)
    assert {c.block_size for c in configs} == set(BLOCK_SIZES)
    assert {c.q_tile for c in configs} >= {16, 32, 64}
    assert sum(set(c.features) == set(FEATURES) for c in configs) >= 3
    assert not any(is_pruned(c) for c in configs)
    # the mixed batch spans several q tiles in every case; the short batch fits one
    assert all(max(_mixed(c, i)[0]) > c.tokens_per_q_tile for i, (c, _) in enumerate(CASES))
    assert max(max(_mixed(c, i)[0]) for i, (c, _) in enumerate(CASES)) > 250
    assert all(max(_short(c, i)[0]) <= c.tokens_per_q_tile for i, (c, _) in enumerate(CASES))
