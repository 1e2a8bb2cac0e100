"""Split planning (templates/plan.py.j2) and the fixed grid: the planner's choices, occupancy,
merge step sizes, grids that do not depend on lengths, and fixed-grid results against float64."""

import itertools

import pytest
import torch

from kgen.build import load_kernel
from kgen.reference import make_paged_inputs, max_abs_error, paged_attention_reference, within_tolerance
from kgen.variant import SPLIT_AUTO, VariantConfig

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The suite's default variant (d128, block 16, tiles of 64): what the planner mostly serves.
SUITE_G8 = VariantConfig(head_dim=128, block_size=16, group_size=8, split_k=SPLIT_AUTO,
                         tile_tokens=64, dtype="bf16")
SMALL = VariantConfig(head_dim=64, block_size=8, group_size=2, split_k=SPLIT_AUTO, tile_tokens=16,
                      dtype="fp32")


def _cost(module, base, tiles, splits, slots):
    """The planner's model: waves x tiles per program."""
    return -(-base * splits // slots) * -(-tiles // splits)


@pytest.mark.parametrize("sms,per_sm", [(132, 4), (132, 2), (108, 2), (78, 3)])
def test_batch_one_fills_every_sm_for_one_to_eight_kv_heads(sms, per_sm):
    """Issue 13: batch 1 with 1-8 KV heads must give every SM a program at long context."""
    module = load_kernel(SUITE_G8)
    assert module._MIN_TILES_PER_SPLIT == 3  # g8 partials: 8 x 130 fp32 per 32 KiB K/V tile
    for kv_heads, tokens in itertools.product(range(1, 9), (8192, 32768)):
        splits = module.plan_splits(1, kv_heads, tokens, sms, per_sm)
        tiles = -(-tokens // 64)
        cap = tiles // module._MIN_TILES_PER_SPLIT  # 170 at 32k, 42 at 8k
        widest = min(cap, sms * per_sm // kv_heads)  # most partitions one wave holds
        # as few tiles per program as one wave allows (with the fewest partitions doing so)
        assert -(-tiles // splits) == -(-tiles // widest), (kv_heads, tokens, splits)
        assert kv_heads * splits <= sms * per_sm  # one wave: no straggler wave
        assert -(-tiles // splits) >= module._MIN_TILES_PER_SPLIT
        if tokens == 32768 and kv_heads >= 2:
            assert kv_heads * splits >= sms  # every SM has a program
    # one KV head at 32k: 512 tiles, at least 3 per partition -> 128 partitions of 4 tiles (170
    # partitions would also take 4 tiles each: the kernel's cdiv(512, 170) = 4 leaves 42 empty)
    assert module.plan_splits(1, 1, 32768, sms, per_sm) == 128


def test_plan_is_the_cheapest_under_its_model_with_fewest_partitions():
    """Brute force over every partition count: the planner's pick has the least modelled time
    among plans of at most _MAX_PLAN_WAVES waves (past that, programs no longer run in lockstep
    waves and the model's quantization gains are not real), and no smaller count has the same."""
    module = load_kernel(SUITE_G8)
    for base_seqs, kv_heads, tokens, sms, per_sm in itertools.product(
            (1, 2, 4, 16, 64, 256), (1, 4, 8, 32), (100, 1024, 4096, 32768), (108, 132), (2, 4)):
        splits = module.plan_splits(base_seqs, kv_heads, tokens, sms, per_sm)
        base, tiles, slots = base_seqs * kv_heads, -(-tokens // 64), sms * per_sm
        cap = max(1, min(module._MAX_SPLITS, tiles // module._MIN_TILES_PER_SPLIT))
        assert 1 <= splits <= cap
        costs = {s: _cost(module, base, tiles, s, slots) for s in range(1, cap + 1)}
        shallow = {s: c for s, c in costs.items()
                   if s == 1 or -(-base * s // slots) <= module._MAX_PLAN_WAVES}
        best = min(shallow.values())
        case = (base_seqs, kv_heads, tokens, sms, per_sm, splits)
        assert costs[splits] == best, case
        assert splits == min(s for s, c in shallow.items() if c == best), case


def test_suite_plans_on_an_h200():
    """What the planner gives the suite's shapes on 132 SMs x 4 resident programs (the audit's
    120-128 registers and 54 KiB of shared memory per partial program on sm_90)."""
    module = load_kernel(SUITE_G8)
    h200 = dict(num_sms=132, programs_per_sm=4)
    # (batch, KV heads, context) -> partitions; group 8 = 4 KV heads, group 1 = 32
    assert module.plan_splits(1, 4, 32768, **h200) == 128    # 512 programs of 4 tiles
    assert module.plan_splits(4, 4, 8192, **h200) == 32      # 512 programs of 4 tiles
    assert module.plan_splits(64, 4, 4096, **h200) == 2      # as before issue 13 (88% of copy)
    assert module.plan_splits(256, 4, 1024, **h200) == 1
    assert module.plan_splits(1, 32, 32768, **h200) == 16    # 512 programs of 32 tiles
    assert module.plan_splits(64, 32, 4096, **h200) == 1


def test_resident_programs_follow_cuda_occupancy():
    module = load_kernel(SUITE_G8)
    # sm_90 (228 KiB shared per SM) and sm_80 (164 KiB): the audit's partial kernel
    assert module.resident_programs(regs_per_thread=120, shared_bytes=55296, num_warps=4,
                                    smem_per_sm=233472) == 4
    assert module.resident_programs(regs_per_thread=128, shared_bytes=55296, num_warps=4,
                                    smem_per_sm=167936) == 2
    assert module.resident_programs(regs_per_thread=255, shared_bytes=0, num_warps=8,
                                    smem_per_sm=233472) == 1  # registers bind
    assert module.resident_programs(regs_per_thread=32, shared_bytes=1024, num_warps=1,
                                    smem_per_sm=233472) == 32  # the block limit binds


def test_off_gpu_slots_are_constants():
    module = load_kernel(SUITE_G8)
    assert module.device_slots(torch.device("cpu")) == (132, 2)
    assert module.device_slots(None) == (132, 2)
    assert module.choose_num_splits(1, 4, 32768) == module.plan_splits(1, 4, 32768, 132, 2)


def test_merge_steps_cover_the_partitions():
    module = load_kernel(SUITE_G8)
    assert [module.merge_shape(n) for n in (1, 16, 17, 32, 33, 64, 65, 256)] == [
        (16, 2), (16, 2), (32, 4), (32, 4), (64, 8), (64, 8), (64, 8), (64, 8)]


class _Recorder:
    def __init__(self, sink, name):
        self.sink, self.name = sink, name

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.sink.append((self.name, grid, kwargs.get("SPLIT_CHUNK")))
        return launch


def test_fixed_grid_depends_only_on_shapes(monkeypatch):
    """The launches of a fixed-grid call are the same whatever the lengths or max_seq_len: what
    CUDA-graph capture needs. They are planned for the table's capacity."""
    module = load_kernel(SMALL)
    sink = []
    for name in module.KERNELS:
        monkeypatch.setattr(module, name, _Recorder(sink, name))
    grids = []
    for lens, max_len in (([0, 1, 9], 9), ([200, 7, 64], 200), ([256, 256, 256], None)):
        inputs = make_paged_inputs(3, 4, 2, 64, 8, lens, "fp32", seed=1,
                                   extra_table_cols=32 - -(-max(lens) // 8))
        assert inputs["block_tables"].shape[1] == 32  # capacity 256 tokens = 16 tiles
        inputs.pop("scale")
        sink.clear()
        module.paged_attention_decode(**inputs, max_seq_len=max_len, fixed_grid=True)
        grids.append(list(sink))
    assert grids[0] == grids[1] == grids[2]
    want = module.plan_splits(3, 2, 256, 132, 2)
    assert want > 1 and grids[0][0][1] == (3, 2, want)
    sink.clear()  # without the fixed grid, short lengths get fewer partitions (or one pass)
    inputs = make_paged_inputs(3, 4, 2, 64, 8, [0, 1, 9], "fp32", seed=1, extra_table_cols=30)
    inputs.pop("scale")
    module.paged_attention_decode(**inputs, max_seq_len=9)
    assert sink[0][1] != grids[0][0][1]


def _nan_workspaces(monkeypatch):
    """torch.empty of fp32 returns NaN-filled tensors: workspace slots the partial kernel skips
    must never reach the output."""
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.dtype == torch.float32:
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", nan_empty)


@pytest.mark.parametrize("dtype,features", [("fp32", ()), ("fp16", ()),
                                            ("fp16", ("sliding_window", "sinks"))])
def test_fixed_grid_matches_reference(monkeypatch, dtype, features):
    """Ragged lengths at block and tile edges, one long sequence, shared and permuted blocks,
    NaN in unused cache slots, in ``out`` and in the fp32 workspaces; the grid sized for the
    table's capacity leaves most partitions of the short sequences empty."""
    config = SMALL.replace(dtype=dtype, features=features)
    lens = [0, 1, 7, 8, 9, 16, 17, 250]
    extra = dict(sliding_window=200) if features else {}
    inputs = make_paged_inputs(len(lens), 4, 2, 64, 8, lens, dtype, seed=3, device=DEVICE,
                               poison_unused=True, features=features, extra_table_cols=4, **extra)
    module = load_kernel(config)
    capacity = inputs["block_tables"].shape[1] * 8
    tokens = min(capacity, 200 + 16) if features else capacity
    splits = module.plan_splits(len(lens), 2, tokens, 132, 2)
    assert splits >= 4  # several partitions, most of them empty for the short sequences
    _nan_workspaces(monkeypatch)
    out = torch.full_like(inputs["query"], float("nan"))
    module.paged_attention_decode(**inputs, out=out, fixed_grid=True, validate=True)
    ref = paged_attention_reference(**inputs)
    assert within_tolerance(out, ref, dtype), max_abs_error(out, ref)
    if not features:
        assert torch.all(out[0] == 0)  # an empty context gives exact zeros


@pytest.mark.parametrize("num_splits", [17, 32, 33, 64, 65, 130])
def test_merge_step_edges(monkeypatch, num_splits):
    """Partition counts at the merge's step sizes (16 / 32 / 64 per step) and past one step."""
    lens = [0, 5, 77, 300]
    inputs = make_paged_inputs(4, 4, 2, 64, 8, lens, "fp32", seed=num_splits, device=DEVICE,
                               poison_unused=True)
    _nan_workspaces(monkeypatch)
    out = torch.full_like(inputs["query"], float("nan"))
    load_kernel(SMALL).paged_attention_decode(**inputs, out=out, num_splits=num_splits)
    ref = paged_attention_reference(**inputs)
    assert within_tolerance(out, ref, "fp32"), max_abs_error(out, ref)


def test_cuda_slots_come_from_the_device_and_the_compiled_kernel(monkeypatch):
    """The GPU path without a GPU: SM count from the device properties (read once), residency
    from the first launched kernel's registers and shared memory."""
    from types import SimpleNamespace

    module = load_kernel(SUITE_G8)
    props = SimpleNamespace(multi_processor_count=132, shared_memory_per_multiprocessor=233472,
                            max_threads_per_multi_processor=2048)
    reads = []

    def get_props(index):
        reads.append(index)
        return props

    monkeypatch.setattr(module.torch.cuda, "get_device_properties", get_props)
    monkeypatch.setattr(module, "_interpreting", lambda: False)
    monkeypatch.setattr(module, "_SMS", {})
    monkeypatch.setattr(module, "_RESIDENT", {})
    cuda0 = torch.device("cuda", 0)
    assert module.device_slots(cuda0) == (132, 2)  # before any launch: the assumed 2 per SM
    module._learn_residency(cuda0, None)  # the interpreter's launch returns nothing: no change
    compiled = SimpleNamespace(n_regs=120, metadata=SimpleNamespace(shared=55296, num_warps=4))
    module._learn_residency(cuda0, compiled)
    module._learn_residency(cuda0, SimpleNamespace(n_regs=255, metadata=compiled.metadata))  # kept
    assert module.device_slots(cuda0) == (132, 4)
    assert module.device_slots(cuda0) == (132, 4)
    assert reads == [0, 0]  # SM count once, the properties once for the residency
    assert module.choose_num_splits(1, 4, 32768, device=cuda0) == 128
    assert module.device_slots(torch.device("cpu")) == (132, 2)
