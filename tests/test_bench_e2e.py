"""Smoke test of bench/e2e_throughput.py: a --quick run in float32 and bfloat16 writes its tables
and JSON, with vLLM peers played by a stand-in ``vllm`` package (the protocol, the variants'
settings and the headline's arithmetic are under test here, not vLLM)."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import e2e_throughput  # noqa: E402

FAKE_VLLM = '''
import os, types
__version__ = "0.0-fake"
class SamplingParams:
    def __init__(self, max_tokens, **kw):
        self.max_tokens = max_tokens
class LLM:
    def __init__(self, model, **kw):
        assert kw["dtype"] in ("float32", "bfloat16") and kw["skip_tokenizer_init"]
        assert kw["enable_prefix_caching"] is False
        reserved = int(os.environ.get("VLLM_CPU_NUM_OF_RESERVED_CPU", "1"))
        cores = list(range(2 - reserved))
        print(f"INFO [ompmultiprocessing.py:185] local_rank=0, core ids={cores}", flush=True)
        print(f"INFO [ompmultiprocessing.py:185] reserved_cpus={list(range(2 - reserved, 2))}", flush=True)
        print(f"WARNING [vllm.py:1] eager={kw['enforce_eager']}: torch.compile off" if kw["enforce_eager"]
              else "INFO [compilation.py:1] torch.compile on", flush=True)
    def generate(self, prompts, params, use_tqdm=False):
        def out(p, s):
            return types.SimpleNamespace(token_ids=[p["prompt_token_ids"][0]] * s.max_tokens)
        return [types.SimpleNamespace(outputs=[out(p, s)]) for p, s in zip(prompts, params)]
'''


def test_quick_run_with_peers_writes_json_and_markdown(tmp_path, capsys, monkeypatch):
    fake = tmp_path / "fake"
    (fake / "vllm").mkdir(parents=True)
    (fake / "vllm" / "__init__.py").write_text(FAKE_VLLM)
    (fake / "vllm" / "inputs.py").write_text("def TokensPrompt(prompt_token_ids):\n"
                                             "    return {'prompt_token_ids': prompt_token_ids}\n")
    monkeypatch.setenv("PYTHONPATH", str(fake))
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    out_json, out_md = tmp_path / "e2e.json", tmp_path / "e2e.md"
    assert e2e_throughput.main(["--quick", "--device", "cpu", "--repeats", "2", "--hf-repeats", "2",
                                "--ours-threads", "1,2",
                                "--peer-python", sys.executable, "--vllm-variants", "compiled,eager_allcores",
                                "--peer-variant", "bound:VLLM_CPU_OMP_THREADS_BIND=0",
                                "--json", str(out_json), "--md", str(out_md)]) == 0
    result = json.loads(out_json.read_text())
    assert result["machine"]["device"] == "cpu" and result["prefix_caching"].startswith("off for every engine")
    prov = result["e2e_provenance"]
    assert len(prov["commit"]) == 40 and isinstance(prov["dirty"], bool)
    assert prov["environment"]["OMP_WAIT_POLICY"] == "PASSIVE" and len(prov["loadavg_start"]) == 3
    work = result["workload"]
    assert set(result["dtypes"]) == {"float32", "bfloat16"}
    for dtype, res in result["dtypes"].items():
        engines = res["engines"]
        assert set(engines) == {"ours_1thr", "ours_2thr", "vllm_compiled", "vllm_eager_allcores", "vllm_bound",
                                "hf_static", "hf_continuous"}
        for name, row in engines.items():
            assert len(row["times_s"]) == 2 and row["best_s"] == min(row["times_s"]) and len(row["loadavg"]) == 2
            assert row["tokens_per_s"] == work["generated_tokens"] / row["best_s"]
            assert row["useful_tokens"] == work["generated_tokens"]
        assert engines["hf_static"]["computed_tokens"] > work["generated_tokens"]   # rows run to the batch's longest
        assert engines["hf_continuous"]["computed_tokens"] == work["generated_tokens"]
        for name in ("ours_1thr", "ours_2thr", "hf_continuous"):  # the same tokens as HF's static batches
            assert engines[name]["identical_requests"] == 6, (dtype, name, engines[name])
        assert engines["ours_1thr"]["threads"]["num_threads"] == 1 and engines["ours_2thr"]["computing_cores"] == 2
        assert engines["vllm_compiled"]["peer"]["enforce_eager"] is False
        assert engines["vllm_eager_allcores"]["peer"]["enforce_eager"] is True
        assert engines["vllm_compiled"]["computing_cores"] == 1
        assert engines["vllm_eager_allcores"]["computing_cores"] == 2
        assert engines["vllm_bound"]["peer"]["env"]["VLLM_CPU_OMP_THREADS_BIND"] == "0"
        assert engines["vllm_compiled"]["peer"]["dtype"] == dtype
        assert engines["vllm_compiled"]["identical_requests"] == 0          # the stand-in repeats a prompt token
        assert engines["vllm_compiled"]["cpus_used"] == 2 and engines["vllm_eager_allcores"]["cpus_used"] == 2
        cpus = res["headline"]["equal_cpus"]["2"]   # all three vLLM runs occupy both CPUs
        fastest = max(("vllm_compiled", "vllm_eager_allcores", "vllm_bound"), key=lambda k: engines[k]["tokens_per_s"])
        assert cpus["vllm"] == fastest and "1" not in res["headline"]["equal_cpus"]
        eq = res["headline"]["equal_cores"]
        assert eq["2"]["vllm"] == "vllm_eager_allcores" and eq["2"]["ours"] == "ours_2thr"
        assert eq["2"]["ratio"] == engines["ours_2thr"]["tokens_per_s"] / engines["vllm_eager_allcores"]["tokens_per_s"]
        assert res["parity"]["engines"]["vllm_compiled"]["divergent"] == 6
        assert res["parity"]["engines"]["ours_2thr"]["divergent"] == 0
        assert any("core ids=[0, 1]" in ln for ln in prov["vllm_logs"][f"vllm_eager_allcores_{dtype}"])
    table = out_md.read_text()
    assert "### float32" in table and "### bfloat16" in table and "| hf_continuous |" in table
    assert "Equal cores (2): ours_2thr / vllm_eager_allcores" in table and "Equal CPUs (2): ours_2thr" in table
    assert "computes on 1 core(s) + 1 reserved" in table
    assert table.strip() in capsys.readouterr().out
