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
from sm_utils.analysis.render import latex_escape
from sm_utils.analysis.report import WIDTHS, trainings_and_patients_interval
from sm_utils.analysis.results import AnalysisError
from sm_utils.evaluation import bootstrap_auc_ci, bootstrap_mean_auc_ci, bootstrap_mean_auc_draws

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
    """(block label, test set, p, source) -> (mean, sd, patients interval, both interval, n)
    from auc.tex: a row per test set, p and source; blank test set, n and p repeat the row
    above; an interval not shown is None."""
    cells = {}
    for table in text.split(r"\begin{table*}")[1:]:
        label = re.search(r"\\label\{([^}]*)\}", table).group(1)
        body = table.split(r"\midrule")[1].split(r"\bottomrule")[0]
        test_set = n = p = None
        for line in body.strip().splitlines():
            if line.startswith(r"\addlinespace"):
                continue
            fields = [f.strip() for f in line.rstrip("\\ ").split("&")]
            test_set, n = fields[0] or test_set, fields[1] or n
            p = float(fields[2]) if fields[2] else p
            source = fields[3].replace(r"\_", "_")
            rest = fields[6:]
            intervals = []
            while rest:
                if rest[0].startswith(r"\multicolumn"):
                    intervals.append(None)
                    rest = rest[1:]
                else:
                    intervals.append((float(rest[0]), float(rest[1])))
                    rest = rest[2:]
            cells[(label, test_set, p, source)] = (float(fields[4]), float(fields[5]),
                                                   *intervals, n)
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
    for (label, shown_set, p, source), (mean, sd, patients, both, n) in cells.items():
        assert label == "tab:auc:phantom_cxr:tag:1:tf_efficientnet_lite0:812"
        test_set = names[shown_set]
        rows = results[(results["test_set"] == test_set) & (results["p"] == p)
                       & (results["source"] == source)]
        assert len(rows) == 2  # the two folds
        assert mean == round(rows["auc"].mean(), 3)
        assert sd == round(rows["auc"].std(ddof=1), 3)
        assert n == f"{int(rows['n'].iloc[0])} ({int(rows['n_patients'].iloc[0])})"
        folds = [predictions[r][predictions[r]["test_set"] == test_set] for r in rows["run_id"]]
        folds = [(f["label"], f["score"], f["patient_id"]) for f in folds]
        expected = bootstrap_mean_auc_ci(folds, seed=812)
        draws = bootstrap_mean_auc_draws(folds, seed=812)
        if expected[0] == expected[1]:   # collapsed: not shown as if it were an interval
            assert patients is None
        else:
            assert patients == tuple(round(v, 3) for v in expected)
        assert both == tuple(round(v, 3) for v in
                             trainings_and_patients_interval(rows["auc"], draws))
    # Markdown and CSV say the same
    markdown = (report["out"] / "tables/auc.md").read_text()
    table = pd.read_csv(report["out"] / "tables/auc.csv").fillna(
        {"patients_note": "", "both_note": ""})
    for row in table.itertuples():
        patients = ("— (" if row.patients_note else
                    f"[{row.patients_low:.3f}, {row.patients_high:.3f}]")
        assert (f"| {row.source} | {row.mean:.3f} ± {row.sd:.3f} | {patients}"
                in markdown)
        assert f"[{row.both_low:.3f}, {row.both_high:.3f}] |" in markdown


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
    # one verdict cell per tested row (the footnotes may name verdicts too)
    cells = re.findall(r"& cannot tell with these folds(?:\\textsuperscript\{[^}]*\})? *(?:&|\\\\)",
                       latex)
    assert len(cells) == len(tested)
    # human names, numbers through siunitx, wrapped rather than shrunk
    assert r"\resizebox" not in latex and "ci\\_low" not in latex and "p\\_value" not in latex
    assert "{smallest p}" in latex and "{folds}" in latex and "S[table-format=" in latex
    assert r"\label{tab:claims:statements}" in latex
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
    assert f"commit(s) of the runs: `{configs[0]['git']['commit'][:12]}`" in methods
    # the report's own commit: the checkout that wrote it
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.strip()
    written = head[:12] + (" with uncommitted changes" if dirty else "")
    assert f"- sm_utils commit of this report: {written}\n" in methods
    # the claims' tests: the last commit that changed their definitions (claims.py)
    last = subprocess.run(["git", "log", "-1", "--format=%h", "--", "sm_utils/analysis/claims.py"],
                          cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    assert f"tests pre-specified at commit {last}" in methods
    assert "pre-registered" not in methods
    # tag is synthetic: it changes pixels
    assert "- **tag** (synthetic, environment/marker): pixels changed: the confounder is put on" \
        in methods
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


def tex_engine() -> str:
    """pdflatex with siunitx, or a skip saying how to get them."""
    pdflatex = shutil.which("pdflatex")
    if pdflatex is None:
        pytest.skip("no pdflatex: `make test-report` installs TeX Live (Debian texlive-latex-*, "
                    "texlive-science)")
    found = subprocess.run(["kpsewhich", "siunitx.sty"], capture_output=True, text=True,
                           check=False)
    if not found.stdout.strip():
        pytest.skip("no siunitx: `make test-report` installs it (Debian texlive-science)")
    return pdflatex


@pytest.mark.numerics
@pytest.mark.report
def test_latex_tables_compile_with_a_real_tex_engine(report, tmp_path):
    pdflatex = tex_engine()
    tables = tmp_path / "tables"
    shutil.copytree(report["out"] / "tables", tables)
    done = subprocess.run([pdflatex, "-interaction=nonstopmode", "-halt-on-error", "tables.tex"],
                          cwd=tables, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-3000:]
    log = (tables / "tables.log").read_text(errors="replace")
    assert not re.search(r"^! ", log, re.MULTILINE), log[-3000:]
    assert "siunitx.sty" in log                     # the numbers went through siunitx
    assert "Overfull \\hbox" not in log, log       # every table fits the text width
    # auc, keras_auc, claims (statements, verdicts, the paper's), comparisons
    pages = int(re.search(r"Output written on tables.pdf \((\d+) pages", log).group(1))
    assert 4 <= pages <= 6


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


# --- the kit on bad input: checked first, written whole or not at all --------------------------

def copy_runs(report, folder: Path) -> Path:
    """The fixture's runs without their notebooks and curves (what the report reads)."""
    runs = folder / "runs"
    shutil.copytree(report["runs"], runs, ignore=shutil.ignore_patterns("*.ipynb", "*.png"))
    return runs


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.mark.numerics
def test_a_run_without_config_json_stops_the_report_before_anything_is_written(
        report, tmp_path, capsys):
    from sm_utils.cli import main

    runs = copy_runs(report, tmp_path)
    lacking = sorted(runs.glob("*/config.json"))[3]
    run_id = lacking.parent.name
    lacking.unlink()
    out = tmp_path / "kit"
    assert main(["report", str(runs), str(out), "--permutations", "99"]) == 2
    error = capsys.readouterr().err
    assert f"run {run_id}: no {lacking}" in error                     # which run, where
    assert "1 of the 8 runs" in error and "sm run GRID" in error       # what to do
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["runs"]
    # an earlier kit in OUT stays as it was
    shutil.copytree(report["out"], out)
    before = tree(out)
    assert main(["report", str(runs), str(out), "--permutations", "99"]) == 2
    assert tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kit", "runs"]


@pytest.mark.numerics
def test_a_failure_while_writing_leaves_the_earlier_kit_whole(report, tmp_path, monkeypatch):
    from sm_utils.analysis import report as kit

    out = tmp_path / "kit"
    shutil.copytree(report["out"], out)
    before = tree(out)

    def broken(*args, **kwargs):
        raise RuntimeError("the figure could not be drawn")

    monkeypatch.setattr(kit, "write_figures", broken)   # after the tables were written
    with pytest.raises(RuntimeError, match="could not be drawn"):
        kit.write_report(report["runs"], out, n_permutations=99)
    assert tree(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["kit"]
    # and OUT holding other things is refused, not replaced
    (out / "notes.txt").write_text("mine")
    monkeypatch.undo()
    with pytest.raises(AnalysisError, match=r"holds other things than a report \(notes.txt\)"):
        kit.write_report(report["runs"], out, n_permutations=99)
    assert (out / "notes.txt").read_text() == "mine"


@pytest.mark.numerics
def test_runs_without_predictions_have_no_interval_and_the_tables_say_why(
        report, tmp_path, capsys):
    from sm_utils.cli import main

    runs = copy_runs(report, tmp_path)
    results = pd.read_csv(runs / "results.csv")
    run_id = results["run_id"].iloc[0]
    (runs / run_id / "predictions.csv").unlink()
    out = tmp_path / "kit"
    assert main(["report", str(runs), str(out), "--permutations", "99"]) == 0
    assert f"1 run(s) have no predictions.csv ({run_id})" in capsys.readouterr().err
    table = pd.read_csv(out / "tables/auc.csv")
    run = results[results["run_id"] == run_id].iloc[0]
    without = (table["p"] == run["p"]) & (table["source"] == run["source"])
    assert without.sum() == 3                                   # its three test sets
    assert table.loc[without, ["patients_low", "both_low"]].isna().all().all()
    note = f"no interval: predictions.csv missing for 1 of 2 runs ({run_id})"
    assert set(table.loc[without, "patients_note"]) == {note}
    assert table.loc[~without, ["patients_low", "both_low"]].notna().all().all()
    latex = (out / "tables/auc.tex").read_text()
    assert latex.count(r"\multicolumn{2}{c}{---\textsuperscript{a}}") == 2 * 3
    assert rf"\textsuperscript{{a}}\,{latex_escape(note)}" in latex
    assert "— (a) | — (a) |" in (out / "tables/auc.md").read_text()


# --- intervals that say what they cover ---------------------------------------------------------

def one_test_set(n_patients=40, seed=0):
    rng = np.random.default_rng(seed)
    patients = np.repeat([f"P{i}" for i in range(n_patients)], 2)
    labels = np.repeat(rng.random(n_patients) < 0.5, 2).astype(int)
    labels[:4] = [0, 0, 1, 1]
    return rng, labels, patients


def test_the_interval_over_trainings_and_patients_is_wider_where_trainings_vary():
    rng, labels, patients = one_test_set()
    # five trainings of very different quality, scored on one test set
    folds = [(labels, labels * signal + rng.normal(0, 1, len(labels)), patients)
             for signal in (0.2, 0.8, 1.5, 2.5, 4.0)]
    aucs = [roc_auc_score(y, s) for y, s, _ in folds]
    draws = bootstrap_mean_auc_draws(folds, seed=1)
    patients_only = bootstrap_mean_auc_ci(folds, seed=1)
    both = trainings_and_patients_interval(aucs, draws)
    assert np.std(aucs, ddof=1) > 0.1
    assert both[1] - both[0] > 1.5 * (patients_only[1] - patients_only[0])
    assert both[0] < np.mean(aucs) < both[1]
    # trainings that do not differ: the test set's variance alone, a normal interval
    same = [folds[2]] * 3
    draws = bootstrap_mean_auc_draws(same, seed=1)
    mean = roc_auc_score(*folds[2][:2])
    half = 1.959964 * draws.std(ddof=1)
    assert trainings_and_patients_interval([mean] * 3, draws) == pytest.approx(
        (mean - half, mean + half), abs=1e-6)
    # Welch-Satterthwaite: with the test set's variance negligible, a t interval on k - 1 df
    aucs = [0.6, 0.7, 0.8]
    low, high = trainings_and_patients_interval(aucs, [0.7, 0.7 + 1e-9])
    assert (high - low) / 2 == pytest.approx(4.302653 * 0.1 / np.sqrt(3), rel=1e-6)
    assert np.isnan(trainings_and_patients_interval([0.7], draws)).all()   # one fold


def synthetic_cell(scores_per_fold, labels, patients):
    """A results table of one (test set, p, source) cell and its runs' predictions."""
    rows, predictions = [], {}
    for fold, scores in enumerate(scores_per_fold):
        run_id = f"run{fold}"
        rows.append({"run_id": run_id, "dataset": "d", "confounder": "tag", "strength": 1.0,
                     "arch": "a", "seed": 812, "test_set": "ood", "p": 1.0, "source": "imagenet",
                     "fold": fold, "auc": roc_auc_score(labels, scores), "n": len(labels),
                     "n_patients": len(set(patients))})
        predictions[run_id] = pd.DataFrame({"test_set": "ood", "label": labels, "score": scores,
                                            "patient_id": patients})
    return pd.DataFrame(rows), predictions


def test_a_collapsed_interval_is_not_printed_as_if_it_were_one():
    from sm_utils.analysis.kit_tables import auc_latex, auc_markdown
    from sm_utils.analysis.report import auc_table

    _, labels, patients = one_test_set()
    reversed_scores = -labels + 0.01 * np.arange(len(labels)) / len(labels)   # AUC 0 always
    table, predictions = synthetic_cell([reversed_scores, reversed_scores], labels, patients)
    aucs = auc_table(table, predictions=predictions)
    row = aucs.iloc[0]
    assert row["mean"] == 0 and (row["patients_low"], row["patients_high"]) == (0, 0)
    assert row["patients_note"].startswith("no interval shown: every resample gives AUC 0.000 "
                                           "(every positive ranked below every negative")
    assert row["both_note"].startswith("no interval shown: every fold and every resample")
    latex = auc_latex(aucs, "AUC", "caption", "tab:auc")
    assert "0.000 & 0.000 & 0.000" not in latex        # mean, SD, but no [0, 0] interval
    assert r"\multicolumn{2}{c}{---\textsuperscript{a}} & " \
           r"\multicolumn{2}{c}{---\textsuperscript{b}}" in latex
    assert "[0.000, 0.000]" not in auc_markdown(aucs, "AUC")


def test_the_figure_caption_says_what_its_band_covers():
    from sm_utils.analysis.figures import figure_caption

    table, _ = synthetic_cell([np.r_[0.1, 0.9, 0.2, 0.8]] * 2, np.array([0, 1, 0, 1]),
                              np.array(["a", "b", "c", "d"]))
    caption = figure_caption(table)
    assert "band: 95 % t interval over folds (the spread between trainings on the grid's one " \
           "test set, which the test set's sampling error is not part of" in caption


# --- tables a journal takes ---------------------------------------------------------------------

def claims_like(extra: dict | None = None) -> pd.DataFrame:
    """A claims table as claims.py writes it, with columns it may gain."""
    frame = pd.DataFrame({
        "claim": ["1", "2", "2"],
        "statement": ["comparable clean", "falls further", "falls further"],
        "dataset": "d", "arch": "a", "confounder": ["(none)", "tag", "sex"],
        "quantity": ["clean AUC", "fall", "fall"], "roles": ["in_domain vs imagenet"] * 3,
        "sources": ["radiology_phantom vs imagenet_lite0"] * 3, "effect": [0.161, -0.016, 0.2],
        "ci_low": [-0.1, -0.189, np.nan], "ci_high": [0.422, 0.158, np.nan],
        "p_value": [1.0, 0.625, np.nan], "min_p": [0.125, 0.125, np.nan],
        "n_folds": [3, 3, np.nan], "verdict": ["cannot tell with these folds",
                                               "cannot tell with these folds",
                                               "not testable here"],
        "why": ["3 folds: 0.125 > 0.05", "3 folds: 0.125 > 0.05", "no sex runs"],
        "paper_verdict": ["holds"] * 3, "paper_effect": [0.01, 0.29, 0.11]})
    for column, value in (extra or {}).items():
        frame[column] = value
    return frame


def test_the_claims_table_renders_whatever_columns_it_has_at_journal_width():
    from sm_utils.analysis.kit_tables import MAX_COLUMNS, claims_latex, claims_markdown

    claims = claims_like({"measure": "as the paper tested it", "level_minus_fall": [.2, -.1, .3],
                          "interval": "95 % t over folds"})
    latex = claims_latex(claims, "Claims.")
    tables = latex.split(r"\begin{table*}")[1:]
    # statements, the verdicts on this grid (split to fit: a measure is part of each row's
    # name, beside the claim, confounder and sources), the paper's
    assert len(tables) == 4
    statements, *ours, paper = tables
    ours = "".join(ours)
    assert "comparable clean" in statements and "95 \\% t over folds" in statements
    assert "as the paper tested it" in ours and "as the paper tested it" not in statements
    assert r"\multicolumn{2}{c}{interval}" in ours and "{smallest p}" in ours
    assert "{folds}" in ours and r"\begin{tabular}[b]{@{}c@{}}level\\minus fall" in ours
    assert "paper's\\\\effect" in paper
    assert "paper's\\\\effect" not in ours
    # one value in every row: said once, in the caption
    assert "dataset: d; architecture: a; paper's verdict: holds." in ours
    assert r"\resizebox" not in latex and "ci\\_low" not in latex
    # numbers in siunitx columns, one that holds a minus sign
    assert "S[table-format=-1.3]" in ours and "& -0.189 & 0.158 &" in ours
    for table in tables:
        spec = re.search(r"\\begin\{tabular\}\{(.*)\}\n", table).group(1)
        assert len(re.findall(r"S\[|p\{|(?<![a-z{])[lrc](?![a-z])", spec)) <= MAX_COLUMNS
    # the reasons for the verdicts as footnotes
    assert r"cannot tell with these folds\textsuperscript{a}" in ours
    assert r"\textsuperscript{b}\,no sex runs" in ours
    markdown = claims_markdown(claims, "Claims.")
    assert ("| claim | confounder | measure | sources | effect | interval | p | smallest p |"
            in markdown)
    assert ("| 2 | tag | as the paper tested it | radiology_phantom vs imagenet_lite0 | -0.016 "
            "| [-0.189, 0.158] |") in markdown
    # a table of claims.py without some of the known columns still renders
    assert "{verdict}" in claims_latex(claims.drop(columns=["why", "statement", "ci_low"]), "C.")


@pytest.mark.report
def test_siunitx_tables_compile(tmp_path):
    """The claims tables of any shape and an AUC table with footnotes, through a real
    pdflatex with siunitx (make test-report installs them)."""
    from sm_utils.analysis.kit_tables import DOCUMENT, auc_latex, claims_latex
    from sm_utils.analysis.report import auc_table

    pdflatex = tex_engine()
    _, labels, patients = one_test_set()
    table, predictions = synthetic_cell([-labels + 0.0, labels * 0.5 + np.arange(80) / 80],
                                        labels, patients)
    aucs = auc_table(table, predictions=predictions)
    claims = claims_like({"measure": "as robustness", "level_minus_fall": -0.25})
    (tmp_path / "tables.tex").write_text(DOCUMENT % "\n".join(
        [claims_latex(claims, "Claims."), auc_latex(aucs, "AUC", "Caption.", "tab:auc")]))
    done = subprocess.run([pdflatex, "-interaction=nonstopmode", "-halt-on-error", "tables.tex"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    log = (tmp_path / "tables.log").read_text(errors="replace")
    assert done.returncode == 0, done.stdout[-3000:]
    assert "siunitx.sty" in log and "Overfull \\hbox" not in log, log[-3000:]


def test_a_sampled_confounder_changes_no_pixels_in_the_methods():
    from sm_utils.analysis.methods import _confounder_text, short_commit

    sex = _confounder_text({"name": "sex", "kind": "sampled", "attribute": "sex", "value": "F",
                            "reference": "M"})
    assert sex.startswith("no pixel changed: the rows are chosen so that a fraction p of the "
                          "positive training images have sex F and the rest sex M")
    assert "put on" not in sex and "(positives sex M, negatives sex F)" in sex
    # a record without its kind: the registry knows sex is sampled and tag is not
    assert _confounder_text({"name": "sex", "attribute": "sex", "value": "F",
                             "reference": "M"}) == sex
    assert _confounder_text({"name": "tag"}).startswith("pixels changed: the confounder is put on")
    assert short_commit({"commit": None, "dirty": None}) == "unknown (not a git checkout)"
    assert short_commit({"commit": "0123456789abcdef", "dirty": True}) == \
        "0123456789ab with uncommitted changes"
