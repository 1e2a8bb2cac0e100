"""Every figure in README.md and docs/ is tied to the field of the results file it comes from.

How a figure is written (docs/benchmarks.md says the same for writers)
-----------------------------------------------------------------------
A measured figure is a Markdown link to its results JSON whose *title* names the field::

    ours ran [1619 tok/s][e2e-ours] on two cores ...

    [e2e-ours]: ../bench/results/e2e_throughput.json "dtypes.bfloat16.engines.ours_2thr.tokens_per_s"

(or inline: ``[1619 tok/s](bench/results/e2e_throughput.json "dtypes.bfloat16.engines.ours_2thr.tokens_per_s")``).
Rendered, the figure is a link to its results file and the field shows on hover; reference
definitions, kept at the bottom of each page, are invisible. The field is a path into the JSON:

- dict keys joined by dots: ``formats.fp8_e4m3.mean_kl``;
- a list is entered by a row selector naming the row by its keys' values, never by position:
  ``rows[group_size=8,batch=64,context=4096].default_gbs``; it must match exactly one row; a value
  with commas is quoted: ``rows[model='a, b'].x``;
- ``#count`` at the end counts the rows a selector matches (``rows[target=sm_80]#count``);
- the last step may divide two fields of the same row: ``rows[...].sdpa_ms/default_ms``;
- a trailing ``*100`` or ``*1e6`` scales the value (a fraction printed as %, seconds as us).

The link text holds exactly one number (``4k`` means 4096 or 4000). The check: the field's value,
scaled, rounded to the precision the number is printed at, equals the number. So the test fails
when a figure is swapped with another figure of its file (each text now meets the other's field),
when a figure is moved to another row (its text meets another row's value), and when its results
file changes (a rerun with other values, a moved or deleted file). Reordering a file's rows changes
nothing: rows are named by their keys.

Also checked: a measured-looking figure (%, ``1.2x``, tok/s, us, ms, GB/s) outside a tie fails,
unless it is a bound (after ``>=``, ``at least``, ``within``, ...: a target, not a measurement);
every ``bench/results/...`` path a page names exists; every link to a page (and its #section)
resolves.

Stale results: a results file with a top-level ``template_hash`` (the static audits, the kernel
benchmarks) describes the kernels the templates made then. When that hash is not today's
(``kgen.paths.template_hash()``), every paragraph, list item or table row quoting it must say so:
``made with older templates (`<first 8 hex of its hash>`)``; once the file is remade with today's
templates the label must go. The failure message says which hash to write.

The checker is tests/helpers_docs.py; the tests below run it on the real tree and on mutated
copies (tmp_path) to show each failure.
"""

import json
import re
import shutil
from pathlib import Path

import pytest

from helpers_docs import blocks, check, family_hash, printed_matches, resolve, ties
from kgen.paths import template_hash

REPO = Path(__file__).resolve().parent.parent


def doc_paths(root: Path) -> list[Path]:
    return [root / "README.md", root / "bench" / "README.md", *sorted((root / "docs").glob("*.md"))]


def copy_tree(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    for doc in doc_paths(REPO) + [REPO / "tuning_db" / "README.md"]:  # the pages and what they link
        target = root / doc.relative_to(REPO)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(doc, target)
    shutil.copytree(REPO / "bench" / "results", root / "bench" / "results")
    return root


def all_ties(root: Path):
    return [t for doc in doc_paths(root) for t in ties(doc) if t.field]


# --- the real tree --------------------------------------------------------------------------------

def test_every_figure_in_the_docs_is_its_fields_value():
    problems = check(doc_paths(REPO), template_hash())
    assert not problems, "\n".join(problems)


def test_the_docs_tie_figures_to_many_results_files():
    files = {(t.doc.parent / t.target).resolve() for t in all_ties(REPO)}
    readme = {(t.doc.parent / t.target).resolve() for t in ties(REPO / "README.md") if t.field}
    assert len(files) >= 8 and len(readme) >= 5, sorted(map(str, files))


# --- the syntax -----------------------------------------------------------------------------------

def test_fields_are_found_by_keys_not_positions():
    data = {"rows": [{"g": 1, "b": 4, "ms": 2.0, "sdpa": 3.0}, {"g": 8, "b": 4, "ms": 0.5, "sdpa": 1.0}],
            "a": {"b": 0.25}}
    assert resolve(data, "rows[g=8,b=4].ms") == 0.5
    assert resolve(data, "rows[g=1].sdpa/ms") == 1.5
    assert resolve(data, "a.b*100") == 25.0
    assert resolve(data, "rows[b=4]#count") == 2 and resolve(data, "rows#count") == 2
    with pytest.raises(LookupError, match="matches 2 rows"):
        resolve(data, "rows[b=4].ms")
    with pytest.raises(LookupError, match="matches 0 rows"):
        resolve(data, "rows[g=2].ms")
    with pytest.raises(LookupError, match="no key"):
        resolve(data, "a.c")


def test_a_figure_matches_at_its_printed_precision():
    assert printed_matches("0.86", False, 0.8627) and not printed_matches("0.87", False, 0.8627)
    assert printed_matches("4324", False, 4324.24) and not printed_matches("4336", False, 4324.24)
    assert printed_matches("32", True, 32768) and printed_matches("2.9e-6", False, 2.861e-6)
    assert not printed_matches("1.47", False, 1.13)


def test_blocks_are_cut_as_markdown_reads():
    text = ("para one\ncontinued 5%\n\n- item 1\n  more\n- item 2\n| a | 3 |\n```\ncode 9%\n```\n"
            "1. step\n\n[x]: a.json \"f\"\n")
    assert blocks(text) == ["para one continued 5%", "- item 1 more", "- item 2", "| a | 3 |", "1. step"]


# --- mutated copies: each drift fails -------------------------------------------------------------

def _replace_once(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, 1))


def _raw(tie) -> str:
    """The tie as written in its block: ``[text][label]`` or ``[text](target "field")``."""
    m = re.search(r"\[" + re.escape(tie.text) + r"\](\[[^\]]+\]|\([^)]*\))", tie.block)
    return m.group(0)


def test_swapping_two_figures_of_one_file_fails(tmp_path):
    root = copy_tree(tmp_path)
    pairs = [(a, b) for a in all_ties(root) for b in all_ties(root)
             if a.doc == b.doc and a.target == b.target and a.field != b.field
             and a.text != b.text and _raw(a) != _raw(b)]
    a, b = pairs[0]
    raw_a, raw_b = _raw(a), _raw(b)
    text = a.doc.read_text().replace(raw_a, "\0A", 1).replace(raw_b, "\0B", 1)
    text = text.replace("\0A", raw_a.replace(f"[{a.text}]", f"[{b.text}]", 1))
    a.doc.write_text(text.replace("\0B", raw_b.replace(f"[{b.text}]", f"[{a.text}]", 1)))
    problems = check([a.doc], template_hash())
    assert any(f"[{b.text}]" in p and "swapped" in p for p in problems), problems


def _row_tie(root: Path):
    """A tie whose field selects one row of a list, and the match of its field."""
    for tie in all_ties(root):
        m = re.fullmatch(r"(\w+)\[([^\]]+)\]\.(\w+)(\*[0-9.e]+)?", tie.field)
        if m and "'" not in tie.field:
            return tie, m
    raise AssertionError("no tie selects a row")


def test_moving_a_figure_to_another_row_fails_and_reordering_rows_does_not(tmp_path):
    root = copy_tree(tmp_path)
    tie, m = _row_tie(root)
    results = (tie.doc.parent / tie.target).resolve()
    original = results.read_text()
    data = json.loads(original)
    rows, field = data[m.group(1)], m.group(3)
    keys = [part.split("=", 1)[0] for part in m.group(2).split(",")]
    mine = next(r for r in rows if resolve({"r": [r]}, f"r[{m.group(2)}]#count") == 1)
    selector = {id(r): ",".join(f"{k}={r.get(k)}" for k in keys) for r in rows}
    other = next(r for r in rows if r is not mine and r.get(field) != mine[field]
                 and resolve(data, f"{m.group(1)}[{selector[id(r)]}]#count") == 1)
    rows.reverse()  # the same rows in another order: still the same figures
    results.write_text(json.dumps(data))
    assert check([tie.doc], template_hash()) == []
    # in the results file, the value moves to another row: the figure's row holds another value
    mine[field], other[field] = other[field], mine[field]
    results.write_text(json.dumps(data))
    problems = check([tie.doc], template_hash())
    assert any(f"[{tie.text}]" in p and "moved" in p for p in problems), problems
    # in the document, the figure is re-pointed at another row of its file
    results.write_text(original)
    _replace_once(tie.doc, f'"{tie.field}"', f'"{tie.field.replace(m.group(2), selector[id(other)], 1)}"')
    problems = check([tie.doc], template_hash())
    assert any(f"[{tie.text}]" in p and "moved" in p for p in problems), problems


def test_a_changed_or_missing_results_file_fails(tmp_path):
    root = copy_tree(tmp_path)
    tie = next(t for t in all_ties(root) if "e2e_throughput" in t.target)
    results = (tie.doc.parent / tie.target).resolve()
    rerun = json.loads(results.read_text())
    rerun["dtypes"]["bfloat16"]["engines"]["ours_2thr"]["tokens_per_s"] *= 1.1  # rewritten by a new run
    results.write_text(json.dumps(rerun))
    problems = check(doc_paths(root), template_hash())
    assert any("engines.ours_2thr.tokens_per_s" in p and "changed" in p for p in problems), problems
    results.unlink()
    problems = check(doc_paths(root), template_hash())
    assert any("no such results file" in p for p in problems), problems


def test_an_untied_figure_fails(tmp_path):
    root = copy_tree(tmp_path)
    readme = root / "README.md"
    readme.write_text(readme.read_text() + "\nIt decodes 9999 tok/s, at least 2x faster.\n")
    problems = check([readme], template_hash())
    assert any("'9999 tok/s'" in p for p in problems) and not any("'2x'" in p for p in problems), problems


def _template_bound_tie(root: Path):
    for tie in all_ties(root):
        data = json.loads((tie.doc.parent / tie.target).resolve().read_text())
        if data.get("template_hash"):
            return tie, data
    raise AssertionError("the docs quote no result made from the templates (audits, kernel bench)")


def test_results_of_other_templates_must_be_labelled_stale(tmp_path):
    root = copy_tree(tmp_path)
    tie, data = _template_bound_tie(root)
    results = (tie.doc.parent / tie.target).resolve()
    doc, raw = tie.doc, _raw(tie)
    mine = lambda problems: [p for p in problems if f"[{tie.text}]" in p]  # noqa: E731
    # made with other templates, quoted without the label: fails and says what to write
    data["template_hash"] = "0123456789abcdef"
    results.write_text(json.dumps(data))
    doc.write_text(doc.read_text().replace("older templates", "other words"))
    problems = mine(check([doc], template_hash()))
    assert any("older templates" in p and "`01234567`" in p for p in problems), problems
    # labelled in the same paragraph / list item / table row: passes
    _replace_once(doc, raw, raw + " (made with older templates (`01234567`))")
    assert mine(check([doc], template_hash())) == []
    # remade with today's templates (its own family's), the label is wrong: fails
    data["template_hash"] = family_hash(data, template_hash())
    results.write_text(json.dumps(data))
    problems = mine(check([doc], template_hash()))
    assert any("drop the label" in p for p in problems), problems


def test_staleness_follows_each_results_files_kernel_family(tmp_path):
    """An attention-family result is judged by the attention templates' hash, not decode's."""
    root = copy_tree(tmp_path)
    tie = next(t for t in all_ties(root) if t.target.endswith("audit_sweep_attention_defaults.json"))
    results = (tie.doc.parent / tie.target).resolve()
    data = json.loads(results.read_text())
    assert data["kernel"] == "attention" and data["template_hash"] != template_hash()
    mine = lambda problems: [p for p in problems if f"[{tie.text}]" in p and "templates" in p]  # noqa: E731
    data["template_hash"] = template_hash("attention")
    results.write_text(json.dumps(data))
    assert mine(check([tie.doc], template_hash())) == []
    data["template_hash"] = template_hash()  # the decode family's: stale for an attention file
    results.write_text(json.dumps(data))
    assert any("older templates" in p for p in mine(check([tie.doc], template_hash())))


def test_the_docs_label_every_stale_result_they_quote(tmp_path):
    """On the real docs: dropping the labels makes each stale figure fail, naming its hash."""
    data = {t.target: json.loads((t.doc.parent / t.target).resolve().read_text()) for t in all_ties(REPO)}
    stale = {target: d["template_hash"] for target, d in data.items()
             if d.get("template_hash") and d["template_hash"] != family_hash(d, template_hash())}
    if not stale:
        pytest.skip("the docs quote no result made with older templates")
    root = copy_tree(tmp_path)
    for doc in doc_paths(root):
        doc.write_text(doc.read_text().replace("older templates", "other words"))
    problems = check(doc_paths(root), template_hash())
    for target, old in stale.items():
        assert any(target in p and f"`{old[:8]}`" in p for p in problems), (target, problems)


def test_a_broken_page_link_fails(tmp_path):
    root = copy_tree(tmp_path)
    readme = root / "README.md"
    readme.write_text(readme.read_text() + "\nSee [this](docs/nope.md) and [that](docs/kernels.md#nope).\n")
    problems = check([readme], template_hash())
    assert any("docs/nope.md, which does not exist" in p for p in problems), problems
    assert any("has no section #nope" in p for p in problems), problems
