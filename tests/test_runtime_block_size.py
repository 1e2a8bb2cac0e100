"""The runtime's default block size comes from the tuning database when kgen's kernels decode."""

import torch

import runtime
from helpers_checkpoint import make_llama, random_prompts
from kgen.db.schema import make_entry, make_provenance
from kgen.db.store import TuningStore
from kgen.device import pseudo_device
from kgen.workload import Workload
from kgen.variant import VariantConfig
from runtime import SamplingParams
from runtime.attention import default_block_size

CPU = torch.device("cpu")


def _tune_table(root, times: dict[int, float]) -> None:
    """A database for the interpreter where block size b decodes in times[b] ms."""
    prov = make_provenance(pseudo_device("interpreter"), method="test")
    entries = {}
    for block, ms in times.items():
        w = Workload(gpu="interpreter", dtype="fp32", head_dim=64, block_size=block, group_size=2,
                     batch=1, context=64)
        config = VariantConfig(head_dim=64, block_size=block, group_size=2, split_k=1,
                               tile_tokens=32, dtype="fp32")
        entries[w.key] = make_entry(w, config, time_ms=ms, default_time_ms=ms, provenance=prov,
                                    trials=1)
    TuningStore(root, "interpreter", prov).update_best(entries)


def test_default_block_size_follows_the_database(tmp_path, monkeypatch):
    monkeypatch.setenv("KGEN_GPU", "interpreter")
    monkeypatch.setenv("KGEN_DB", str(tmp_path))
    args = dict(config=_config(64), dtype=torch.float32, device=CPU)
    assert default_block_size("triton", **args) == 16  # nothing tuned yet
    _tune_table(tmp_path, {16: 2.0, 32: 1.0, 8: 3.0})
    assert default_block_size("triton", **args) == 32
    assert default_block_size("torch", **args) == 16  # kgen's kernels do not decode
    assert default_block_size("triton", **dict(args, config=_config(32))) == 16
    # plain records never choose an fp8 or windowed model's block size: it has none of its own
    assert default_block_size("triton", **args, kv_cache_dtype="fp8_e5m2") == 16
    assert default_block_size("triton", **dict(args, config=_config(64, sliding_window=8))) == 16


def _config(head_dim, **extra):
    from runtime.config import ModelConfig

    arch = "MistralForCausalLM" if "sliding_window" in extra else "LlamaForCausalLM"
    return ModelConfig.from_dict({"architectures": [arch], "vocab_size": 128,
                                  "hidden_size": 4 * head_dim, "intermediate_size": 64,
                                  "num_hidden_layers": 2, "num_attention_heads": 4,
                                  "num_key_value_heads": 2, "head_dim": head_dim, **extra})


def test_generate_uses_the_recorded_block_size(tmp_path, monkeypatch):
    monkeypatch.setenv("KGEN_GPU", "interpreter")
    monkeypatch.setenv("KGEN_DB", str(tmp_path / "db"))
    _tune_table(tmp_path / "db", {16: 2.0, 32: 1.0})
    make_llama(tmp_path / "model", hidden=128, heads=4, kv_heads=2, head_dim=64, layers=1,
               vocab=128, seed=5)
    prompts = random_prompts([5, 9], 128, seed=5)
    outs = runtime.generate(tmp_path / "model", prompts, SamplingParams(max_tokens=2),
                            backend="triton")
    assert outs.stats["backend"] == "triton" and outs.stats["block_size"] == 32
