"""Rendering: slots only in templates, valid Python out, the write-if-changed disk cache."""

import ast
import re

import jinja2
import pytest

from kgen import paths, render
from kgen.build import load_kernel, module_name
from kgen.variant import VariantConfig

CONFIG = VariantConfig(head_dim=80, block_size=8, group_size=3, split_k=4, tile_tokens=32,
                       dtype="bf16")


def test_templates_hold_slots_and_simple_ifs_only():
    names = {p.name for p in paths.template_files()}
    assert {"header.py.j2", "attend.py.j2", "decode.py.j2", "decode_partial.py.j2", "merge.py.j2",
            "launcher.py.j2"} <= names
    for path in paths.template_files():
        tags = re.findall(r"{%-?\s*(\w+)", path.read_text())
        assert set(tags) <= {"if", "else", "endif"}, (path.name, tags)
        assert "{{" not in re.sub(r"{{\s*\w+\s*}}", "", path.read_text()), path.name  # no filters


@pytest.mark.parametrize("split_k", [1, 4, "auto"])
def test_rendered_source_is_python_with_the_variant(split_k):
    config = CONFIG.replace(split_k=split_k)
    source = render.render_source(config)
    tree = ast.parse(source)
    jit = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)
           and any("jit" in ast.unparse(d) for d in n.decorator_list)}
    assert set(render.kernel_names(config)) <= jit
    assert ("_merge_kernel" in jit) == (config.split_k != 1)
    assert f'VARIANT_KEY = "{config.key}"' in source
    assert paths.template_hash() in source
    imports = {a.name.split(".")[0] for n in tree.body if isinstance(n, ast.Import) for a in n.names}
    assert imports == {"math", "os", "torch", "triton"}
    assert "_D_PAD = 128" in source and "_PAD_D = True" in source and "_G_PAD = 16" in source


def test_slots_match_config():
    values = render.slots(CONFIG.replace(block_size=128, tile_tokens=32))
    assert values["pages_per_tile"] == 1 and values["page_step"] == 32
    values = render.slots(CONFIG.replace(block_size=1, tile_tokens=64))
    assert values["pages_per_tile"] == 64 and values["page_step"] == 1
    assert render.slots(CONFIG.replace(dtype="fp32"))["dot_precision"] == "ieee"
    with pytest.raises(ValueError, match="config="):
        render.slots({"head_dim": 64})


def test_strict_undefined(tmp_path, monkeypatch):
    (tmp_path / "__init__.py").write_text("")
    (tmp_path / "header.py.j2").write_text("{{ no_such_slot }}")
    monkeypatch.setattr(render, "templates_dir", lambda: tmp_path)
    with pytest.raises(jinja2.UndefinedError):
        render.render_source(CONFIG)


def test_write_source_only_when_changed(tmp_path):
    path = render.write_source(CONFIG, tmp_path)
    assert path == tmp_path / f"{CONFIG.key}.py"
    stamp = path.stat().st_mtime_ns
    assert render.write_source(CONFIG, tmp_path).stat().st_mtime_ns == stamp  # unchanged text
    path.write_text("stale")
    assert render.write_source(CONFIG, tmp_path).read_text() == render.render_source(CONFIG)
    assert not list(tmp_path.glob(".*.tmp"))


def test_template_hash_tracks_template_text(tmp_path, monkeypatch):
    before = paths.template_hash()
    assert re.fullmatch(r"[0-9a-f]{16}", before) and paths.template_hash() == before
    for path in paths.template_files():
        (tmp_path / path.name).write_text(path.read_text())
    monkeypatch.setattr(paths, "templates_dir", lambda: tmp_path)
    assert paths.template_hash() == before
    (tmp_path / "merge.py.j2").write_text((tmp_path / "merge.py.j2").read_text() + "\n")
    assert paths.template_hash() != before


def test_load_kernel_caches_by_key(tmp_path):
    module = load_kernel(CONFIG, directory=tmp_path)
    assert load_kernel(CONFIG.key) is module
    assert module.VARIANT_KEY == CONFIG.key and module.CONFIG == CONFIG.to_dict()
    assert module.__name__ == module_name(CONFIG)
    with pytest.raises(ValueError, match="config=42"):
        load_kernel(42)


def test_emit_header(tmp_path):
    path = render.emit(CONFIG, tmp_path / "k.py", command_line="kgen emit --key X -o k.py")
    head = path.read_text()[:1200]
    for text in (CONFIG.key, "kgen 0.", paths.template_hash(), "UTC", "kgen emit --key X",
                 "block_size=8"):
        assert text in head
    with pytest.raises(ValueError, match="path='k.txt'"):
        render.emit(CONFIG, "k.txt")


def test_default_cache_folder_is_per_template_version(tmp_path, monkeypatch):
    """Two template versions on one machine render the same key into different files."""
    monkeypatch.setenv("KGEN_CACHE", str(tmp_path))
    first = render.write_source(CONFIG)
    assert first.parent == tmp_path / paths.template_hash() and first.name == f"{CONFIG.key}.py"
    monkeypatch.setattr(render, "template_hash", lambda family="decode": "0123456789abcdef")
    second = render.write_source(CONFIG)
    assert second.parent == tmp_path / "0123456789abcdef" and second != first
    assert first.exists()  # the other version's module is left alone


@pytest.mark.parametrize("under", ["", "sub/folder"])
def test_kgen_cache_on_a_file_is_a_named_error(tmp_path, monkeypatch, under):
    """It used to be a raw NotADirectoryError from deep in the renderer."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("KGEN_CACHE", str(blocker / under) if under else str(blocker))
    says = "is a file" if not under else f"lies under {str(blocker)!r}, which is a file"
    with pytest.raises(ValueError, match=f"KGEN_CACHE=.* {says}; point KGEN_CACHE at a folder"):
        render.write_source(CONFIG)
    assert blocker.read_text() == "not a folder"
