"""The committed notebooks read cleanly: no progress-bar fragment, no warning and no absolute
path of the machine that executed them in any output."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("[0-9]*.ipynb"))
PROBLEMS = {
    "a progress-bar fragment": re.compile(r"\r|\d+%\|"),
    "a warning": re.compile(r"\b\w*Warning\b|warnings\.warn"),
    "an absolute path": re.compile(r"(?<![\w.])/(?:work|home|tmp|root|Users|private)/"),
}


def _texts(notebook: Path):
    nb = nbformat.read(notebook, as_version=4)
    for index, cell in enumerate(nb.cells):
        for output in cell.get("outputs", []):
            texts = [output.get("text", "")]
            texts += [v for k, v in output.get("data", {}).items()
                      if k.startswith("text/") and isinstance(v, str)]
            for text in texts:
                yield index, text


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_outputs_have_no_debris_warnings_or_absolute_paths(notebook):
    found = [f"cell {index}: {what}: {pattern.search(text).group()!r} in "
             f"{text[max(0, pattern.search(text).start() - 60):pattern.search(text).end() + 60]!r}"
             for index, text in _texts(notebook)
             for what, pattern in PROBLEMS.items() if pattern.search(text)]
    assert not found, "\n".join(found)


def test_the_scan_finds_each_problem(tmp_path):
    """The patterns catch what they are for (and leave ordinary text alone)."""
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("x")
    cell.outputs = [nbformat.v4.new_output("stream", name="stderr", text=t) for t in (
        "\repoch 1/4:  50%|#####     | 6/12", "UserWarning: something",
        "run directory: /work/i20/runs/single/abc", "AUC 0.83 [0.75, 0.90]; see docs/RUNS.md")]
    nb.cells = [cell]
    path = tmp_path / "00_x.ipynb"
    nbformat.write(nb, path)
    hits = {what for _, text in _texts(path) for what, p in PROBLEMS.items() if p.search(text)}
    assert hits == set(PROBLEMS)
    clean = [text for _, text in _texts(path)][-1]
    assert not any(p.search(clean) for p in PROBLEMS.values())


def test_the_committed_fine_tuning_run_learns_and_shows_the_shortcut():
    """Notebook 03's committed run (its recorded reference values and its conclusion): clean
    AUC at least 0.7, o.o.d. below i.i.d., and the conclusion says so."""
    import json

    root = Path(__file__).resolve().parents[1]
    values = json.loads((root / "data/reference/notebooks/03_fine_tuning.json").read_text())
    values = values["values"]
    assert values["test_sets | row=clean | auc"] >= 0.7
    assert values["test_sets | row=ood | auc"] < values["test_sets | row=iid | auc"] - 0.2
    nb = nbformat.read(root / "notebooks/03_fine_tuning.ipynb", as_version=4)
    said = [o["data"]["text/markdown"] for c in nb.cells for o in c.get("outputs", [])
            if "text/markdown" in o.get("data", {})]
    assert len(said) == 1 and "**The model learnt the task**" in said[0]
    assert "**The shortcut shows**" in said[0]
