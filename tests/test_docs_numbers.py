"""Every figure README.md and bench/README.md print is held by the results file named beside it.

The documents are cut into blocks (a paragraph, a list item, a table row; fenced code is left
out). A block that names results files (``bench/results/...``, ``results/...`` from bench/, or
``tuning_db/...``; ``{json,md}`` and ``*`` expand, a folder stands for its files) must hold only numbers that one of those files
holds, at the precision printed (``0.96x`` matches 0.9614 in a JSON, ``4k`` matches 4096). A block
that names none must print no measured figure: no percentage, ``1.2x`` ratio, tok/s, us, ms,
GB/s or TB/s.
"""

import glob
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = ("README.md", "bench/README.md")
CITATION = re.compile(r"(?<![\w/])((?:bench/)?results/[\w./{},*-]+|tuning_db/[\w./{},*-]+)")
NUMBER = re.compile(r"(?<![\w.])(?<![A-Za-z]-)(\d+(?:\.\d+)?)(k\b)?")  # not AVX-512's 512
MEASURED = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?:%|x\b|\s?(?:tok/s|us\b|µs|ms\b|GB/s|TB/s))")
FILE_NUMBER = re.compile(r"\d+(?:\.\d+)?")


def blocks(text: str) -> list[str]:
    """Paragraphs, list items and table rows of a Markdown text, without fenced code."""
    out, current, fenced = [], [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            if current:
                out.append(" ".join(current))
                current = []
            continue
        if fenced:
            continue
        stripped = line.strip()
        starts = not stripped or stripped.startswith(("#", "|", "- ", "* ")) or re.match(r"\d+\. ", stripped)
        if starts and current:
            out.append(" ".join(current))
            current = []
        if stripped:
            current.append(stripped)
        if stripped.startswith(("#", "|")):  # one line each
            out.append(" ".join(current))
            current = []
    if current:
        out.append(" ".join(current))
    return out


def _expand(citation: str, doc: Path) -> list[Path]:
    citation = citation.rstrip(".,;:)")
    options = [citation]
    brace = re.search(r"\{([^}]*)\}", citation)
    if brace:
        options = [citation[:brace.start()] + alt + citation[brace.end():] for alt in brace.group(1).split(",")]
    found = []
    for option in options:
        for base in (doc.parent, REPO):
            for hit in map(Path, glob.glob(str(base / option))):
                found += [hit] if hit.is_file() else [f for f in sorted(hit.rglob("*")) if f.is_file()]
    return found


def _file_numbers(paths) -> list[float]:
    values = set()
    for path in paths:
        values.update(float(m) for m in FILE_NUMBER.findall(path.read_text(errors="replace")))
    return sorted(values)


def _held(figure: str, kilo: bool, values: list[float]) -> bool:
    decimals = len(figure.split(".")[1]) if "." in figure else 0
    wanted = float(figure)
    candidates = [wanted * 1024, wanted * 1000] if kilo else [wanted]
    return any(round(v, decimals) == c or v == c for c in candidates for v in values)


def _doc_blocks():
    for name in DOCS:
        doc = REPO / name
        for block in blocks(doc.read_text()):
            yield name, doc, block


def test_blocks_are_cut_as_markdown_reads():
    text = "para one\ncontinued 5%\n\n- item 1\n  more\n- item 2\n| a | 3 |\n```\ncode 9%\n```\n1. step"
    assert blocks(text) == ["para one continued 5%", "- item 1 more", "- item 2", "| a | 3 |", "1. step"]


def test_the_number_check_catches_a_figure_no_file_holds(tmp_path):
    values = _file_numbers(_expand("bench/results/h200/kernel_bench.md", REPO / "README.md"))
    assert _held("0.1613", False, values) and _held("0.86", False, values) and _held("32", True, values)
    assert not _held("443", False, values) and not _held("0.1614", False, values)
    assert [f for f, _ in NUMBER.findall("AVX-512, 88-91%, 4-layer, d128, sm_90, 1.5x")] == \
        ["88", "91", "4", "1.5"]


@pytest.mark.parametrize("name", DOCS)
def test_every_cited_file_exists(name):
    doc = REPO / name
    for block in blocks(doc.read_text()):
        for citation in CITATION.findall(block):
            assert _expand(citation, doc), f"{name}: {citation!r} names no committed file"


@pytest.mark.parametrize("name", DOCS)
def test_every_figure_is_held_by_a_file_named_beside_it(name):
    problems = []
    for doc_name, doc, block in _doc_blocks():
        if doc_name != name:
            continue
        cited = [p for c in CITATION.findall(block) for p in _expand(c, doc)]
        if not cited:
            measured = MEASURED.findall(block)
            if measured:
                problems.append(f"figures {measured} with no results file named: {block[:160]}")
            continue
        values = _file_numbers(cited)
        text = CITATION.sub(" ", block)  # the file names' own digits are not figures
        missing = [f + k for f, k in NUMBER.findall(text) if not _held(f, bool(k), values)]
        if missing:
            names = sorted({str(p.relative_to(REPO)) for p in cited})
            problems.append(f"{missing} not in {names}: {block[:160]}")
    assert not problems, "\n".join(problems)
