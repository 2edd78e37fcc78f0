"""The paper's figure: AUC against p per confounder and source, with bands over folds."""

from __future__ import annotations

import os
import textwrap
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from ..io import atomic_path
from .results import LINEAR_PROBE_SUFFIX, METRICS, PAPER_METRIC, PAPER_METRICS, AnalysisError
from .summaries import SUMMARY_COLUMNS, summarise


def plot_auc_vs_p(table: pd.DataFrame, reference: pd.DataFrame | None = None,
                  rows: Sequence[str] = ("ood", "iid"), confidence: float = 0.95,
                  title: str | None = None, metric: str = "auc", width: float | None = None,
                  note: bool = True):
    """The paper's figure: a column per (dataset, confounder), a row per test set, AUC vs p.

    ``metric``: ``"auc"`` (binary ROC AUC, our primary metric), ``"keras_auc"`` (the paper's
    metric: Keras' AUC, micro-averaged over both softmax columns at 200 thresholds) or
    ``"micro_auc"`` (the same average, exact); the axis labels and the title name it.
    ``reference`` (the paper's reported means, see :func:`reference_lines`) is drawn as dashed
    lines, and only over the paper's metric (``keras_auc``, or ``micro_auc``): the reported
    means are micro-averages, which differ from the binary AUC (binary 1.0 can be micro 0.86),
    so a non-empty ``reference`` with ``metric="auc"`` raises :class:`AnalysisError` rather
    than drawing a misleading line.
    ``width``: the figure's width in inches (a journal column: ``sm report`` draws 3.5 and 7.16)
    with text sized by matplotlib's rcParams, else 3.2 inches per column and 10 pt titles;
    ``note=False`` leaves the description of the figure (:func:`figure_caption`) out of the title,
    for a caption.
    """
    import matplotlib.pyplot as plt

    if metric not in METRICS:
        raise AnalysisError(f"metric must be one of {sorted(METRICS)}, not {metric!r}")
    if reference is not None and not reference.empty and metric not in PAPER_METRICS:
        raise AnalysisError("the paper's reported means are micro-averaged AUCs: draw them with "
                            f"metric='{PAPER_METRIC}', not over the binary AUC")
    mean_column, low_column, high_column, words = METRICS[metric]
    means = summarise(table[table["test_set"].isin(rows)], confidence)
    if means.empty:
        raise AnalysisError(f"no results for test sets {list(rows)}; run the grid first")
    if means[mean_column].isna().all():
        raise AnalysisError(f"no {metric} values in these results")
    columns = list(dict.fromkeys(zip(means["dataset"], means["confounder"], means["strength"])))
    several_datasets = means["dataset"].nunique() > 1
    several_strengths = means.groupby("confounder")["strength"].nunique().max() > 1
    sources = list(dict.fromkeys(table["source"]))
    # a linear probe's arm: its source's colour, dash-dotted, hollow markers
    bases = {s: s.removesuffix(LINEAR_PROBE_SUFFIX) for s in sources}
    order = list(dict.fromkeys(bases.values()))
    colours = {s: plt.get_cmap("tab10")(order.index(bases[s]) % 10) for s in sources}
    styles = {s: {} if bases[s] == s else {"linestyle": "-.", "markerfacecolor": "white"}
              for s in sources}
    if width is None:
        figsize, title_size = (3.2 * len(columns), 2.9 * len(rows)), 10
    else:  # panels about as tall as wide (at most 1.8 in), and room for the legend below
        panel = min(0.9 * width / len(columns), 1.8)
        figsize, title_size = (width, panel * len(rows) + 0.35), None
    fig, axes = plt.subplots(len(rows), len(columns), figsize=figsize,
                             sharex=True, sharey=True, squeeze=False)
    names = {"ood": "o.o.d.", "iid": "i.i.d.", "clean": "clean"}
    for j, (dataset, confounder, strength) in enumerate(columns):
        for i, test_set in enumerate(rows):
            ax = axes[i, j]
            here = means[(means["dataset"] == dataset) & (means["confounder"] == confounder)
                         & (means["strength"] == strength) & (means["test_set"] == test_set)]
            for source in sources:
                # Several architectures or seeds of one source each get their own line.
                for (arch, seed), line in here[here["source"] == source].groupby(["arch", "seed"]):
                    line = line.sort_values("p")
                    label = source if here["arch"].nunique() == 1 else f"{source}/{arch}"
                    ax.plot(line["p"], line[mean_column], marker="o", color=colours[source],
                            label=label, **styles[source])
                    # AUC lives in [0, 1]; with few folds the t interval reaches far beyond
                    ax.fill_between(line["p"], line[low_column].clip(0, 1), line[high_column].clip(0, 1),
                                    color=colours[source], alpha=0.15, linewidth=0)
                if reference is not None and not reference.empty:
                    ref = reference[(reference["dataset"] == dataset) & (reference["confounder"] == confounder)
                                    & (reference["test_set"] == test_set) & (reference["source"] == source)]
                    if not ref.empty:
                        ref = ref.sort_values("p")
                        ax.plot(ref["p"], ref["mean_auc"], linestyle="--", color=colours[source],
                                alpha=0.8, label=f"{source} (paper)")
            ax.axhline(0.5, color="grey", linewidth=0.8, linestyle=":")
            ax.set_ylim(-0.02, 1.02)
            if i == 0:
                head = confounder + (f" (strength {strength:g})" if several_strengths else "")
                ax.set_title(head + (f"\n{dataset}" if several_datasets else ""), fontsize=title_size)
            if i == len(rows) - 1:
                ax.set_xlabel("prevalence p")
            if j == 0:  # at a journal width the metric is named in the caption
                ax.set_ylabel(f"{names.get(test_set, test_set)} "
                              + (words if width is None else "AUC"))
    handles, labels = [], []
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    wide = width is None or width > 5
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6 if wide else 3),
               frameon=False,
               bbox_to_anchor=(0.5, -0.01))
    if note:
        dashed = any(line.get_linestyle() == "--" for ax in axes.flat for line in ax.get_lines())
        text = _describe(means, metric, confidence, dashed)
        # about 38 characters of a 10-point title fit above each 3.2-inch column
        fig.suptitle(textwrap.fill((f"{title}: " if title else "") + text,
                                   width=max(60, 38 * len(columns))), fontsize=10)
    elif title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.06 if width is None else 0.3 / figsize[1], 1, 1))
    return fig


def _describe(means: pd.DataFrame, metric: str, confidence: float, dashed: bool) -> str:
    n_folds = int(means[SUMMARY_COLUMNS[metric][4]].max())
    what = {"auc": "binary ROC AUC",
            "keras_auc": "Keras AUC (the paper's metric: micro-averaged, 200 thresholds)",
            "micro_auc": "micro-averaged AUC (the paper's metric, exact)"}[metric]
    text = f"{what}, mean over {n_folds} fold(s); band: {100 * confidence:g} % t interval over folds"
    return text + ("; dashed: the paper's reported means" if dashed else "")


def figure_caption(table: pd.DataFrame, metric: str = "auc", confidence: float = 0.95,
                   reference: pd.DataFrame | None = None, rows: Sequence[str] = ("ood", "iid")) -> str:
    """What :func:`plot_auc_vs_p` draws, as a caption."""
    means = summarise(table[table["test_set"].isin(rows)], confidence)
    names = {"ood": "o.o.d.", "iid": "i.i.d.", "clean": "clean"}
    text = _describe(means, metric, confidence, reference is not None and not reference.empty)
    return (f"AUC against the prevalence p of the confounder among positive training images; "
            f"rows: {', '.join(names.get(r, r) for r in rows)} test set, a column per "
            f"confounder, a line per source. {text[0].upper()}{text[1:]}{BAND}. Dotted: chance "
            "(0.5).")


# what the band covers, for the caption: the figure's band is not the tables' intervals
BAND = (" (the spread between trainings on the grid's one test set, which the test set's "
        "sampling error is not part of; clipped to [0, 1])")


def save_figure(fig, base: str | os.PathLike, dpi: int = 150, tight: bool = True) -> list[Path]:
    """Save ``base``.png (``dpi``) and ``base``.pdf atomically; returns both paths.
    ``tight=False`` keeps the figure's own size (a journal column's width) instead of cropping.

    No creation date is written, so the same figure gives the same bytes on every rerun.
    """
    base = Path(base)
    written = []
    for suffix, kwargs in ((".png", {"dpi": dpi}), (".pdf", {"metadata": {"CreationDate": None}})):
        target = base.with_suffix(suffix)
        with atomic_path(target) as tmp:
            fig.savefig(tmp, format=suffix[1:], bbox_inches="tight" if tight else None, **kwargs)
        written.append(target)
    return written
