"""The notebooks' "What this shows" (sm_utils.conclusions): each sentence follows the numbers
it is given, and a notebook rerun with other parameters says something else."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sm_utils.analysis.claims import check_claims
from sm_utils.conclusions import (
    grid_conclusion,
    mechanism_conclusion,
    pretraining_conclusion,
    run_conclusion,
)

ROOT = Path(__file__).resolve().parents[1]


def metrics(clean, iid, ood, best=3, epochs=4):
    def entry(auc, half=0.08):
        return {"auc": auc, "auc_ci_low": auc - half, "auc_ci_high": auc + half}

    return {"test_sets": {"clean": entry(clean), "iid": entry(iid), "ood": entry(ood)},
            "best_epoch": best, "epochs_run": epochs}


def test_a_run_at_chance_says_so_and_what_to_change():
    text = run_conclusion(metrics(0.52, 0.53, 0.51), "tag", 0.5, "random")
    assert text.startswith("**The run is at chance**") and "0.52 [0.44, 0.60]" in text
    assert "`epochs`" in text and "shortcut" in text and "relies on" not in text


def test_a_run_that_learnt_reads_its_own_gap():
    shortcut = run_conclusion(metrics(0.83, 0.91, 0.38), "tag", 0.5, "imagenet_lite0")
    assert "**The shortcut shows**" in shortcut and "0.53 lower" in shortcut
    assert "50% of the positive" in shortcut
    none = run_conclusion(metrics(0.83, 0.85, 0.80), "tag", 0.5, "imagenet_lite0")
    assert "no sign of the shortcut" in none and "**The shortcut shows**" not in none
    below = run_conclusion(metrics(0.83, 0.99, 0.10), "sex", 1.0, "x")
    assert "below chance" in below and "100% of the positive" in below
    clean = run_conclusion(metrics(0.83, 0.83, 0.82), "tag", 0.0, "x")
    assert "Without the confounder in training (p = 0)" in clean


def test_the_grid_conclusion_states_the_demos_falls_and_direction():
    table = pd.read_csv(ROOT / "data/reference/demo_results.csv")
    text = grid_conclusion(table, check_claims(table))
    ood = table[(table["test_set"] == "ood") & (table["confounder"] == "tag")]
    by = ood.pivot_table(index=["source", "fold"], columns="p", values="auc")
    # claim 2's fall by hand: AUC at p = 0 minus the trapezoidal mean over p = 0, 0.5, 1
    fall = (by[0.0] - (0.25 * by[0.0] + 0.5 * by[0.5] + 0.25 * by[1.0]))
    fall = fall.groupby("source").agg(["mean", "std"])
    tag = text.split("**tag**")[1].split("\n")[0]
    for source in ("imagenet_lite0", "radiology_phantom"):
        mean, sd = fall.loc[source]
        assert f"{mean:.2f} ± {sd:.2f}" in tag
    further = fall.loc["imagenet_lite0", "mean"] > fall.loc["radiology_phantom", "mean"]
    assert ("ImageNet falls further, as in the paper" in tag) == further
    assert "cannot tell with these folds" in text
    # the same grid with the in-domain source's o.o.d. AUC gone at p > 0: the direction flips
    lowered = table.copy()
    at = ((lowered["source"] == "radiology_phantom") & (lowered["test_set"] == "ood")
          & (lowered["p"] > 0) & (lowered["confounder"] == "tag"))
    lowered.loc[at, "auc"] = 0.0
    flipped = grid_conclusion(lowered).split("**tag**")[1].split("\n")[0]
    assert "the in-domain source falls further, the paper's direction reversed" in flipped


def test_the_mechanism_and_pretraining_conclusions_follow_their_numbers():
    stats = pd.DataFrame([
        {"confounder": "lowpass", "n_points": 3, "spearman_rho": np.nan, "p_value": np.nan,
         "min_p_value": np.nan},
        {"confounder": "tag", "n_points": 3, "spearman_rho": -0.5, "p_value": 1.0,
         "min_p_value": 1 / 3},
        {"confounder": "sex", "n_points": 8, "spearman_rho": 0.9, "p_value": 0.01,
         "min_p_value": 0.0001}])
    attribution = pd.DataFrame({"source": ["a", "a", "r", "r"], "p": [0.0, 1.0, 0.0, 1.0],
                                "attribution_ratio": [1.2, 10.0, 0.0, 1.7]})
    text = mechanism_conclusion(stats, attribution)
    assert "saturated" in text.split("**lowpass**")[1].split("\n")[0]
    assert "no evidence" in text.split("**tag**")[1].split("\n")[0]
    assert "the larger the drop" in text.split("**sex**")[1].split("\n")[0]
    assert "a 10.0x (p = 0: 1.2x)" in text and "a looks at the tag" in text
    assert "r does not" in text
    names = ["cxr/normal", "cxr/opacity", "ct/benign", "ct/malignant"]
    confusion = pd.DataFrame([[9, 1, 0, 0], [2, 8, 0, 0], [0, 0, 10, 0], [0, 0, 9, 1]],
                             index=names, columns=names)
    text = pretraining_conclusion(confusion, 0.7)
    assert "100% of the images in their own group" in text and "70% of those" in text
    assert "ct/malignant (recall 10%)" in text and "more than pathology" in text


@pytest.mark.numerics
@pytest.mark.slow
def test_notebook_03_rerun_with_other_parameters_says_what_its_numbers_say(tmp_path):
    """Notebook 03 at p = 0 (no shortcut on offer) through papermill: its conclusion names the
    AUCs of that run's own metrics.json, not the committed run's."""
    import nbformat
    import papermill

    from sm_utils.datasets import build_dataset

    build_dataset("phantom_cxr", tmp_path / "data", n_patients=100, image_size=128, n_folds=3,
                  seed=0, difficulty=0.15)
    out = tmp_path / "03.ipynb"
    papermill.execute_notebook(
        str(ROOT / "notebooks/03_fine_tuning.ipynb"), str(out), cwd=str(ROOT),
        parameters={"p": 0.0, "epochs": 2, "runs_dir": str(tmp_path / "runs"),
                    "manifest": str(tmp_path / "data/manifest.csv")},
        progress_bar=False, log_output=False)
    nb = nbformat.read(out, as_version=4)
    texts = [o["data"]["text/markdown"] for c in nb.cells for o in c.get("outputs", [])
             if "text/markdown" in o.get("data", {})]
    run = json.loads(next((tmp_path / "runs").glob("*/metrics.json")).read_text())
    clean = run["test_sets"]["clean"]
    (conclusion,) = texts
    assert f"{clean['auc']:.2f} [{clean['auc_ci_low']:.2f}, {clean['auc_ci_high']:.2f}]" \
        in conclusion
    committed = nbformat.read(ROOT / "notebooks/03_fine_tuning.ipynb", as_version=4)
    before = [o["data"]["text/markdown"] for c in committed.cells for o in c.get("outputs", [])
              if "text/markdown" in o.get("data", {})]
    assert before and before[0] != conclusion and "**The shortcut shows**" not in conclusion


def test_the_data_conclusion_counts_the_manifest():
    from sm_utils.conclusions import data_conclusion

    table = pd.DataFrame({"patient_id": ["a", "a", "b", "c"], "label": [0, 1, 1, 0],
                          "sex": ["F", "F", "M", "M"], "fold_0": ["test", "test", "train", "val"],
                          "fold_1": ["test", "test", "val", "train"]})
    text = data_conclusion(table, [0, 1])
    assert text.startswith("4 images of 3 patients, 50% positive, in 2 fold(s)")
    assert "every fold tests on the same images (2 test images)" in text
    assert "female share 50% among negatives and 50% among positives" in text
    table.loc[2, "fold_1"] = "test"
    assert "the folds test on different images (2, 3 test images)" in data_conclusion(table, [0, 1])


def test_a_grid_without_the_measures_still_gets_a_conclusion():
    """No p = 0 (no fall to measure) and one source: no sentence per confounder, no error."""
    table = pd.DataFrame({"dataset": "d", "arch": "a", "confounder": "tag", "source": "mine",
                          "fold": [0, 1], "p": [1.0, 1.0], "test_set": "ood", "auc": [0.4, 0.5]})
    assert grid_conclusion(table) == "\n"
