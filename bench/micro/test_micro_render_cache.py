"""The generator's caches: an in-process ``load_kernel`` hit and an unchanged on-disk source."""

from kgen.build import load_kernel
from kgen.render import write_source
from kgen.space import default_config

CONFIG = default_config(head_dim=128, block_size=16, group_size=8, dtype="bf16", split_k="auto")


def test_load_kernel_hit(benchmark, tmp_path):
    """``kgen.build.load_kernel`` of a variant already imported: one dict lookup."""
    module = load_kernel(CONFIG, directory=tmp_path)
    assert benchmark(load_kernel, CONFIG, directory=tmp_path) is module


def test_write_source_unchanged(benchmark, tmp_path):
    """``kgen.render.write_source`` when the file already holds the text: render the templates,
    read the file back, compare, write nothing (what a new process pays per variant)."""
    path = write_source(CONFIG, tmp_path)
    mtime = path.stat().st_mtime_ns
    assert benchmark(write_source, CONFIG, tmp_path) == path
    assert path.stat().st_mtime_ns == mtime
