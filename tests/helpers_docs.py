"""The figure check behind tests/test_docs_numbers.py (read that file's docstring first).

``check(docs, current_template_hash)`` returns every problem found in the given Markdown files,
each a line naming the file, the figure and how to fix it; an empty list means every figure is
tied to the field it prints. Results files are found relative to each document's own folder, so
the check runs unchanged on a copy of the tree (the mutation tests).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

# [text][label] ... and, anywhere in the file, [label]: path "field"  (a reference definition)
DEFINITION = re.compile(r'^ {0,3}\[([^\]]+)\]:\s*(\S+)(?:\s+"([^"]*)")?\s*$', re.M)
REF_LINK = re.compile(r"\[([^\]]+)\]\[([^\]]+)\]")
INLINE_LINK = re.compile(r'\[([^\]]+)\]\(([^)\s]+)(?:\s+"([^"]*)")?\)')
FIGURE = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?(?:e-?\d+)?)(k\b)?")
# what a measured figure looks like when it is not tied (bounds are exempt: see BOUND)
MEASURED = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?:%|x\b|\s?(?:tok/s|us\b|µs|ms\b|GB/s|TB/s))")
BOUND = re.compile(r"(>=|<=|≥|≤|<|>|at least|at most|within|below|under|above|over|target)\s*$")
RESULTS_PATH = re.compile(r"(?<![\w/])(?:\.\./)?bench/results/[\w./-]+")
CODE_SPAN = re.compile(r"`[^`]*`")
SCALE = re.compile(r"\*([0-9.e+-]+)$")
STALE_WORDS = "older templates"


@dataclass
class Tie:
    doc: Path
    block: str
    text: str
    target: str
    field: str | None


def blocks(text: str) -> list[str]:
    """Paragraphs, list items and table rows, without fenced code or reference definitions."""
    out, current, fenced = [], [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            if current:
                out.append(" ".join(current))
                current = []
            continue
        if fenced or DEFINITION.match(line):
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


def ties(doc: Path) -> list[Tie]:
    """Every link of ``doc`` whose target is a results file, with the block it sits in."""
    text = doc.read_text()
    definitions = {label.lower(): (path, title) for label, path, title in DEFINITION.findall(text)}
    found = []
    for block in blocks(text):
        links = CODE_SPAN.sub(" ", block)  # `[text][label]` in code is an example, not a figure
        for label_text, label in REF_LINK.findall(links):
            path, title = definitions.get(label.lower(), (f"<undefined label {label!r}>", None))
            found.append(Tie(doc, block, label_text, path, title or None))
        for label_text, path, title in INLINE_LINK.findall(REF_LINK.sub(" ", links)):
            found.append(Tie(doc, block, label_text, path, title or None))
    return [t for t in found if "results/" in t.target or t.target.startswith("<undefined")]


CONDITION = re.compile(r"\s*(\w+)=('[^']*'|[^,]*)\s*(?:,|$)")


def _select(items: list, condition: str) -> list:
    """The rows whose keys hold the values ``k=v,k2='v, with commas'`` names (compared as text)."""
    wanted = {k: v[1:-1] if v.startswith("'") else v.strip() for k, v in CONDITION.findall(condition)}
    return [item for item in items if isinstance(item, dict)
            and all(str(item.get(k)) == v for k, v in wanted.items())]


def resolve(data, field: str) -> float:
    """The number ``field`` names in ``data`` (see tests/test_docs_numbers.py for the syntax)."""
    scale = 1.0
    if m := SCALE.search(field):
        scale, field = float(m.group(1)), field[:m.start()]
    count = field.endswith("#count")
    steps = re.findall(r"([^.\[\]]+)(?:\[([^\]]*)\])?", field.removesuffix("#count"))
    node, last = data, len(steps) - 1
    for i, (key, condition) in enumerate(steps):
        if i == last and "/" in key and not count:
            num, den = key.split("/")
            return scale * _number(node, num, field) / _number(node, den, field)
        if not isinstance(node, dict) or key not in node:
            raise LookupError(f"no key {key!r} in {field!r}")
        node = node[key]
        if condition:
            if not isinstance(node, list):
                raise LookupError(f"{key!r} is not a list of rows in {field!r}")
            node = _select(node, condition)
            if count and i == last:
                return scale * len(node)
            if len(node) != 1:
                raise LookupError(f"row selector [{condition}] matches {len(node)} rows, not one, "
                                  f"in {field!r}: name the row by more of its keys")
            node = node[0]
    if count:
        return scale * len(node)
    return scale * _number({"v": node}, "v", field)


def _number(node, key: str, field: str) -> float:
    value = node.get(key) if isinstance(node, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise LookupError(f"{key!r} is {value!r}, not a number, in {field!r}")
    return float(value)


def printed_matches(printed: str, kilo: bool, value: float) -> bool:
    """Whether ``value`` rounds to ``printed`` at the precision printed (``k``: x1024 or x1000)."""
    exact = Decimal(printed)
    half_unit = Decimal(1).scaleb(exact.as_tuple().exponent) / 2
    for unit in ((1024, 1000) if kilo else (1,)):
        if abs(Decimal(repr(value)) - exact * unit) <= half_unit * unit * Decimal("1.000001"):
            return True
    return False


def _load(path: Path, cache: dict):
    if path not in cache:
        cache[path] = json.loads(path.read_text())
    return cache[path]


def family_hash(data: dict, decode_hash: str) -> str:
    """Today's template hash for the kernel family a results file was made from: ``decode_hash``
    for the decode family (files without a ``kernel`` field are decode's), the family's own
    template hash otherwise (each family's hash covers only its own templates)."""
    family = data.get("kernel") or "decode"
    if family == "decode":
        return decode_hash
    from kgen.paths import template_hash

    return template_hash(family)


def check_tie(tie: Tie, current_hash: str, cache: dict) -> list[str]:
    where = f"{tie.doc.name}: [{tie.text}]({tie.target})"
    figures = FIGURE.findall(tie.text)
    if tie.target.startswith("<undefined"):
        return [f"{where}: add the reference definition `[label]: path \"field\"`"]
    path = (tie.doc.parent / tie.target).resolve()
    if not path.is_file():
        return [f"{where}: no such results file {path}"]
    if not figures:
        return []  # a plain link to a results file
    if not tie.target.endswith(".json") or not tie.field:
        return [f"{where}: a figure must link to a results JSON with its field as the link title"]
    if len(figures) != 1:
        return [f"{where}: one figure per link (found {[f + k for f, k in figures]})"]
    try:
        data = _load(path, cache)
        value = resolve(data, tie.field)
    except (LookupError, ValueError, ZeroDivisionError) as exc:
        return [f"{where}: {exc}"]
    printed, kilo = figures[0]
    problems = []
    if not printed_matches(printed, bool(kilo), value):
        problems.append(f"{where}: prints {printed}{kilo} but {tie.field!r} is {value:.6g} "
                        f"(the results file changed, or the figure was swapped or moved)")
    made_with = data.get("template_hash") if isinstance(data, dict) else None
    if made_with:
        current_hash = family_hash(data, current_hash)
        stale = made_with != current_hash
        labelled = STALE_WORDS in tie.block and made_with[:8] in tie.block
        if stale and not labelled:
            problems.append(f"{where}: {tie.target} was made with older templates ({made_with}; "
                            f"today's are {current_hash}): rerun it, or say in the same paragraph, "
                            f"list item or table row: made with {STALE_WORDS} (`{made_with[:8]}`)")
        if not stale and STALE_WORDS in tie.block:
            problems.append(f"{where}: labelled as made with {STALE_WORDS}, but {tie.target} "
                            f"was made with today's ({current_hash}): drop the label")
    return problems


def untied_figures(doc: Path) -> list[str]:
    """Measured-looking figures (%, x, tok/s, us, ms, GB/s) that no tie holds."""
    problems = []
    for block in blocks(doc.read_text()):
        rest = INLINE_LINK.sub(" ", REF_LINK.sub(" ", block))
        rest = CODE_SPAN.sub(" ", rest)  # code spans: commands, keys, formulas
        for m in MEASURED.finditer(rest):
            if not BOUND.search(rest[:m.start()]):
                problems.append(f"{doc.name}: untied figure {m.group(0)!r} in: {block[:140]}")
    return problems


def missing_paths(doc: Path) -> list[str]:
    """``bench/results/...`` paths a document names in its text that do not exist."""
    out = []
    for block in blocks(doc.read_text()):
        for name in RESULTS_PATH.findall(block):
            name = name.rstrip(".,;:)")
            if re.search(r"[A-Z<{*]", name):  # a pattern or a placeholder, not a file
                continue
            candidates = [(doc.parent / name), (doc.parent / ".." / name), (doc.parent / name.lstrip("./"))]
            if not any(c.exists() for c in candidates):
                out.append(f"{doc.name}: names {name}, which does not exist")
    return out


def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def broken_links(doc: Path) -> list[str]:
    """Links to other Markdown pages (and their #sections) that do not exist."""
    out = []
    text = CODE_SPAN.sub(" ", doc.read_text())
    for _, target, _ in INLINE_LINK.findall(text):
        page, _, section = target.partition("#")
        if "://" in target or not page.endswith(".md"):
            continue
        path = (doc.parent / page).resolve()
        if not path.is_file():
            out.append(f"{doc.name}: link to {target}, which does not exist")
        elif section and section not in {_anchor(h) for h in re.findall(r"^#+ (.*)$", path.read_text(), re.M)}:
            out.append(f"{doc.name}: link to {target}: {page} has no section #{section}")
    return out


def check(docs: list[Path], current_hash: str) -> list[str]:
    cache: dict = {}
    problems = []
    for doc in docs:
        for tie in ties(doc):
            problems += check_tie(tie, current_hash, cache)
        problems += untied_figures(doc) + missing_paths(doc) + broken_links(doc)
    return problems
