"""``--kernel attention`` on ``kgen variants`` and ``kgen emit``: the emitted module runs alone (in
a process where ``import kgen`` fails) and matches the float64 varlen reference; the decode
default is unchanged; bad combinations are one line and exit 2."""

import json

import pytest

from helpers_kernels import run_emitted
from kgen.cli import main
from test_cli_generator import test_bad_options_exit_2_with_one_line as one_line_exit_2
from kgen.reference import within_tolerance
from kgen.reference_varlen import make_varlen_inputs, paged_attention_varlen_reference
from kgen.variant import VariantConfig
from kgen.variant_attention import AttentionVariantConfig

def test_emitted_attention_module_runs_without_kgen(tmp_path, capsys):
    path = tmp_path / "attention.py"
    features = "sliding_window,soft_cap,alibi,sinks"
    assert main(["emit", "--kernel", "attention", "--head-dim", "64", "--block-size", "16",
                 "--group-size", "3", "--dtype", "fp16", "--kv-dtype", "fp8_e5m2", "--features",
                 features, "-o", str(path)]) == 0
    key = capsys.readouterr().out.split()[0]
    assert key.startswith("paged_attention-d64-b16-g3-m64-sauto-") and key.endswith("-swa-cap-alibi-sinks")
    text = path.read_text()
    assert "kgen" not in "".join(line for line in text.splitlines() if line.startswith(("import", "from")))
    assert f"kgen emit --key {key} -o" in text  # the command that reproduces the file
    inputs = make_varlen_inputs([3, 0, 1, 40], [20, 5, 70, 9], 6, 2, 64, 16, "fp16", seed=4,
                                poison_unused=True, kv_dtype="fp8_e5m2", scale_kind="head",
                                features=features, sliding_window=19)
    out, emitted_key = run_emitted(path, inputs, "paged_attention", tmp_path)
    assert emitted_key == key
    assert within_tolerance(out, paged_attention_varlen_reference(**inputs), "fp16")


def test_variants_lists_the_attention_family(capsys):
    assert main(["variants", "--kernel", "attention", "--head-dim", "128", "--block-size", "16",
                 "--group-size", "6", "--q-tile", "16,64", "--split-k", "auto", "--dtype", "bf16",
                 "--limit", "0", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    configs = [AttentionVariantConfig.from_key(r["key"]) for r in rows]
    assert configs and {c.q_tile for c in configs} == {16, 64}
    assert all(c.group_size == 6 and c.split_auto and r["q_tile"] == c.q_tile
               for c, r in zip(configs, rows))
    assert main(["variants", "--kernel", "attention", "--group-size", "16", "--q-tile", "16,32",
                 "--head-dim", "64", "--block-size", "16", "--dtype", "fp16", "--count"]) == 0
    kept = int(capsys.readouterr().out.split()[0])
    assert kept > 0  # q tiles of 16 and 32 rows hold 1 and 2 tokens of 16 heads


def test_decode_stays_the_default(tmp_path, capsys):
    assert main(["variants", "--head-dim", "64", "--block-size", "8", "--limit", "1"]) == 0
    assert VariantConfig.from_key(capsys.readouterr().out.split()[0]).family == "decode"
    assert main(["emit", "--head-dim", "64", "--block-size", "8", "-o", str(tmp_path / "d.py")]) == 0
    assert "def paged_attention_decode(" in (tmp_path / "d.py").read_text()
    key = "paged_attention-d64-b8-g1-m16-s1-t32-w4-st2-fp32"
    assert main(["emit", "--key", key, "-o", str(tmp_path / "a.py")]) == 0  # the key names its family
    assert "def paged_attention(" in (tmp_path / "a.py").read_text()


@pytest.mark.parametrize("argv, message", [
    (["variants", "--q-tile", "16"], "--q-tile=16 applies to --kernel attention only"),
    (["variants", "--kernel", "attention", "--q-tile", "48"], "q_tile=48 is not in the space"),
    (["variants", "--kernel", "prefill"], "invalid choice: 'prefill'"),
    (["emit", "--kernel", "attention", "--head-dim", "64", "--block-size", "16", "--group-size",
      "16", "--q-tile", "8", "-o", "x.py"], "q_tile=8 is not supported"),
    (["emit", "--kernel", "attention", "--head-dim", "64", "--block-size", "16", "--group-size",
      "8", "--q-tile", "16", "--num-warps", "1", "--tile-tokens", "256", "-o", "x.py"], "pruned"),
    (["emit", "--kernel", "decode", "--key", "paged_attention-d64-b8-g1-m16-s1-t32-w4-st2-fp32",
      "-o", "x.py"], "names the attention family, not --kernel decode"),
    (["emit", "--kernel", "attention", "--head-dim", "64", "--gpu", "h100", "-o", "x.py"],
     "no --kernel attention records"),
])
def test_bad_attention_options_exit_2_with_one_line(tmp_path, monkeypatch, argv, message):
    one_line_exit_2(tmp_path, monkeypatch, argv, message)
