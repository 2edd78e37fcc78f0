"""The paper kit (`sm report`): on a real tiny grid (8 fine-tuning runs of the demo's kind), its
tables' numbers against results.csv and the runs' predictions, the figures' sizes and fonts,
methods.md against the runs' configs; the patient-level interval of a fold mean against a
brute-force computation. Tests marked ``report`` compile the LaTeX with a real TeX engine
(`make test-report` installs one); without pdflatex they are skipped."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.metrics import roc_auc_score

from sm_utils.analysis.deviations import DEVIATIONS, applicable, deviations_markdown
from sm_utils.analysis.methods import whose
from sm_utils.analysis.report import WIDTHS
from sm_utils.evaluation import bootstrap_auc_ci, bootstrap_mean_auc_ci

ROOT = Path(__file__).resolve().parents[1]
SM = [sys.executable, "-m", "sm_utils"]


def tiny_grid(folder: Path) -> Path:
    """The demo's set-up, tiny: 1 confounder x 2 p x 2 folds x 2 sources at 32 px, 1 epoch."""
    spec = {
        "name": "tiny", "root": str(ROOT), "runs_dir": str(folder / "runs"),
        "figures_dir": str(folder / "figures"),
        "description": "A tiny grid of the demo's kind.",
        "datasets": [{"name": "phantom_cxr", "manifest": str(folder / "data/manifest.csv"),
                      "params": {"image_size": 64, "n_patients": 60, "n_folds": 2, "seed": 0,
                                 "dataset_params": {"difficulty": 0.15}}}],
        "confounders": [{"name": "tag", "params": {"resolution": "input"}}],
        "prevalences": [0, 1], "folds": 2, "seeds": [812],
        "sources": ["imagenet_lite0", "random"], "architectures": ["tf_efficientnet_lite0"],
        "training": {"image_size": 32, "epochs": 1, "batch_size": 16, "patience": 1,
                     "augment": False, "drop_rate": 0.2},
        "run": {"device": "cpu", "workers": 1, "threads_per_worker": 1},
    }
    path = folder / "grid.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    folder = tmp_path_factory.mktemp("report")
    grid = tiny_grid(folder)
    subprocess.run([*SM, "run", str(grid), "--progress", "off"], check=True, cwd=folder,
                   capture_output=True, text=True, timeout=900)
    out = folder / "paper_kit"
    done = subprocess.run([*SM, "report", str(grid), str(out)], cwd=folder, capture_output=True,
                          text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr
    return {"runs": folder / "runs", "out": out, "stdout": done.stdout}


def parse_auc_latex(text: str) -> dict:
    """(block label, test set, p, source) -> (mean, sd, low, high, n) from auc.tex."""
    cells = {}
    for table in text.split(r"\begin{table*}")[1:]:
        label = re.search(r"\\label\{([^}]*)\}", table).group(1)
        sources = re.findall(r"\\multicolumn\{2\}\{c\}\{([^}]*)\}", table)
        sources = [s.replace(r"\_", "_") for s in sources]
        body = table.split(r"\midrule")[1].split(r"\bottomrule")[0]
        test_set = None
        for line in body.strip().splitlines():
            if line.startswith(r"\addlinespace"):
                continue
            fields = [f.strip() for f in line.rstrip("\\ ").split("&")]
            test_set = fields[0] or test_set
            for i, source in enumerate(sources):
                mean_sd, interval = fields[3 + 2 * i], fields[4 + 2 * i]
                mean, sd = (float(v) for v in mean_sd.split(r"$\pm$"))
                low, high = (float(v) for v in interval.strip("[]").split(","))
                cells[(label, test_set, float(fields[1]), source)] = (mean, sd, low, high,
                                                                       fields[2])
    return cells


@pytest.mark.numerics
@pytest.mark.report  # make test-report: this and the compilation
def test_every_number_of_the_auc_table_comes_from_the_runs(report):
    results = pd.read_csv(report["runs"] / "results.csv")
    cells = parse_auc_latex((report["out"] / "tables/auc.tex").read_text())
    names = {"o.o.d.": "ood", "i.i.d.": "iid", "clean": "clean"}
    # every (test set, p, source) of the grid is in the table once
    assert len(cells) == results.groupby(["test_set", "p", "source"]).ngroups == 12
    predictions = {run_id: pd.read_csv(report["runs"] / run_id / "predictions.csv")
                   for run_id in results["run_id"].unique()}
    for (label, shown_set, p, source), (mean, sd, low, high, n) in cells.items():
        assert label == "tab:auc:phantom_cxr:tag:1:tf_efficientnet_lite0:812"
        test_set = names[shown_set]
        rows = results[(results["test_set"] == test_set) & (results["p"] == p)
                       & (results["source"] == source)]
        assert len(rows) == 2  # the two folds
        assert mean == round(rows["auc"].mean(), 3)
        assert sd == round(rows["auc"].std(ddof=1), 3)
        assert n == f"{int(rows['n'].iloc[0])} ({int(rows['n_patients'].iloc[0])})"
        folds = [predictions[r][predictions[r]["test_set"] == test_set] for r in rows["run_id"]]
        expected = bootstrap_mean_auc_ci([(f["label"], f["score"], f["patient_id"]) for f in folds],
                                         seed=812)
        assert (low, high) == tuple(round(v, 3) for v in expected)
        assert low <= high
    # Markdown and CSV say the same
    markdown = (report["out"] / "tables/auc.md").read_text()
    table = pd.read_csv(report["out"] / "tables/auc.csv")
    for row in table.itertuples():
        assert f"{row.mean:.3f} ± {row.sd:.3f} | [{row.ci_low:.3f}, {row.ci_high:.3f}]" in markdown


@pytest.mark.numerics
def test_a_single_fold_interval_is_the_runs_own(report):
    """One fold's interval of the mean is the run's recorded patient-level interval."""
    results = pd.read_csv(report["runs"] / "results.csv")
    for row in results.itertuples():
        frame = pd.read_csv(report["runs"] / row.run_id / "predictions.csv")
        frame = frame[frame["test_set"] == row.test_set]
        assert bootstrap_mean_auc_ci([(frame["label"], frame["score"], frame["patient_id"])],
                                     seed=812) == (row.auc_ci_low, row.auc_ci_high)


@pytest.mark.numerics
def test_claims_and_statistics_tables_match_the_analysis(report):
    claims = pd.read_csv(report["out"] / "tables/claims.csv")
    assert set(claims["claim"].astype(str)) >= {"1", "2", "3", "4", "5a", "5b", "6"}
    # 2 folds: no claim can hold (the smallest p is 1/4), every tested one says so
    tested = claims[claims["verdict"] != "not testable here"]
    assert len(tested) and set(tested["verdict"]) == {"cannot tell with these folds"}
    latex = (report["out"] / "tables/claims.tex").read_text()
    assert latex.count("cannot tell with these folds") == len(tested)
    comparisons = pd.read_csv(report["out"] / "tables/comparisons.csv")
    assert set(comparisons["test_set"]) == {"ood"} and len(comparisons) == 2  # 2 p, 1 pair
    results = pd.read_csv(report["runs"] / "results.csv")
    for row in comparisons.itertuples():
        a = results[(results["test_set"] == "ood") & (results["p"] == row.p)
                    & (results["source"] == row.source_a)]["auc"]
        assert row.mean_a == pytest.approx(a.mean())
    document = (report["out"] / "tables/tables.tex").read_text()
    for stem in ("auc", "keras_auc", "claims", "comparisons"):
        assert f"\\input{{{stem}.tex}}" in document


@pytest.mark.numerics
def test_figures_are_journal_widths_with_embedded_truetype_fonts(report):
    from PIL import Image

    for name, width in WIDTHS.items():
        pdf = (report["out"] / f"figures/auc_vs_p_{name}.pdf").read_bytes()
        box = re.search(rb"/MediaBox \[ 0 0 ([0-9.]+) ([0-9.]+) \]", pdf)
        assert float(box.group(1)) == pytest.approx(72 * width)
        assert b"/FontFile2" in pdf and b"/Type3" not in pdf   # TrueType, embedded
        png = Image.open(report["out"] / f"figures/auc_vs_p_{name}.png")
        assert png.size[0] == round(300 * width)
    captions = (report["out"] / "figures/captions.md").read_text()
    assert "Binary ROC AUC, mean over 2 fold(s)" in captions


@pytest.mark.numerics
def test_methods_are_generated_from_the_runs_configs(report):
    methods = (report["out"] / "methods.md").read_text()
    configs = [json.loads(p.read_text()) for p in report["runs"].glob("*/config.json")]
    assert len(configs) == 8
    assert "A tiny grid of the demo's kind." in methods
    weights = next(c["source"] for c in configs if c["source"]["source"] == "imagenet_lite0")
    digest = hashlib.sha256(Path(weights["weights"]).read_bytes()).hexdigest()
    assert f"Weights SHA-256 `{digest}`" in methods
    assert "| epochs | 1 | ours (script default: 30) |" in methods
    assert "| optimizer | adam | paper |" in methods
    assert "| lr | 0.001 | script default |" in methods
    assert f"torch {configs[0]['versions']['torch']}" in methods
    assert configs[0]["git"]["commit"][:12] in methods
    assert "stand-in" in methods                  # the demo's sources are not the paper's
    # the deviations that apply to this grid, and not the others
    assert "| tag font |" in methods and "| CT task |" not in methods
    assert "| sex task split |" not in methods and "| augmentation |" not in methods


def test_the_readme_deviations_table_is_the_package_list():
    readme = (ROOT / "README.md").read_text()
    assert deviations_markdown() in readme
    features = {"dataset:lidc_idri", "confounder:xray_noise", "arch:keras_resnet50"}
    topics = {d.topic for d in applicable(features)}
    assert {"CT task", "CT dose noise", "X-ray noise baseline", "framework"} <= topics
    assert "random initialisation" not in topics and "augmentation" not in topics
    assert len(applicable({"all"})) < len(DEVIATIONS)


def test_whose_setting_names_the_paper_default_or_ours():
    assert whose("patience", 30) == "paper"
    assert whose("batch_size", 256) == "script default"
    assert whose("batch_size", 32) == "ours (script default: 256)"
    assert whose("prevalences", (0, 0.1, 0.2, 0.5, 0.8, 1)) == "paper"
    assert whose("prevalences", (0, 0.5, 1)).startswith("ours (paper: 0, 0.1")
    assert whose("image_size", 224).startswith("ours; the paper's is not recorded")


def brute_force_interval(folds, draws, level=0.95):
    """Each draw's fold mean with every drawn patient's images repeated, by scikit-learn."""
    means = []
    for draw in draws:
        aucs = []
        for labels, scores, patients in folds:
            rows = np.concatenate([np.flatnonzero(patients == p) for p in draw])
            if len(set(labels[rows])) < 2:
                break
            aucs.append(roc_auc_score(labels[rows], scores[rows]))
        else:
            means.append(np.mean(aucs))
    tail = (1 - level) / 2 * 100
    return tuple(np.percentile(means, [tail, 100 - tail]))


def test_fold_mean_interval_resamples_patients_once_for_all_folds():
    rng = np.random.default_rng(5)
    patients = np.repeat([f"P{i}" for i in range(30)], rng.integers(1, 4, size=30))
    labels = (rng.random(len(patients)) < 0.4).astype(int)
    labels[:2] = [0, 1]
    folds = []
    for fold in range(3):  # the same test set, its rows in another order in each fold
        order = np.arange(len(labels)) if fold == 0 else rng.permutation(len(labels))
        scores = labels * 0.5 + rng.normal(0, 0.5, len(labels))
        folds.append((labels[order], scores[order], patients[order]))
    n_boot, seed, stream = 200, 7, 11
    got = bootstrap_mean_auc_ci(folds, n_boot=n_boot, seed=seed, stream=stream)
    # the same draws, made independently: patients in order of first appearance
    names = list(dict.fromkeys(patients))
    draws = np.random.default_rng(np.random.SeedSequence([seed, stream])).integers(
        0, len(names), size=(n_boot, len(names)))
    expected = brute_force_interval(folds, [[names[i] for i in draw] for draw in draws])
    assert got == pytest.approx(expected, abs=1e-12)
    # one fold: the run's own interval, draw for draw
    assert bootstrap_mean_auc_ci(folds[:1], seed=3) == bootstrap_auc_ci(*folds[0][:2],
                                                                        groups=patients, seed=3)


def test_patient_interval_ignores_copies_of_a_patients_images_and_the_image_interval_does_not():
    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(20), np.ones(20)].astype(int)
    scores = labels * 0.6 + rng.normal(0, 0.5, 40)
    patients = np.arange(40).astype(str)
    copies = 5   # every image five times: five times the images, the same patients
    many = (np.repeat(labels, copies), np.repeat(scores, copies), np.repeat(patients, copies))
    once = bootstrap_mean_auc_ci([(labels, scores, patients)], seed=1)
    assert bootstrap_mean_auc_ci([many], seed=1) == pytest.approx(once)
    narrow = bootstrap_mean_auc_ci([(many[0], many[1], None)], seed=1)
    assert narrow[1] - narrow[0] < 0.6 * (once[1] - once[0])


def test_report_of_a_folder_without_runs_says_what_to_do(tmp_path):
    done = subprocess.run([*SM, "report", str(tmp_path), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode != 0
    assert f"no complete run directories (with metrics.json) under {tmp_path}" in done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.numerics
@pytest.mark.report
def test_latex_tables_compile_with_a_real_tex_engine(report, tmp_path):
    pdflatex = shutil.which("pdflatex")
    if pdflatex is None:
        pytest.skip("no pdflatex: `make test-report` installs TeX Live (Debian texlive-latex-*)")
    tables = tmp_path / "tables"
    shutil.copytree(report["out"] / "tables", tables)
    done = subprocess.run([pdflatex, "-interaction=nonstopmode", "-halt-on-error", "tables.tex"],
                          cwd=tables, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-3000:]
    log = (tables / "tables.log").read_text(errors="replace")
    assert not re.search(r"^! ", log, re.MULTILINE), log[-3000:]
    # auc, keras_auc, claims, comparisons: a page each
    assert "Output written on tables.pdf (4 pages" in log.replace("\n", "")


def test_the_committed_demo_report_is_the_committed_demo_table():
    """docs/report/demo (linked from the README) was made from the runs of
    data/reference/demo_results.csv: its AUC means and SDs are that table's."""
    results = pd.read_csv(ROOT / "data/reference/demo_results.csv")
    report = pd.read_csv(ROOT / "docs/report/demo/tables/auc.csv")
    assert len(report) == results.groupby(["confounder", "test_set", "p", "source"]).ngroups
    for row in report.itertuples():
        runs = results[(results["confounder"] == row.confounder)
                       & (results["test_set"] == row.test_set) & (results["p"] == row.p)
                       & (results["source"] == row.source)]["auc"]
        assert row.mean == pytest.approx(runs.mean(), abs=1e-12)
        assert row.sd == pytest.approx(runs.std(ddof=1), abs=1e-12, nan_ok=True)
