"""The paper kit: a grid's results as a manuscript needs them (``sm report RUNS_DIR OUT``).

Writes under ``OUT``:

- ``tables/auc.{tex,md,csv}``: binary AUC per source x p x test set: mean +- SD over folds and
  the 95 % patient-level bootstrap interval of that mean (the test set's patients resampled
  once for all folds, :func:`sm_utils.evaluation.bootstrap_mean_auc_ci`: the interval is the
  test set's sampling error, the SD the spread between trainings), with the test set's images
  and patients; ``tables/keras_auc.*``: the paper's metric (Keras AUC), mean +- SD;
- ``tables/claims.*``: the paper's claims checked on the grid, beside the paper's own verdicts;
- ``tables/statistics.*``: the paper's test (ImageNet vs RadImageNet, o.o.d. Keras AUC, as
  the paper ran it, with the fold-paired test beside it) and ``tables/comparisons.*``: every
  pair of sources on the o.o.d. test set;
- ``tables/tables.tex``: a LaTeX document that inputs every table (``pdflatex tables.tex``);
- ``figures/auc_vs_p_{single,double}.{pdf,png}``: the AUC-vs-p figure at one journal column
  (3.5 in) and two (7.16 in) in one style, fonts embedded (TrueType); captions in
  ``figures/captions.md``;
- ``methods.md``: the methods, generated from the runs' recorded configs (data, splits,
  confounders, sources with their weights' SHA-256, training settings and whose they are,
  statistics, software versions) and the deviations from the paper that apply.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..evaluation import bootstrap_mean_auc_ci
from ..io import atomic_write_csv, atomic_write_text
from ..paths import METRICS_FILE
from .claims import ALPHA, CLAIMS, check_claims, claims_against_paper, format_claims
from .figures import figure_caption, plot_auc_vs_p, save_figure
from .methods import count_range, methods_markdown, read_configs
from .paper import PAPER_COLUMNS, paper_test
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
BLOCK = ["dataset", "confounder", "strength", "arch", "seed"]   # one table per block
AUC_NOTE = (" and 95 % patient-level bootstrap interval of the mean (the test set's patients "
            "resampled once for all folds)")
TEST_SET_NAMES = {"ood": "o.o.d.", "iid": "i.i.d.", "clean": "clean"}
AUC_COLUMNS = [*BLOCK, "test_set", "p", "source", "n_folds", "mean", "sd", "ci_low", "ci_high",
               "n_images", "n_patients"]


# --- numbers ------------------------------------------------------------------------------------

def _predictions(runs_dir: Path, run_id: str, cache: dict) -> pd.DataFrame | None:
    if run_id not in cache:
        path = runs_dir / run_id / "predictions.csv"
        frame = pd.read_csv(path) if path.is_file() else None
        cache[run_id] = frame if frame is not None and len(frame) else None
    return cache[run_id]


def auc_table(table: pd.DataFrame, runs_dir: str | os.PathLike | None = None,
              metric: str = "auc", n_boot: int = N_BOOT, level: float = LEVEL) -> pd.DataFrame:
    """Per block x test set x p x source: mean and SD over folds of ``metric`` and, for the
    binary AUC with ``runs_dir`` holding the runs' predictions, the patient-level bootstrap
    interval of the fold mean (seeded by the runs' seed, so one fold gives its run's own
    interval). ``n_images``/``n_patients``: the test set's, or their range over folds."""
    if table.empty:
        raise AnalysisError("the results table is empty; run the grid first")
    if metric not in table.columns:
        raise AnalysisError(f"the results have no column {metric!r}")
    runs = Path(runs_dir) if runs_dir is not None else None
    cache: dict[str, pd.DataFrame | None] = {}
    rows = []
    keys = [*BLOCK, "test_set", "p", "source"]
    for key, group in table.groupby(keys, sort=False, dropna=False):
        values = group[metric].to_numpy(dtype=float)
        values = values[np.isfinite(values)]
        row = dict(zip(keys, key))
        row.update(n_folds=len(values), mean=values.mean() if len(values) else np.nan,
                   sd=values.std(ddof=1) if len(values) > 1 else np.nan,
                   ci_low=np.nan, ci_high=np.nan,
                   n_images=count_range(group["n"]) if "n" in group else "",
                   n_patients=count_range(group["n_patients"]) if "n_patients" in group else "")
        if metric == "auc" and runs is not None:
            folds = []
            for run_id in group["run_id"]:
                frame = _predictions(runs, run_id, cache)
                if frame is None:
                    folds = []
                    break
                part = frame[frame["test_set"] == row["test_set"]]
                groups = part.get("patient_id", None)
                folds.append((part["label"], part["score"], groups))
            if folds:
                row["ci_low"], row["ci_high"] = bootstrap_mean_auc_ci(
                    folds, n_boot=n_boot, level=level, seed=int(row["seed"]))
        rows.append(row)
    out = pd.DataFrame(rows, columns=AUC_COLUMNS)
    order = out["test_set"].map(TEST_SET_ORDER).fillna(len(TEST_SET_ORDER))
    return (out.assign(_order=order).sort_values([*BLOCK, "_order", "p"], kind="stable")
            .drop(columns="_order").reset_index(drop=True))


# --- rendering ----------------------------------------------------------------------------------

_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                  "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                  "^": r"\textasciicircum{}"}


def latex_escape(text: Any) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(text))


def _number(value: Any, digits: int = 3) -> str:
    return "" if value is None or pd.isna(value) else f"{float(value):.{digits}f}"


def _block_title(key: tuple, several: dict[str, bool]) -> str:
    dataset, confounder, strength, arch, seed = key
    words = [str(dataset), str(confounder)]
    if several["strength"]:
        words[-1] += f" (strength {strength:g})"
    if several["arch"]:
        words.append(str(arch))
    if several["seed"]:
        words.append(f"seed {seed}")
    return ", ".join(words)


def _blocks(table: pd.DataFrame):
    several = {c: table[c].nunique(dropna=False) > 1 for c in ("strength", "arch", "seed")}
    for key, block in table.groupby(BLOCK, sort=False, dropna=False):
        yield key, _block_title(key, several), block


def _label(prefix: str, key: Iterable) -> str:
    """A LaTeX label naming the block: ``tab:auc:phantom_cxr:tag:1:tf_efficientnet_lite0:812``."""
    return f"{prefix}:" + ":".join(re.sub(r"[^A-Za-z0-9_.-]", "-", f"{k:g}" if isinstance(k, float)
                                          else str(k)) for k in key)


def _auc_cells(row, with_interval: bool) -> list[str]:
    mean = _number(row["mean"])
    cells = [mean if pd.isna(row["sd"]) else f"{mean} ± {_number(row['sd'])}"]
    if with_interval:
        cells.append("" if pd.isna(row["ci_low"])
                     else f"[{_number(row['ci_low'])}, {_number(row['ci_high'])}]")
    return cells


def _rows_by_condition(block: pd.DataFrame):
    for (test_set, p), part in block.groupby(["test_set", "p"], sort=False):
        n_images, n_patients = part["n_images"].iloc[0], part["n_patients"].iloc[0]
        n = f"{n_images} ({n_patients})" if n_patients else str(n_images)
        yield test_set, p, n, {row["source"]: row for _, row in part.iterrows()}


def auc_markdown(table: pd.DataFrame, what: str, with_interval: bool = True) -> str:
    """One Markdown table per block: a row per test set and p, a column per source."""
    out = [(f"Mean ± SD over folds{AUC_NOTE if with_interval else ''}; n: test images "
           "(patients)."), ""]
    for _key, title, block in _blocks(table):
        sources = list(dict.fromkeys(block["source"]))
        head = ["test set", "p", "n (patients)"] + [
            c for s in sources for c in ([f"{s}", "95 % CI"] if with_interval else [s])]
        out += [f"### {what}: {title}", "", "| " + " | ".join(head) + " |",
                "|" + "---|" * len(head)]
        for test_set, p, n, by_source in _rows_by_condition(block):
            cells = [TEST_SET_NAMES.get(test_set, test_set), f"{p:g}", n]
            for source in sources:
                cells += (_auc_cells(by_source[source], with_interval) if source in by_source
                          else [""] * (2 if with_interval else 1))
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def auc_latex(table: pd.DataFrame, what: str, caption: str, prefix: str,
              with_interval: bool = True) -> str:
    """One booktabs table* per block, labelled ``prefix:<block>``; ``caption`` is LaTeX."""
    out = []
    for key, title, block in _blocks(table):
        sources = list(dict.fromkeys(block["source"]))
        per_source = 2 if with_interval else 1
        spec = "llr" + "".join("rc" if with_interval else "r" for _ in sources)
        head = [rf"\multicolumn{{{per_source}}}{{c}}{{{latex_escape(s)}}}" for s in sources]
        rules = "".join(rf"\cmidrule(lr){{{4 + i * per_source}-{3 + (i + 1) * per_source}}}"
                        for i in range(len(sources)))
        lines = [r"\begin{table*}", r"\centering", r"\footnotesize",
                 rf"\caption{{{latex_escape(what)}: {latex_escape(title)}. {caption}}}",
                 rf"\label{{{_label(prefix, key)}}}",
                 rf"\begin{{tabular}}{{{spec}}}", r"\toprule",
                 " & ".join(["", "", ""] + head) + r" \\", rules,
                 " & ".join(["Test set", "$p$", "$n$ (patients)"]
                            + (["mean $\\pm$ SD", "95\\,\\% CI"] if with_interval
                               else ["mean $\\pm$ SD"]) * len(sources)) + r" \\",
                 r"\midrule"]
        previous = None
        for test_set, p, n, by_source in _rows_by_condition(block):
            if previous is not None and test_set != previous:
                lines.append(r"\addlinespace")
            name = TEST_SET_NAMES.get(test_set, test_set) if test_set != previous else ""
            previous = test_set
            cells = [latex_escape(name), f"{p:g}", latex_escape(n)]
            for source in sources:
                values = (_auc_cells(by_source[source], with_interval) if source in by_source
                          else [""] * per_source)
                cells += [v.replace("±", r"$\pm$") for v in values]
            lines.append(" & ".join(cells) + r" \\")
        lines += [r"\bottomrule", r"\end{tabular}", r"\end{table*}", ""]
        out.append("\n".join(lines))
    return "\n".join(out)


def _cell(column: str, value: Any, digits: int, text) -> str:
    """One table cell: p as given, other floats to ``digits``, missing values empty, the rest
    through ``text`` (escaping for LaTeX, ``str`` for Markdown)."""
    if column == "p":
        return f"{value:g}"
    if isinstance(value, float | np.floating):
        return _number(value, digits)
    return "" if value is None or (not isinstance(value, str) and pd.isna(value)) else text(value)


def frame_latex(frame: pd.DataFrame, caption: str, label: str, digits: int = 3) -> str:
    """Any small table as a booktabs table*, shrunk to the text width when wide."""
    columns = list(frame.columns)
    spec = "".join("r" if pd.api.types.is_numeric_dtype(frame[c]) else "l" for c in columns)
    body = [" & ".join(latex_escape(c) for c in columns) + r" \\", r"\midrule"]
    for row in frame.itertuples(index=False):
        body.append(" & ".join(_cell(c, v, digits, latex_escape) for c, v in zip(columns, row))
                    + r" \\")
    tabular = "\n".join([rf"\begin{{tabular}}{{{spec}}}", r"\toprule", *body, r"\bottomrule",
                         r"\end{tabular}"])
    if len(columns) > 7:
        tabular = r"\resizebox{\textwidth}{!}{%" + "\n" + tabular + "}"
    return "\n".join([r"\begin{table*}", r"\centering", r"\footnotesize",
                      rf"\caption{{{latex_escape(caption)}}}", rf"\label{{{label}}}", tabular,
                      r"\end{table*}", ""])


def frame_markdown(frame: pd.DataFrame, digits: int = 3) -> str:
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(_cell(c, v, digits, str) for c, v in zip(frame.columns, row))
              + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines) + "\n"


DOCUMENT = r"""\documentclass[10pt]{article}
%% Every table of the report (sm report), to compile and look at: pdflatex tables.tex.
%% In a manuscript: \usepackage{booktabs,graphicx} and \input{auc.tex} etc.
\usepackage[T1]{fontenc}
\usepackage[utf8]{inputenc}
\usepackage[margin=2cm]{geometry}
\usepackage{booktabs}
\usepackage{graphicx}
\begin{document}
%s
\end{document}
"""


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


def write_report(runs_dir: str | os.PathLike, out: str | os.PathLike, name: str | None = None,
                 description: str | None = None, reference_datasets: dict | None = None,
                 claim_roles: dict | None = None, n_permutations: int = 9999,
                 seed: int = 0) -> list[Path]:
    """Tables, figures and methods.md of the grid in ``runs_dir`` into ``out``; the paths."""
    from .reference import load_reference, reference_lines

    runs_dir, out = Path(runs_dir), Path(out)
    table = collect_results(runs_dir)
    if table.empty:
        raise AnalysisError(f"no complete run directories (with {METRICS_FILE}) under "
                            f"{runs_dir}: run the grid first")
    name = name or runs_dir.name
    tables, figures = out / "tables", out / "figures"
    paths: list[Path] = []
    latex_inputs = []

    def both(stem: str, frame: pd.DataFrame, markdown: str, latex: str) -> None:
        paths.extend([atomic_write_csv(tables / f"{stem}.csv", frame),
                      atomic_write_text(tables / f"{stem}.md", markdown),
                      atomic_write_text(tables / f"{stem}.tex", latex)])
        latex_inputs.append(stem)

    aucs = auc_table(table, runs_dir)
    both("auc", aucs,
         auc_markdown(aucs, "Binary ROC AUC"),
         auc_latex(aucs, "Binary ROC AUC", "Mean $\\pm$ SD over folds and 95\\,\\% patient-level "
                   "bootstrap interval of the mean; $n$: test images (patients).", "tab:auc"))
    if PAPER_METRIC in table.columns and table[PAPER_METRIC].notna().any():
        keras = auc_table(table, metric=PAPER_METRIC)
        both("keras_auc", keras,
             auc_markdown(keras, "Keras AUC (the paper's metric)", with_interval=False),
             auc_latex(keras, "Keras AUC (the paper's metric)", "Mean $\\pm$ SD over folds.",
                       "tab:keras-auc", with_interval=False))

    claims = claims_against_paper(check_claims(table, claim_roles), datasets=reference_datasets)
    shown = claims[[c for c in ("claim", "dataset", "arch", "confounder", "sources", "effect",
                                "ci_low", "ci_high", "p_value", "min_p", "n_folds", "verdict",
                                "paper_verdict", "paper_effect") if c in claims.columns]]
    statements = "".join(f"- **{c.id}**: {c.statement}\n" for c in CLAIMS)
    both("claims", claims, "## The paper's claims\n\n" + statements + "\n" + format_claims(claims, "md"),
         frame_latex(shown, "The paper's claims checked on this grid (one-sided fold-paired "
                     f"sign-flip tests, alpha {ALPHA}) beside the same checks on the paper's "
                     "reported means (direction and size only).", "tab:claims"))

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
                         "set, permutation t-test over folds as the paper ran it (p_value), "
                         "fold-paired sign-flip test (p_paired), Holm over p (p_paired_holm) "
                         "and the smallest p the folds allow.", "tab:statistics"))
    comparisons = compare_sources(table, n_permutations=n_permutations, seed=seed)
    comparisons = comparisons[comparisons["test_set"] == "ood"]
    if not comparisons.empty:
        shown = comparisons[COMPARISONS_SHOWN]
        both("comparisons", comparisons, frame_markdown(shown),
             frame_latex(shown, "Every pair of sources on the o.o.d. test set (binary AUC): "
                         "permutation t-test, fold-paired sign-flip test, Holm over p.",
                         "tab:comparisons"))
    document = "\n\\clearpage\n".join(f"\\input{{{stem}.tex}}" for stem in latex_inputs)
    paths.append(atomic_write_text(tables / "tables.tex", DOCUMENT % document))

    reference = None
    if reference_datasets:
        reference = reference_lines(load_reference(), reference_datasets)
    figure_paths, captions = write_figures(table, figures, reference)
    paths += figure_paths
    paths.append(atomic_write_text(figures / "captions.md", captions))

    configs = read_configs(runs_dir, table["run_id"])
    paths.append(atomic_write_text(out / "methods.md", methods_markdown(
        table, configs, name, description, n_permutations, n_boot=N_BOOT)))
    return paths
