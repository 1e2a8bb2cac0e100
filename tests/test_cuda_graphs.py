"""runtime/cuda_graphs.py: padded sizes, the on/off decision, static buffers, and decode steps
replayed through the runner (on the CPU with an eager stand-in for the capture; on a GPU, real
CUDA graphs against eager decode)."""

import sys
from pathlib import Path

import pytest
import torch

from runtime import cuda_graphs as cg
from runtime.sampling import SamplingParams

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from decode_steps import PRESETS, random_model  # noqa: E402


def test_capture_sizes_and_padding():
    assert cg.capture_sizes(64) == (1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64)
    assert cg.capture_sizes(3) == (1, 2, 3)
    assert cg.capture_sizes(20) == (1, 2, 4, 8, 16, 20)
    sizes = cg.capture_sizes(32)
    assert [cg.padded_size(sizes, n) for n in (1, 2, 3, 5, 8, 9, 32)] == [1, 2, 4, 8, 8, 16, 32]
    assert cg.padded_size(sizes, 33) is None
    with pytest.raises(ValueError, match="max_batch=0"):
        cg.capture_sizes(0)


def test_graphs_on_by_default_only_for_cuda_with_triton():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert cg.graphs_wanted(None, device=cuda, backend="triton") is True
    assert cg.graphs_wanted(None, device=cuda, backend="torch") is False
    assert cg.graphs_wanted(None, device=cpu, backend="triton") is False
    assert cg.graphs_wanted(False, device=cuda, backend="triton") is False
    assert cg.scratch_blocks(None, device=cuda, backend="triton") == 1
    assert cg.scratch_blocks(None, device=cpu, backend="torch") == 0
    with pytest.raises(ValueError, match="cuda_graphs=True needs a CUDA device; the model is on cpu"):
        cg.graphs_wanted(True, device=cpu, backend="triton")
    with pytest.raises(ValueError, match="needs backend='triton'"):
        cg.graphs_wanted(True, device=cuda, backend="torch")
    with pytest.raises(ValueError, match="cuda_graphs='yes'"):
        cg.graphs_wanted("yes", device=cuda, backend="triton")


def test_static_inputs_pad_rows_into_the_scratch_slot_and_reuse_buffers():
    s = cg.StaticDecodeInputs(max_batch=8, max_blocks=5, block_size=4, scratch_slot=40, device="cpu")
    ptrs = [t.data_ptr() for t in (s.token_ids, s.positions, s.slot_mapping, s.block_tables, s.seq_lens)]
    s.fill(8, [7, 8, 9, 10, 11, 12, 13, 14], range(8), range(100, 108), [[1, 2]] * 8, [5] * 8)
    s.fill(4, [3, 4, 5], [9, 2, 6], [37, 9, 25], [[9, 2, 3], [2, 0, 0], [6, 6, 0]], [10, 3, 7])
    assert s.token_ids[:4].tolist() == [3, 4, 5, 0]
    assert s.positions[:4].tolist() == [9, 2, 6, 0]
    assert s.slot_mapping[:4].tolist() == [37, 9, 25, 40]  # the padded row writes the scratch slot
    assert s.seq_lens[:4].tolist() == [10, 3, 7, 1]  # and attends to its own key there
    assert s.block_tables[:3, :3].tolist() == [[9, 2, 3], [2, 0, 0], [6, 6, 0]]
    assert s.block_tables[3].tolist() == [10] * 5  # the scratch block (slot 40 / block size 4)
    assert s.seq_lens[4:].tolist() == [5] * 4  # rows past the padded size are not touched
    assert [t.data_ptr() for t in (s.token_ids, s.positions, s.slot_mapping, s.block_tables,
                                   s.seq_lens)] == ptrs
    meta = s.metadata(4)
    assert meta.seq_lens.data_ptr() == s.seq_lens.data_ptr() and meta.seq_lens.shape == (4,)
    assert meta.block_tables.shape == (4, 5) and meta.max_seq_len == 20
    v = meta.varlen  # kgen's contract: one row per sequence, bounds fixed at 1 and the capacity
    assert v.query_start_loc.tolist() == [0, 1, 2, 3, 4] and (v.max_query_len, v.max_seq_len) == (1, 20)
    assert v.seq_lens.data_ptr() == s.seq_lens.data_ptr()
    with pytest.raises(ValueError, match="3 rows do not fit a padded size of 2"):
        s.fill(2, [1, 2, 3], [0] * 3, [0] * 3, [[0]] * 3, [1] * 3)
    with pytest.raises(ValueError, match=r"block tables of shape \(1, 6\)"):
        s.fill(1, [1], [0], [0], [[0] * 6], [1])


def _eager_capture(fn, pool=None):
    """Stands in for a CUDA graph on the CPU: each replay re-runs the captured function."""
    return fn, None


def _engine(monkeypatch, loaded, graphs: bool, *, max_num_seqs=4):
    from runtime import engine as engine_mod

    if graphs:  # what cuda_graphs=True does on a GPU, with the eager stand-in for the capture
        monkeypatch.setattr(engine_mod, "scratch_blocks", lambda option, **kw: 1)
        monkeypatch.setattr(cg, "capture_graph", _eager_capture)
    else:
        monkeypatch.setattr(engine_mod, "scratch_blocks", cg.scratch_blocks)
    return engine_mod.Engine(loaded, num_blocks=24, block_size=8, max_num_seqs=max_num_seqs,
                             backend="triton", enable_prefix_caching=False)


def _run(engine, prompts, budgets):
    for ids, n in zip(prompts, budgets):
        engine.add_request(ids, SamplingParams(max_tokens=n, ignore_eos=True))
    done = []
    while engine.has_unfinished():
        engine.step()
        done += engine.pop_finished()
    return [d.completions[0][0] for d in sorted(done, key=lambda d: d.request_id)]


@pytest.mark.slow
def test_replayed_decode_steps_match_eager_decode(monkeypatch):
    """Three requests finishing at different steps: batches of 3, 2 and 1 replay the graphs of
    padded sizes 4, 2 and 1 (bounds fixed at capture, padded rows in the scratch block). The tokens and the
    K/V the pool holds equal eager decode's, and no pool block but the sequences' is written."""
    loaded = random_model(PRESETS["tiny"], device="cpu", seed=5, std=0.2)
    prompts = [[5, 9, 2, 7, 1, 3, 8], [4, 4, 6], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20]]
    budgets = [6, 3, 9]  # lengths cross block edges (block size 8)
    eager = _engine(monkeypatch, loaded, graphs=False)
    want = _run(eager, prompts, budgets)
    graphed = _engine(monkeypatch, loaded, graphs=True)
    assert graphed.graphs is not None and graphed.kv_cache.data.shape[2] == 25  # pool + scratch block
    got = _run(graphed, prompts, budgets)
    assert got == want
    # one prefill step, then one replay per decode-only step until the longest budget is spent
    assert graphed.graphs.captured == (1, 2, 4) and graphed.graphs.replays == max(budgets) - 1
    pool_g, pool_e = graphed.kv_cache.data[:, :, :24], eager.kv_cache.data[:, :, :24]
    torch.testing.assert_close(pool_g, pool_e, atol=1e-5, rtol=1e-5)
    assert graphed.kv_cache.data[:, :, 24].abs().sum() > 0  # padded rows wrote only the scratch block


def test_batches_past_the_largest_graph_run_eagerly(monkeypatch):
    loaded = random_model(PRESETS["tiny"], device="cpu", seed=1)
    engine = _engine(monkeypatch, loaded, graphs=True, max_num_seqs=2)
    assert engine.graphs.sizes == (1, 2)
    runner = engine.graphs
    assert runner.replay([1, 2, 3], [0, 0, 0], [0, 0, 0], [[0]] * 3, [1, 1, 1]) is None
    width = runner.inputs.max_blocks + 1
    assert runner.replay([1], [0], [0], [[0] * width], [1]) is None
    assert runner.captured == ()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_replay_equals_eager_decode_on_gpu():
    """Real CUDA graphs: greedy tokens equal eager decode's (fp32, so that the eager path's other
    split plan cannot flip a near-tie); a replay equals running the captured step eagerly on the
    same static inputs."""
    from runtime.engine import Engine

    loaded = random_model(dict(PRESETS["small"], num_hidden_layers=2, dtype="fp32"), device="cuda",
                          seed=3)

    def engine(graphs):
        return Engine(loaded, num_blocks=256, block_size=16, max_num_seqs=8, backend="triton",
                      enable_prefix_caching=False, cuda_graphs=graphs)

    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, 32000, (n,), generator=gen).tolist() for n in (5, 40, 130, 17, 300)]
    budgets = [12, 30, 7, 20, 25]
    want = _run(engine(False), prompts, budgets)
    graphed = engine(True)
    assert graphed.graphs is not None
    assert _run(graphed, prompts, budgets) == want
    assert graphed.graphs.replays > 0 and 8 in graphed.graphs.captured
    runner = graphed.graphs
    replay, logits, meta = runner._graphs[8]
    replay()
    torch.cuda.synchronize()
    replayed = logits.clone()
    eager = runner._forward(8, meta)
    torch.cuda.synchronize()
    torch.testing.assert_close(replayed, eager, rtol=1e-5, atol=1e-5)
    assert not torch.equal(replayed, torch.zeros_like(replayed))


def test_generate_names_a_graph_request_it_cannot_serve():
    import runtime

    loaded = random_model(PRESETS["tiny"], device="cpu", seed=2)
    with pytest.raises(ValueError, match="cuda_graphs=True needs a CUDA device; the model is on cpu"):
        runtime.generate(loaded, [[1, 2, 3]], cuda_graphs=True)
    out = runtime.generate(loaded, [[1, 2, 3]], SamplingParams(max_tokens=2), cuda_graphs=False)
    assert len(out[0].outputs[0].token_ids) == 2
