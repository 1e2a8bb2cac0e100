"""Smoke test of bench/e2e_throughput.py: a --quick run writes its table and JSON, with a vLLM
peer played by a stand-in ``vllm`` package (the protocol, not vLLM, is under test here)."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import e2e_throughput  # noqa: E402

FAKE_VLLM = '''
import types
__version__ = "0.0-fake"
class SamplingParams:
    def __init__(self, max_tokens, **kw):
        self.max_tokens = max_tokens
class LLM:
    def __init__(self, model, **kw):
        assert kw["dtype"] == "float32" and kw["enforce_eager"] and kw["skip_tokenizer_init"]
    def generate(self, prompts, params, use_tqdm=False):
        return [types.SimpleNamespace(outputs=[types.SimpleNamespace(token_ids=[p["prompt_token_ids"][0]] * s.max_tokens)])
                for p, s in zip(prompts, params)]
'''


def test_quick_run_with_a_peer_writes_json_and_markdown(tmp_path, capsys, monkeypatch):
    fake = tmp_path / "fake"
    (fake / "vllm").mkdir(parents=True)
    (fake / "vllm" / "__init__.py").write_text(FAKE_VLLM)
    (fake / "vllm" / "inputs.py").write_text("def TokensPrompt(prompt_token_ids):\n"
                                             "    return {'prompt_token_ids': prompt_token_ids}\n")
    monkeypatch.setenv("PYTHONPATH", str(fake))
    out_json, out_md = tmp_path / "e2e.json", tmp_path / "e2e.md"
    assert e2e_throughput.main(["--quick", "--device", "cpu", "--backend", "torch", "--repeats", "2",
                                "--ours-threads", "1", "--peer-python", sys.executable,
                                "--peer-variant", "allcores:VLLM_CPU_NUM_OF_RESERVED_CPU=0",
                                "--json", str(out_json), "--md", str(out_md)]) == 0
    result = json.loads(out_json.read_text())
    assert result["machine"]["device"] == "cpu" and len(result["machine"]["loadavg_start"]) == 3
    engines = result["engines"]
    assert set(engines) == {"ours", "ours_1thr", "vllm", "vllm_allcores", "hf"}
    work = result["workload"]
    assert work["requests"] == 6 and work["generated_tokens"] > work["requests"]
    for name, row in engines.items():
        assert len(row["times_s"]) == 2 and row["best_s"] == min(row["times_s"]) and row["tokens_per_s"] > 0
        assert len(row["loadavg"]) == 2
    for name in ("ours", "ours_1thr"):  # the same tokens as HF generate, in batches
        assert engines[name]["identical_requests"] == 6, engines[name]
    assert engines["ours_1thr"]["stats"]["num_threads"] == 1
    assert engines["vllm"]["identical_requests"] == 0 and len(engines["vllm"]["first_divergence_positions"]) == 6
    assert engines["vllm"]["peer"]["vllm"] == "0.0-fake"
    assert engines["vllm_allcores"]["peer"]["env"]["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    assert engines["vllm"]["peer"]["env"]["VLLM_CPU_KVCACHE_SPACE"] == "4"
    assert result["ratios"]["ours_over_hf"] == engines["ours"]["tokens_per_s"] / engines["hf"]["tokens_per_s"]
    stats = engines["ours"]["stats"]
    assert stats["peak_blocks_in_use"] > 0 and stats["backend"] == "torch"
    table = out_md.read_text()
    assert "| ours |" in table and "| vllm |" in table and "| hf |" in table
    assert table.strip() in capsys.readouterr().out
