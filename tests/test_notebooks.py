"""Structural checks of the book's notebooks that nbval alone does not make.

nbval re-executes each notebook and compares outputs; these tests also fail for a code cell that was
never executed, cells executed out of order, a stored error, a missing environment report, or a chapter
whose compared cells are outnumbered by ignored ones.
"""
import json
import pathlib

import pytest

BOOK = pathlib.Path(__file__).resolve().parents[1] / "book"
NOTEBOOKS = sorted(p for p in BOOK.rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)
IGNORE_TAG = "nbval-ignore-output"


def code_cells(path):
    cells = json.loads(path.read_text())["cells"]
    return [c for c in cells if c["cell_type"] == "code" and "".join(c["source"]).strip()]


def test_the_book_has_notebooks():
    assert NOTEBOOKS, f"no notebooks under {BOOK}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_code_cell_was_executed_in_order(path):
    counts = [c["execution_count"] for c in code_cells(path)]
    never = [i for i, n in enumerate(counts) if n is None]
    assert not never, f"{path.name}: code cells {never} were never executed; run `python -m companion.book execute`"
    assert counts == list(range(1, len(counts) + 1)), f"{path.name}: cells were not executed top to bottom: {counts}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_no_stored_errors_or_warnings(path):
    for i, cell in enumerate(code_cells(path)):
        for out in cell.get("outputs", []):
            assert out["output_type"] != "error", f"{path.name}: cell {i} stores an error: {out.get('ename')}"
            assert not (out["output_type"] == "stream" and out["name"] == "stderr"), (
                f"{path.name}: cell {i} wrote to stderr: {''.join(out['text'])[:300]}"
            )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_first_code_cell_reports_the_environment(path):
    first = code_cells(path)[0]
    assert "setup()" in "".join(first["source"]), f"{path.name}: the first code cell must call companion.book.setup()"
    assert IGNORE_TAG in first["metadata"].get("tags", []), f"{path.name}: the environment report must be ignored by nbval"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_ignored_cells_are_a_minority(path):
    cells = code_cells(path)
    ignored = sum(IGNORE_TAG in c["metadata"].get("tags", []) for c in cells)
    assert ignored * 2 < len(cells), f"{path.name}: {ignored} of {len(cells)} code cells ignore their output"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_chapter_has_exercises_with_folded_solutions(path):
    text = "".join("".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "markdown")
    assert "{exercise}" in text, f"{path.name}: a chapter ends with exercises"
    assert text.count("{solution}") == text.count("{exercise}"), f"{path.name}: every exercise needs a solution"
    assert text.count(":class: dropdown") >= text.count("{solution}"), f"{path.name}: solutions are folded"


def test_every_chapter_is_in_the_table_of_contents():
    toc = (BOOK.parent / "_toc.yml").read_text()
    missing = [p.name for p in NOTEBOOKS if f"book/{p.stem}" not in toc]
    assert not missing, f"notebooks missing from _toc.yml: {missing}"
