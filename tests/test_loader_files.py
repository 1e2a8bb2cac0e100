"""Damaged checkpoint files, as a user hits them through ``runtime.generate()``: each is an error
naming the file (never a bare traceback), and a damaged tokenizer.json leaves token-id prompts
working."""

import shutil

import pytest

import runtime
from helpers_checkpoint import make_llama


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A single-file checkpoint with a tokenizer, and a sharded copy of the same weights."""
    root = tmp_path_factory.mktemp("files")
    make_llama(root / "single", hidden=32, heads=2, kv_heads=1, layers=1, vocab=64, tokenizer=True)
    make_llama(root / "sharded", hidden=32, heads=2, kv_heads=1, layers=1, vocab=64, max_shard_size="10KB")
    return root


def _copy(ckpt, tmp_path, which="single"):
    dst = tmp_path / which
    shutil.copytree(ckpt / which, dst)
    return dst


@pytest.mark.parametrize("text,match", [
    ('{"architectures": ["LlamaForCausalLM"], "vocab_size": 6', "is not valid JSON .*truncated"),
    ("", "is not valid JSON"),
    ("[1, 2, 3]", "must hold a JSON object, got a JSON list"),
    ('"LlamaForCausalLM"', "must hold a JSON object, got a JSON str"),
])
def test_damaged_config_json_is_named(ckpt, tmp_path, text, match):
    path = _copy(ckpt, tmp_path)
    (path / "config.json").write_text(text)
    with pytest.raises(ValueError, match=match) as err:
        runtime.generate(path, [[3, 4]])
    assert str(path / "config.json") in str(err.value)


def test_bad_config_field_error_names_the_file(ckpt, tmp_path):
    path = _copy(ckpt, tmp_path)
    text = (path / "config.json").read_text().replace('"LlamaForCausalLM"', '"GPT2LMHeadModel"')
    (path / "config.json").write_text(text)
    with pytest.raises(ValueError, match=r"config.json'?: architecture='GPT2LMHeadModel' is not supported"):
        runtime.generate(path, [[3, 4]])


@pytest.mark.parametrize("which", ["single", "sharded"])
@pytest.mark.parametrize("cut", ["empty", "header", "half"])
def test_truncated_or_empty_safetensors_is_named(ckpt, tmp_path, which, cut):
    path = _copy(ckpt, tmp_path, which)
    target = path / "model.safetensors" if which == "single" else sorted(path.glob("model-*.safetensors"))[-1]
    data = target.read_bytes()
    target.write_bytes({"empty": b"", "header": data[:20], "half": data[: len(data) // 2]}[cut])
    with pytest.raises(ValueError, match="is not a readable safetensors file .*truncated or empty") as err:
        runtime.generate(path, [[3, 4]])
    assert str(target) in str(err.value)


def test_truncated_shard_index_is_named(ckpt, tmp_path):
    path = _copy(ckpt, tmp_path, "sharded")
    index = path / "model.safetensors.index.json"
    index.write_text(index.read_text()[:50])
    with pytest.raises(ValueError, match="is not valid JSON") as err:
        runtime.generate(path, [[3, 4]])
    assert str(index) in str(err.value)


@pytest.mark.parametrize("damage", ["truncated", "empty", "not a tokenizer"])
def test_damaged_tokenizer_keeps_token_id_prompts_working(ckpt, tmp_path, damage):
    path = _copy(ckpt, tmp_path)
    tok = path / "tokenizer.json"
    tok.write_text({"truncated": tok.read_text()[:100], "empty": "", "not a tokenizer": '{"a": 1}'}[damage])
    with pytest.warns(RuntimeWarning, match="tokenizer.json' could not be read as a tokenizer"):
        loaded = runtime.load_model(path, device="cpu")
    assert loaded.tokenizer is None and str(tok) in loaded.tokenizer_error
    got = runtime.generate(loaded, [[3, 4, 5]], runtime.SamplingParams(max_tokens=4))
    want = runtime.generate(ckpt / "single", [[3, 4, 5]], runtime.SamplingParams(max_tokens=4))
    assert got[0].outputs[0].token_ids == want[0].outputs[0].token_ids
    assert got[0].outputs[0].text is None  # nothing to detokenize with
    with pytest.raises(ValueError, match=r"prompts\[1\] is text but '.*tokenizer.json' could not be read"):
        runtime.generate(loaded, [[3, 4], "the cat"])
