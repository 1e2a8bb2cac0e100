"""A short real tuning run under the Triton interpreter, and the correctness gate of measuring."""

import types

import pytest
import torch

from kgen.cli import main
from kgen.db.store import TuningStore
from kgen.reference import make_paged_inputs, paged_attention_reference, within_tolerance
from kgen.tune import measure_kernel
from kgen.tune.measure_kernel import InterpreterMeasurer, check_lens
from kgen.workload import Workload
from kgen.variant import VariantConfig

W = Workload("interpreter", "fp16", 64, 16, 2, 1, 512)


def test_interpreter_tuning_run_end_to_end(tmp_path, capsys):
    code = main(["tune", "--gpu", "interpreter", "--trials", "3", "--head-dim", "64",
                 "--block-size", "16", "--group-size", "2", "--batch", "1", "--context", "512",
                 "--db", str(tmp_path), "--quiet"])
    assert code == 0, capsys.readouterr().err
    store = TuningStore(tmp_path, "interpreter")
    entry = store.load_best()["entries"][W.key]
    assert entry["provenance"]["method"].startswith("triton interpreter")
    assert entry["provenance"]["gpu"] == "interpreter" and entry["trials"] == 3
    assert entry["time_ms"] > 0 and entry["default_time_ms"] > 0
    records = [r for r in store.read_trials() if r["type"] == "trial"]
    measured = [r for r in records if r["phase"] == "search" and not r.get("extra", {}).get("static")]
    assert len(measured) == 3  # statically pruned candidates are free: not in the budget
    assert {r["phase"] for r in records} >= {"final-winner", "final-default"}
    # the recorded winner is a correct kernel on fresh random paged data
    from kgen.build import load_kernel

    config = VariantConfig.from_key(entry["config_key"])
    inputs = make_paged_inputs(3, 4, 2, 64, 16, [33, 16, 1], "fp16", seed=5)
    out = torch.full_like(inputs["query"], float("nan"))
    load_kernel(config).paged_attention_decode(**inputs, out=out)
    assert within_tolerance(out, paged_attention_reference(**inputs), "fp16")
    assert main(["db", "show", "--db", str(tmp_path), "--gpu", "interpreter"]) == 0
    assert "interpreter" in capsys.readouterr().out


def _fake_module(behaviour):
    def paged_attention_decode(query, key_cache, value_cache, block_tables, seq_lens, *,
                               scale=None, out=None, **_):
        ref = paged_attention_reference(query, key_cache, value_cache, block_tables, seq_lens,
                                        scale).to(query.dtype)
        out = torch.empty_like(query) if out is None else out
        if behaviour == "right":
            out.copy_(ref)
        elif behaviour == "skips last sequence":  # leaves the NaN poison in place
            out[:-1].copy_(ref[:-1])
        elif behaviour == "off by a little":
            out.copy_(ref + 0.05)
        return out

    return types.SimpleNamespace(paged_attention_decode=paged_attention_decode)


@pytest.mark.parametrize("behaviour, status", [("right", "ok"), ("skips last sequence", "failed"),
                                               ("off by a little", "failed")])
def test_wrong_kernels_are_failed_records(monkeypatch, behaviour, status):
    import kgen.build

    monkeypatch.setattr(kgen.build, "load_kernel", lambda config: _fake_module(behaviour))
    result = InterpreterMeasurer(repeats=1).measure(VariantConfig(head_dim=64, group_size=2), W)
    assert result.status == status
    if status == "failed":
        assert result.reason.startswith("wrong result")


def test_statically_pruned_and_unbuildable_candidates(monkeypatch):
    measurer = InterpreterMeasurer(repeats=1)
    pruned = measurer.measure(VariantConfig(head_dim=64, group_size=2, tile_tokens=256,
                                            num_warps=1), W)
    assert pruned.status == "pruned" and pruned.reason.startswith("static prune")
    assert measurer.calls == 0  # nothing was built or timed

    import kgen.build

    def broken(config):
        raise SyntaxError("template rendered badly")

    monkeypatch.setattr(kgen.build, "load_kernel", broken)
    result = measurer.measure(VariantConfig(head_dim=64, group_size=2), W)
    assert result.status == "pruned" and "does not build" in result.reason


def test_audit_failures_prune_before_building(monkeypatch):
    class Result:
        pass

    import kgen.audit

    monkeypatch.setattr(kgen.audit, "audit_variant", lambda config, target: Result())
    monkeypatch.setattr(kgen.audit, "failures", lambda result: ["kernel spills (64 B spill stores)"])
    measurer = measure_kernel.KernelMeasurer("h100", audit_target="sm_90")
    config = VariantConfig(head_dim=64, group_size=2)
    result = measurer.measure(config, W)
    assert result.status == "pruned" and "audit sm_90: kernel spills" in result.reason
    monkeypatch.setattr(kgen.audit, "audit_variant", lambda config, target: 1 / 0)
    assert measurer.measure(config, W).reason.startswith("audit sm_90")  # cached per variant
    other = measurer.measure(config.replace(num_warps=2), W)
    assert "does not compile for sm_90: ZeroDivisionError" in other.reason


def test_check_lengths_hit_block_edges():
    config = VariantConfig(head_dim=64, block_size=16, tile_tokens=32)
    assert check_lens(config, W) == [65, 16, 1]
    assert check_lens(config, W.replace(context=32)) == [32, 16, 1]


def test_gpu_timing_inputs_are_a_valid_paged_step():
    """GpuMeasurer's timing inputs (built on the CPU here): every page used once, lengths in
    [context/2, context] with one at the context, and the kernel agrees with the reference."""
    measurer = measure_kernel.GpuMeasurer("h100", audit_target=None, num_kv_heads=2)
    measurer.torch_device = "cpu"
    config = VariantConfig(head_dim=64, block_size=16, group_size=2, split_k=2, tile_tokens=32)
    workload = W.replace(batch=4, context=64)
    inputs = measurer._timing_inputs(config, workload, seed=3)
    lens = inputs["seq_lens"].tolist()
    assert lens[0] == 64 and all(32 <= n <= 64 for n in lens) and len(lens) == 4
    pages = [(n + 15) // 16 for n in lens]
    used = [int(b) for row, n in zip(inputs["block_tables"], pages) for b in row[:n]]
    assert sorted(used) == list(range(inputs["key_cache"].shape[0]))  # a permutation of all pages
    assert inputs["query"].shape == (4, 4, 64) and inputs["key_cache"].dtype == torch.float16
    from kgen.build import load_kernel

    out = torch.full_like(inputs["query"], float("nan"))
    load_kernel(config).paged_attention_decode(**inputs, out=out)
    assert within_tolerance(out, paged_attention_reference(**inputs), "fp16")
