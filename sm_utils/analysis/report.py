"""The paper kit: a grid's results as a manuscript needs them (``sm report RUNS_DIR OUT``).

Writes under ``OUT``:

- ``tables/auc.{tex,md,csv}``: binary AUC per source x p x test set: mean and SD over folds
  and two 95 % intervals of the fold mean that cover different things: *test patients
  resampled, models fixed* (the test set's patients resampled once for all folds,
  :func:`sm_utils.evaluation.bootstrap_mean_auc_ci`: the test set's sampling error only) and
  *trainings and test patients* (:func:`trainings_and_patients_interval`: the spread between
  trainings and the test set's sampling together); with the test set's images and patients;
  ``tables/keras_auc.*``: the paper's metric (Keras AUC), mean and SD;
- ``tables/claims.*``: the paper's claims checked on the grid, beside the paper's own verdicts
  (a table of the claims' statements and one of their verdicts);
- ``tables/statistics.*``: the paper's test (ImageNet vs RadImageNet, o.o.d. Keras AUC, as
  the paper ran it, with the fold-paired test beside it) and ``tables/comparisons.*``: every
  pair of sources on the o.o.d. test set;
- ``tables/tables.tex``: a LaTeX document that inputs every table (``pdflatex tables.tex``);
  numbers through siunitx (``S`` columns), booktabs rules;
- ``figures/auc_vs_p_{single,double}.{pdf,png}``: the AUC-vs-p figure at one journal column
  (3.5 in) and two (7.16 in) in one style, fonts embedded (TrueType); captions in
  ``figures/captions.md``;
- ``methods.md``: the methods, generated from the runs' recorded configs (data, splits,
  confounders, sources with their weights' SHA-256, training settings and whose they are,
  statistics, software versions and commits) and the deviations from the paper that apply.

Everything is checked before anything is written (every run's ``config.json``, the predictions'
columns, the output folder), the kit is written into a temporary folder beside ``OUT`` and moved
into place at the end: a failure leaves no half-written kit and an older kit as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from ..evaluation import bootstrap_mean_auc_draws
from ..io import atomic_write_csv, atomic_write_text
from ..paths import METRICS_FILE
from ..provenance import git_commit
from .claims import ALPHA, check_claims, claims_against_paper
from .figures import figure_caption, plot_auc_vs_p, save_figure
from .kit_tables import (
    BLOCK,
    DOCUMENT,
    auc_latex,
    auc_markdown,
    claims_latex,
    claims_markdown,
    interval_caption,
)
from .methods import count_range, methods_markdown, read_configs, short_commit
from .paper import PAPER_COLUMNS, paper_test
from .render import frame_latex, frame_markdown
from .results import PAPER_METRIC, TEST_SET_ORDER, AnalysisError, collect_results
from .statistics import compare_sources

N_BOOT = 1000        # as each run's own interval (sm_utils.runs), so one fold reproduces it
LEVEL = 0.95
DPI = 300
WIDTHS = {"single": 3.5, "double": 7.16}   # inches: one and two columns of a two-column journal
# One style for every figure of the kit: 7 pt text (a journal's smallest legible size at print
# width) and TrueType fonts embedded in the PDF (Type 3 fonts are refused by many journals).
STYLE = {"font.family": "DejaVu Sans", "font.size": 7, "axes.titlesize": 7, "axes.labelsize": 7,
         "xtick.labelsize": 6, "ytick.labelsize": 6, "legend.fontsize": 6,
         "lines.linewidth": 1.0, "lines.markersize": 3, "axes.linewidth": 0.6,
         "pdf.fonttype": 42, "ps.fonttype": 42}
AUC_COLUMNS = [*BLOCK, "test_set", "p", "source", "n_folds", "mean", "sd",
               "patients_low", "patients_high", "patients_note",
               "both_low", "both_high", "both_note", "n_images", "n_patients"]
KIT_ENTRIES = {"tables", "figures", "methods.md"}   # what a kit folder holds


# --- numbers ------------------------------------------------------------------------------------

PREDICTION_COLUMNS = ("test_set", "label", "score")


def read_predictions(runs_dir: Path, run_ids: Iterable[str]) -> dict[str, pd.DataFrame | None]:
    """Each run's predictions.csv (None where the run has none); a file that cannot be read or
    lacks the columns the intervals need is an error naming it."""
    out: dict[str, pd.DataFrame | None] = {}
    for run_id in dict.fromkeys(run_ids):
        path = runs_dir / run_id / "predictions.csv"
        if not path.is_file():
            out[run_id] = None
            continue
        try:
            frame = pd.read_csv(path)
        except (OSError, ValueError) as err:
            raise AnalysisError(f"run {run_id}: {path} cannot be read ({err}); rerun the run "
                                "(delete its folder and `sm run` the grid again) or remove the "
                                "file, and its cells get no interval") from err
        missing = [c for c in PREDICTION_COLUMNS if c not in frame.columns]
        if missing:
            raise AnalysisError(f"run {run_id}: {path} lacks column(s) {missing} (it has "
                                f"{list(frame.columns)}); a run writes test_set, label, score "
                                "and patient_id; rerun the run or remove the file")
        out[run_id] = frame if len(frame) else None
    return out


def trainings_and_patients_interval(fold_aucs, patient_draws, level: float = LEVEL
                                    ) -> tuple[float, float]:
    """An interval of the fold mean AUC over both sources of its variation: the trainings
    (folds) and the test set's patients.

    The fold mean is the quantity plus a training part (different in each fold) plus a test-set
    part that every fold shares (all folds are scored on one test set). The fold variance of
    the mean, SD^2 / k, estimates the first (with the folds' own share of the test-set noise);
    the variance of the patient bootstrap's fold means (``patient_draws``, the same draws for
    all folds, so the shared part is in it) estimates the second. Their sum counts the folds'
    own share of the test-set noise twice, so the interval errs on the wide side. Its degrees
    of freedom are Welch-Satterthwaite's with the bootstrap variance taken as known (many
    patients): k - 1 when the trainings dominate, tending to the normal when the test set does.

    Chosen over a bootstrap that also resamples the folds: with 2 to 5 folds that bootstrap has
    at most 126 distinct fold draws, collapses at the boundary and understates the training
    spread by (k - 1) / k; the t interval is the figure's band widened by the test set. Clipped
    to [0, 1] (an AUC); (NaN, NaN) with one fold (no spread between trainings to estimate) or
    without draws.
    """
    aucs = np.asarray(fold_aucs, dtype=float)
    draws = np.asarray(patient_draws, dtype=float)
    k = len(aucs)
    if k < 2 or len(draws) < 2 or not np.isfinite(aucs).all():
        return float("nan"), float("nan")
    trainings, patients = aucs.var(ddof=1) / k, draws.var(ddof=1)
    total = trainings + patients
    if total == 0:
        return float(aucs.mean()), float(aucs.mean())
    df = np.inf if trainings == 0 else (k - 1) * (total / trainings) ** 2
    half = stats.t.ppf(0.5 + level / 2, df) * np.sqrt(total)
    return float(max(aucs.mean() - half, 0.0)), float(min(aucs.mean() + half, 1.0))


def _runs_note(run_ids: list[str], of: int) -> str:
    shown = ", ".join(run_ids[:3]) + (", ..." if len(run_ids) > 3 else "")
    return f"no interval: predictions.csv missing for {len(run_ids)} of {of} runs ({shown})"


def _degenerate_note(value: float) -> str:
    ranked = {0.0: "below", 1.0: "above"}.get(round(value, 12))
    how = (f"every positive ranked {ranked} every negative" if ranked
           else "the same ranking")
    return (f"no interval shown: every resample gives AUC {value:.3f} ({how} in every draw), "
            "so the percentile interval shows no uncertainty")


def auc_table(table: pd.DataFrame, runs_dir: str | os.PathLike | None = None,
              metric: str = "auc", n_boot: int = N_BOOT, level: float = LEVEL,
              predictions: dict[str, pd.DataFrame | None] | None = None) -> pd.DataFrame:
    """Per block x test set x p x source: mean and SD over folds of ``metric`` and, for the
    binary AUC with the runs' predictions (``predictions``, else read from ``runs_dir``), two
    intervals of the fold mean: test patients resampled with the models fixed (seeded by the
    runs' seed, so one fold gives its run's own interval) and over trainings and test patients
    (:func:`trainings_and_patients_interval`). Intervals are computed where every fold of a
    cell has predictions; ``patients_note``/``both_note`` say why a cell has none, or why a
    collapsed interval is not shown. ``n_images``/``n_patients``: the test set's, or their
    range over folds."""
    if table.empty:
        raise AnalysisError("the results table is empty; run the grid first")
    if metric not in table.columns:
        raise AnalysisError(f"the results have no column {metric!r}")
    if metric == "auc" and predictions is None and runs_dir is not None:
        predictions = read_predictions(Path(runs_dir), table["run_id"])
    rows = []
    keys = [*BLOCK, "test_set", "p", "source"]
    for key, group in table.groupby(keys, sort=False, dropna=False):
        finite = group[np.isfinite(group[metric].to_numpy(dtype=float))]
        values = finite[metric].to_numpy(dtype=float)
        row = dict(zip(keys, key))
        row.update(n_folds=len(values), mean=values.mean() if len(values) else np.nan,
                   sd=values.std(ddof=1) if len(values) > 1 else np.nan,
                   patients_low=np.nan, patients_high=np.nan, patients_note="",
                   both_low=np.nan, both_high=np.nan, both_note="",
                   n_images=count_range(group["n"]) if "n" in group else "",
                   n_patients=count_range(group["n_patients"]) if "n_patients" in group else "")
        if metric == "auc" and predictions is not None and len(values):
            row.update(_intervals(finite, row, predictions, n_boot, level))
        rows.append(row)
    out = pd.DataFrame(rows, columns=AUC_COLUMNS)
    order = out["test_set"].map(TEST_SET_ORDER).fillna(len(TEST_SET_ORDER))
    return (out.assign(_order=order).sort_values([*BLOCK, "_order", "p"], kind="stable")
            .drop(columns="_order").reset_index(drop=True))


def _intervals(group: pd.DataFrame, row: dict, predictions: dict, n_boot: int,
               level: float) -> dict:
    """Both intervals of one cell (its runs in ``group``) and the notes on them."""
    missing = [r for r in group["run_id"] if predictions.get(r) is None]
    if missing:
        note = _runs_note(missing, len(group))
        return {"patients_note": note, "both_note": note}
    folds = []
    for run_id in group["run_id"]:
        frame = predictions[run_id]
        part = frame[frame["test_set"] == row["test_set"]]
        if part.empty:
            note = f"no interval: run {run_id}'s predictions.csv has no {row['test_set']} rows"
            return {"patients_note": note, "both_note": note}
        folds.append((part["label"], part["score"], part.get("patient_id", None)))
    draws = bootstrap_mean_auc_draws(folds, n_boot=n_boot, seed=int(row["seed"]))
    if not len(draws):
        note = "no interval: a fold's test set holds one class"
        return {"patients_note": note, "both_note": note}
    tail = (1.0 - level) / 2 * 100
    low, high = (float(v) for v in np.percentile(draws, [tail, 100 - tail]))
    out = {"patients_low": low, "patients_high": high}
    if low == high:
        out["patients_note"] = _degenerate_note(low)
    both = trainings_and_patients_interval(group["auc"], draws, level)
    out.update(both_low=both[0], both_high=both[1])
    if len(group) < 2:
        out["both_note"] = "no interval over trainings: one fold"
    elif both[0] == both[1]:
        out["both_note"] = ("no interval shown: every fold and every resample gives AUC "
                            f"{both[0]:.3f}, so no uncertainty can be shown")
    return out


# --- figures ------------------------------------------------------------------------------------

def write_figures(table: pd.DataFrame, out: Path, reference: pd.DataFrame | None = None
                  ) -> tuple[list[Path], str]:
    """The AUC-vs-p figure at each width in :data:`WIDTHS` (PDF and PNG), binary AUC; with
    ``reference``, also the Keras AUC against the paper's means. Returns paths and captions."""
    import matplotlib.pyplot as plt

    paths, captions = [], ["# Figure captions", ""]
    variants = [("auc_vs_p", "auc", None)]
    if reference is not None and not reference.empty:
        variants.append(("vs_paper", PAPER_METRIC, reference))
    for name, metric, ref in variants:
        for width_name, width in WIDTHS.items():
            with plt.rc_context(STYLE):
                fig = plot_auc_vs_p(table, reference=ref, metric=metric, width=width, note=False)
                paths += save_figure(fig, out / f"{name}_{width_name}", dpi=DPI, tight=False)
                plt.close(fig)
        captions += [f"**{name}_single / {name}_double**: "
                     + figure_caption(table, metric=metric, reference=ref), ""]
    return paths, "\n".join(captions)


# --- everything ---------------------------------------------------------------------------------

STATISTICS_SHOWN = ["confounder", "p", "metric", "mean_imagenet", "mean_radimagenet",
                    "mean_difference", "p_value", "p_paired", "p_paired_holm", "min_p_paired"]
COMPARISONS_SHOWN = ["confounder", "p", "source_a", "source_b", "mean_a", "mean_b",
                     "mean_difference", "p_value", "p_paired", "p_holm"]


def check_runs(runs_dir: Path, table: pd.DataFrame) -> list[dict]:
    """Every run's config.json, read; an error naming each run without one (or with one that
    cannot be read), what was expected and how to fix it, before anything is written."""
    run_ids = list(dict.fromkeys(table["run_id"]))
    bad = []
    for run_id in run_ids:
        path = runs_dir / run_id / "config.json"
        if not path.is_file():
            bad.append(f"  run {run_id}: no {path}")
            continue
        try:
            json.loads(path.read_text())
        except (OSError, ValueError) as err:
            bad.append(f"  run {run_id}: {path} cannot be read ({err})")
    if bad:
        raise AnalysisError(
            f"{len(bad)} of the {len(run_ids)} runs under {runs_dir} lack a readable config.json "
            "(every run writes one beside metrics.json; methods.md is written from them):\n"
            + "\n".join(bad) + "\nCopy each run's folder whole from where it ran, or delete "
            "the run's folder and run the grid again (`sm run GRID` runs only what is missing). "
            "Nothing was written.")
    return read_configs(runs_dir, run_ids)


def _check_out(out: Path) -> None:
    """OUT is new, empty, or an earlier kit (replaced whole); never a folder of other files."""
    if out.exists() and not out.is_dir():
        raise AnalysisError(f"{out} is a file; give a folder for the report")
    if out.is_dir():
        others = sorted(p.name for p in out.iterdir() if p.name not in KIT_ENTRIES)
        if others:
            raise AnalysisError(
                f"{out} holds other things than a report ({', '.join(others[:5])}"
                f"{', ...' if len(others) > 5 else ''}); the report replaces its folder whole, "
                "so give a new or empty folder, or an earlier report's")


def _replace(staging: Path, out: Path) -> None:
    """Move the finished kit into place; an earlier kit is kept until the new one is there."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        out.rename(old / out.name)
    try:
        staging.rename(out)
    except OSError:
        if old is not None:
            (old / out.name).rename(out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_report(runs_dir: str | os.PathLike, out: str | os.PathLike, name: str | None = None,
                 description: str | None = None, reference_datasets: dict | None = None,
                 claim_roles: dict | None = None, n_permutations: int = 9999,
                 seed: int = 0, notes: list[str] | None = None) -> list[Path]:
    """Tables, figures and methods.md of the grid in ``runs_dir`` into ``out``; the paths.

    Everything is checked and computed first, then written into a temporary folder beside
    ``out`` that replaces ``out`` at the end: on any error nothing changes. ``notes`` (a list)
    receives what a user should know of a kit that was written (e.g. cells without intervals).
    """
    from .reference import load_reference, reference_lines

    runs_dir, out = Path(runs_dir), Path(out).absolute()
    table = collect_results(runs_dir)
    if table.empty:
        raise AnalysisError(f"no complete run directories (with {METRICS_FILE}) under "
                            f"{runs_dir}: run the grid first")
    configs = check_runs(runs_dir, table)
    predictions = read_predictions(runs_dir, table["run_id"])
    _check_out(out)
    name = name or runs_dir.name
    report_commit = git_commit()

    # every table in memory first: a failure here (e.g. a claims role naming no source) leaves
    # nothing behind
    files: dict[str, pd.DataFrame | str] = {}
    latex_inputs = []

    def both(stem: str, frame: pd.DataFrame, markdown: str, latex: str) -> None:
        files.update({f"tables/{stem}.csv": frame, f"tables/{stem}.md": markdown,
                      f"tables/{stem}.tex": latex})
        latex_inputs.append(stem)

    aucs = auc_table(table, runs_dir, predictions=predictions)
    intervals = interval_caption(N_BOOT, LEVEL)
    both("auc", aucs, auc_markdown(aucs, "Binary ROC AUC", caption=intervals),
         auc_latex(aucs, "Binary ROC AUC", intervals + " n: test images (patients).", "tab:auc"))
    missing = sorted(r for r, f in predictions.items() if f is None)
    if missing and notes is not None:
        notes.append(f"{len(missing)} run(s) have no predictions.csv ({', '.join(missing[:5])}"
                     f"{', ...' if len(missing) > 5 else ''}): their cells of tables/auc.* have "
                     "no interval, and the tables say so")
    if PAPER_METRIC in table.columns and table[PAPER_METRIC].notna().any():
        keras = auc_table(table, metric=PAPER_METRIC)
        both("keras_auc", keras,
             auc_markdown(keras, "Keras AUC (the paper's metric)", with_interval=False),
             auc_latex(keras, "Keras AUC (the paper's metric)", "Mean and SD over folds; n: "
                       "test images (patients).", "tab:keras-auc", with_interval=False))

    claims = claims_against_paper(check_claims(table, claim_roles), datasets=reference_datasets)
    where = short_commit(report_commit)
    claims_caption = (f"The paper's claims checked on this grid, alpha {ALPHA} per row "
                      f"(tests pre-specified at commit {where}, sm_utils/analysis/claims.py), "
                      "beside the same checks on the paper's reported means; the verdicts are "
                      "conditional on the grid's one test set.")
    both("claims", claims, claims_markdown(claims, claims_caption),
         claims_latex(claims, claims_caption))

    try:
        primary = paper_test(table, metric=PAPER_METRIC, n_permutations=n_permutations, seed=seed)
        binary = paper_test(table, metric="auc", n_permutations=n_permutations, seed=seed)
        statistics = pd.concat([t for t in (primary, binary) if not t.empty] or [primary],
                               ignore_index=True)
    except AnalysisError as err:
        statistics = pd.DataFrame(columns=PAPER_COLUMNS)
        statistics.attrs["why"] = str(err)
    if not statistics.empty:
        shown = statistics[STATISTICS_SHOWN]
        both("statistics", statistics, frame_markdown(shown),
             frame_latex(shown, "The paper's test: ImageNet vs RadImageNet on the o.o.d. test "
                         "set, permutation t-test over folds as the paper ran it (p), "
                         "fold-paired sign-flip test (p paired), Holm over prevalences "
                         "(p paired, Holm) and the smallest p the folds allow.",
                         "tab:statistics"))
    comparisons = compare_sources(table, n_permutations=n_permutations, seed=seed)
    comparisons = comparisons[comparisons["test_set"] == "ood"]
    if not comparisons.empty:
        shown = comparisons[COMPARISONS_SHOWN]
        both("comparisons", comparisons, frame_markdown(shown),
             frame_latex(shown, "Every pair of sources on the o.o.d. test set (binary AUC): "
                         "difference A minus B, permutation t-test (p), fold-paired sign-flip "
                         "test (p paired), Holm over prevalences.", "tab:comparisons"))
    document = "\n\\clearpage\n".join(f"\\input{{{stem}.tex}}" for stem in latex_inputs)
    files["tables/tables.tex"] = DOCUMENT % document
    files["methods.md"] = methods_markdown(table, configs, name, description, n_permutations,
                                           n_boot=N_BOOT, report_commit=report_commit)
    reference = None
    if reference_datasets:
        reference = reference_lines(load_reference(), reference_datasets)

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.writing-", dir=out.parent))
    try:
        written = []
        for relative, content in files.items():
            target = staging / relative
            written.append(atomic_write_csv(target, content) if isinstance(content, pd.DataFrame)
                           else atomic_write_text(target, content))
        figure_paths, captions = write_figures(table, staging / "figures", reference)
        written += figure_paths
        written.append(atomic_write_text(staging / "figures" / "captions.md", captions))
        _replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return [out / p.relative_to(staging) for p in written]
