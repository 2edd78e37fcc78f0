"""From run directories to the paper's figure and statistics.

- :func:`collect_results`: every complete run directory of a grid -> one tidy table, one row per
  (run, test set), with the grid axes (dataset, confounder, strength, p, fold, source, arch, seed).
- :func:`plot_auc_vs_p`: the paper's figure: a column per confounder, o.o.d. AUC on the top row
  and i.i.d. AUC on the bottom row against p, a line per source with a confidence band over
  folds, and the paper's reported means as dashed lines when given.
- :func:`compare_sources`: per (confounder, p, test set), a two-sided permutation t-test between
  every pair of sources (the paper's statistic, scipy), Holm correction across a family of tests
  (statsmodels) and a bootstrap confidence interval of the mean difference (scipy).
- :func:`robustness_summary`: per source, clean AUC, i.i.d. minus o.o.d. gap and the first p at
  which the o.o.d. AUC falls below 0.5.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Sequence
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from .io import atomic_path, atomic_write_csv

METRICS_FILE = "metrics.json"
CELLS_FILE = "cells.csv"
AXES = ["dataset", "confounder", "strength", "arch", "seed", "p", "source", "fold"]
# A condition: everything but the source and the fold (folds are the replicates).
CONDITION = ["dataset", "confounder", "strength", "arch", "seed", "test_set", "p"]
METRIC_COLUMNS = ["auc", "auc_ci_low", "auc_ci_high", "micro_auc", "n", "n_pos", "n_confounded"]
RUN_COLUMNS = ["best_epoch", "epochs_run", "train_seconds", "eval_seconds"]
TEST_SET_ORDER = {"ood": 0, "iid": 1, "clean": 2}
REFERENCE_CSV = Path(__file__).resolve().parents[1] / "data" / "reference" / "source_matters_2024_reported_auc.csv"
# Our registry names -> the names in the paper's reported table.
REFERENCE_SOURCES = {"imagenet": "ImageNet", "imagenet_keras": "ImageNet", "radimagenet": "RadImageNet",
                     "radimagenet_torch": "RadImageNet", "random": "random"}
REFERENCE_CONFOUNDERS = {"tag": "tag", "lowpass": "denoising", "denoising": "denoising",
                         "xray_noise": "xray_noise", "sex": "sex", "ct_noise": "ct_noise",
                         "xray_noise_ct": "xray_noise_in_ct"}


class AnalysisError(ValueError):
    """Results that cannot be analysed as asked."""


# --------------------------------------------------------------------------- results table


def _dataset_names(runs_dir: Path) -> dict[str, str]:
    index = runs_dir / CELLS_FILE
    if not index.exists():
        return {}
    table = pd.read_csv(index, dtype={"run_id": str})
    return dict(zip(table["run_id"], table["dataset"]))


def _read_metrics(run_dirs: Iterable[Path]) -> list[dict[str, Any]]:
    out = []
    for run_dir in run_dirs:
        with open(run_dir / METRICS_FILE) as fh:
            out.append(json.load(fh))
    return out


def collect_results(runs_dir: str | os.PathLike, with_groups: bool = False):
    """One row per (run, test set) for every complete run directory under ``runs_dir``.

    When the grid's ``cells.csv`` is there, only its cells count (a run left in the folder by
    other means, e.g. notebook 03 run by hand, is not part of the grid) and it names each run's
    dataset; without it, the dataset is the folder holding the run's manifest. With
    ``with_groups`` also returns the per-group AUC table (one row per run, test set and group).
    """
    runs_dir = Path(runs_dir)
    run_dirs = sorted(p.parent for p in runs_dir.glob(f"*/{METRICS_FILE}"))
    datasets = _dataset_names(runs_dir)
    if datasets:
        run_dirs = [d for d in run_dirs if d.name in datasets]
    rows, group_rows = [], []
    for metrics in _read_metrics(run_dirs):
        config = metrics["config"]
        run_id = metrics["run_id"]
        base = {
            "run_id": run_id,
            "dataset": datasets.get(run_id, Path(config["manifest"]).parent.name),
            "confounder": config["confounder"],
            "strength": float(config["strength"]),
            "arch": config.get("arch") or "default",
            "seed": int(config["seed"]),
            "p": float(config["p"]),
            "source": config["source"],
            "fold": int(config["fold"]),
        }
        for test_set, values in metrics["test_sets"].items():
            row = {**base, "test_set": test_set}
            row.update({k: values.get(k, np.nan) for k in METRIC_COLUMNS})
            row.update({k: metrics.get(k, np.nan) for k in RUN_COLUMNS})
            rows.append(row)
            for group, auc in (values.get("group_auc") or {}).items():
                group_rows.append({**base, "test_set": test_set, "group": group, "auc": auc})
    columns = ["run_id", *AXES, "test_set", *METRIC_COLUMNS, *RUN_COLUMNS]
    table = _sorted(pd.DataFrame(rows, columns=columns))
    if not with_groups:
        return table
    groups = _sorted(pd.DataFrame(group_rows, columns=["run_id", *AXES, "test_set", "group", "auc"]))
    return table, groups


def _sorted(table: pd.DataFrame) -> pd.DataFrame:
    if table.empty:
        return table.reset_index(drop=True)
    order = table["test_set"].map(TEST_SET_ORDER).fillna(len(TEST_SET_ORDER))
    keys = ["dataset", "confounder", "strength", "arch", "seed", "p", "source", "fold"]
    extra = ["group"] if "group" in table.columns else []
    return (table.assign(_order=order)
            .sort_values([*keys, "_order", "test_set", *extra], kind="mergesort")
            .drop(columns="_order").reset_index(drop=True))


def save_results(table: pd.DataFrame, path: str | os.PathLike) -> list[Path]:
    """Write ``path`` (.csv) and, when pyarrow is importable, the same table as .parquet."""
    path = Path(path)
    written = [atomic_write_csv(path.with_suffix(".csv"), table)]
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        return written
    with atomic_path(path.with_suffix(".parquet")) as tmp:
        table.to_parquet(tmp, index=False)
    written.append(path.with_suffix(".parquet"))
    return written


# --------------------------------------------------------------------------- summaries


def _t_interval(values: np.ndarray, confidence: float) -> tuple[float, float]:
    values = values[~np.isnan(values)]
    if len(values) < 2:
        return (np.nan, np.nan)
    sem = stats.sem(values)
    if sem == 0:
        return (float(values.mean()), float(values.mean()))
    low, high = stats.t.interval(confidence, df=len(values) - 1, loc=values.mean(), scale=sem)
    return float(low), float(high)


def summarise(table: pd.DataFrame, confidence: float = 0.95) -> pd.DataFrame:
    """Mean AUC over folds per (condition, source), with a t confidence interval over folds."""
    rows = []
    for keys, group in table.groupby([*CONDITION, "source"], sort=False, dropna=False):
        values = group["auc"].to_numpy(dtype=float)
        low, high = _t_interval(values, confidence)
        rows.append({**dict(zip([*CONDITION, "source"], keys)), "mean_auc": float(np.nanmean(values)),
                     "sd_auc": float(np.nanstd(values, ddof=1)) if len(values) > 1 else np.nan,
                     "ci_low": low, "ci_high": high, "n_folds": int(np.sum(~np.isnan(values)))})
    return pd.DataFrame(rows)


def robustness_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per (dataset, confounder, strength, arch, seed, source): how the source resists the shortcut.

    clean_auc: mean clean-test AUC at the lowest p (p = 0 in the paper's grids);
    gap_at_max_p: i.i.d. minus o.o.d. mean AUC at the largest p;
    first_p_ood_below_half: the smallest p whose mean o.o.d. AUC is below 0.5 (NaN if none).
    """
    means = summarise(table)
    keys = ["dataset", "confounder", "strength", "arch", "seed", "source"]
    rows = []
    for key, group in means.groupby(keys, sort=False):
        by_set = {name: g.set_index("p")["mean_auc"].sort_index() for name, g in group.groupby("test_set")}
        clean = by_set.get("clean", pd.Series(dtype=float))
        ood = by_set.get("ood", pd.Series(dtype=float))
        iid = by_set.get("iid", pd.Series(dtype=float))
        p_max = max(ood.index.max() if len(ood) else -1, iid.index.max() if len(iid) else -1)
        below = ood[ood < 0.5]
        rows.append({
            **dict(zip(keys, key)),
            "clean_auc": float(clean.iloc[0]) if len(clean) else np.nan,
            "ood_auc_at_max_p": float(ood.get(p_max, np.nan)),
            "gap_at_max_p": float(iid.get(p_max, np.nan) - ood.get(p_max, np.nan)),
            "mean_gap": float((iid - ood).mean()) if len(iid) and len(ood) else np.nan,
            "first_p_ood_below_half": float(below.index.min()) if len(below) else np.nan,
        })
    return pd.DataFrame(rows)


def group_auc_summary(groups: pd.DataFrame) -> pd.DataFrame:
    """Mean per-group AUC over folds per (condition, source, group)."""
    if groups.empty:
        return pd.DataFrame(columns=[*CONDITION, "source", "group", "mean_auc", "n_folds"])
    return (groups.groupby([*CONDITION, "source", "group"], sort=False, dropna=False)["auc"]
            .agg(mean_auc="mean", n_folds="count").reset_index())


# --------------------------------------------------------------------------- statistics


def _mean_difference(x, y, axis=-1):
    return np.mean(x, axis=axis) - np.mean(y, axis=axis)


def _permutation_t_test(x: np.ndarray, y: np.ndarray, n_permutations: int,
                        seed: int) -> tuple[float, float]:
    """Two-sided Student t statistic and its permutation p-value.

    When neither sample varies (e.g. o.o.d. AUC 0 in every fold of two sources) t is 0/0 or
    +-inf and scipy's t-test returns p = 0. Given the pooled values, |t| rises with |mean
    difference|, so the permutation test of the mean difference has the same p-value and stays
    defined there: 1 for identical samples, 2 / C(n_a + n_b, n_a) for two different constants.
    """
    method = stats.PermutationMethod(n_resamples=n_permutations, rng=seed)
    if np.ptp(x) > 0 or np.ptp(y) > 0:
        with warnings.catch_warnings():
            # one constant sample (e.g. i.i.d. AUC 1 in every fold) has a variance of exactly 0,
            # which scipy flags as possible precision loss; the pooled variance is still exact
            warnings.filterwarnings("ignore", "Precision loss occurred", RuntimeWarning)
            result = stats.ttest_ind(x, y, method=method)
        return float(result.statistic), float(result.pvalue)
    difference = float(x[0] - y[0])
    statistic = np.nan if difference == 0 else float(np.copysign(np.inf, difference))
    result = stats.permutation_test((x, y), _mean_difference, permutation_type="independent",
                                    vectorized=True, n_resamples=n_permutations, rng=seed)
    return statistic, float(result.pvalue)


def compare_sources(
    table: pd.DataFrame,
    test_sets: Sequence[str] = ("ood", "iid", "clean"),
    n_permutations: int = 9999,
    n_bootstrap: int = 9999,
    confidence: float = 0.95,
    alpha: float = 0.05,
    family: Sequence[str] = ("dataset", "test_set"),
    seed: int = 0,
) -> pd.DataFrame:
    """Every pair of sources per (condition): permutation t-test, Holm, bootstrap CI.

    The test is scipy's two-sided Student t-test with a permutation null
    (``ttest_ind(a, b, method=PermutationMethod(n_resamples, rng=seed))``; exact when the number
    of distinct permutations is at most ``n_permutations``), folds as replicates, as in the paper
    (when neither sample varies, the equivalent test of the mean difference: see
    ``_permutation_t_test``).
    p-values are Holm-corrected (statsmodels ``multipletests``) within each group of rows that
    share the ``family`` columns (default: all confounders and p of one dataset and test set).
    The mean difference (a minus b) gets a percentile bootstrap interval (scipy ``bootstrap``,
    samples resampled independently).
    """
    from statsmodels.stats.multitest import multipletests

    rows = []
    subset = table[table["test_set"].isin(test_sets)]
    for keys, group in subset.groupby(CONDITION, sort=False, dropna=False):
        sources = list(dict.fromkeys(group["source"]))
        for a, b in combinations(sources, 2):
            x = group.loc[group["source"] == a, "auc"].dropna().to_numpy(dtype=float)
            y = group.loc[group["source"] == b, "auc"].dropna().to_numpy(dtype=float)
            row = {**dict(zip(CONDITION, keys)), "source_a": a, "source_b": b, "n_a": len(x),
                   "n_b": len(y), "mean_a": x.mean() if len(x) else np.nan,
                   "mean_b": y.mean() if len(y) else np.nan}
            row["mean_difference"] = row["mean_a"] - row["mean_b"]
            if len(x) >= 2 and len(y) >= 2:
                row["statistic"], row["p_value"] = _permutation_t_test(x, y, n_permutations, seed)
                boot = stats.bootstrap((x, y), _mean_difference, n_resamples=n_bootstrap,
                                       confidence_level=confidence, method="percentile", rng=seed,
                                       vectorized=True)
                row["diff_ci_low"] = float(boot.confidence_interval.low)
                row["diff_ci_high"] = float(boot.confidence_interval.high)
            else:  # one fold per source: no test is possible
                row.update(statistic=np.nan, p_value=np.nan, diff_ci_low=np.nan, diff_ci_high=np.nan)
            rows.append(row)
    columns = [*CONDITION, "source_a", "source_b", "n_a", "n_b", "mean_a", "mean_b",
               "mean_difference", "diff_ci_low", "diff_ci_high", "statistic", "p_value"]
    out = pd.DataFrame(rows, columns=columns)
    out["p_holm"] = np.nan
    out["reject_holm"] = False
    if out.empty:
        return out
    for _, members in out.groupby(list(family), sort=False, dropna=False):
        valid = members["p_value"].notna()
        if not valid.any():
            continue
        index = members.index[valid]
        reject, corrected, _, _ = multipletests(out.loc[index, "p_value"].to_numpy(), alpha=alpha,
                                                method="holm")
        out.loc[index, "p_holm"] = corrected
        out.loc[index, "reject_holm"] = reject
    return out


# --------------------------------------------------------------------------- reference values


def load_reference(path: str | os.PathLike = REFERENCE_CSV) -> pd.DataFrame:
    """The paper's reported mean AUCs (see data/reference/README.md for their provenance)."""
    return pd.read_csv(path)


def reference_lines(reference: pd.DataFrame, datasets: dict[str, str],
                    sources: dict[str, str] | None = None,
                    confounders: dict[str, str] | None = None) -> pd.DataFrame:
    """The reported means re-labelled with this grid's names (dataset, confounder, source).

    ``datasets`` maps a grid dataset to the paper's (e.g. ``{"nih_cxr14": "nih_cxr14",
    "nih_sex_task": "nih_cxr14"}``); sources and confounders default to the registry mappings.
    """
    sources = {**REFERENCE_SOURCES, **(sources or {})}
    confounders = {**REFERENCE_CONFOUNDERS, **(confounders or {})}
    frames = []
    for ours, theirs in datasets.items():
        ref = reference[reference["dataset"] == theirs]
        for our_conf, their_conf in confounders.items():
            for our_src, their_src in sources.items():
                part = ref[(ref["confounder"] == their_conf) & (ref["source"] == their_src)]
                if part.empty:
                    continue
                frames.append(part.assign(dataset=ours, confounder=our_conf, source=our_src))
    if not frames:
        return pd.DataFrame(columns=reference.columns)
    return pd.concat(frames, ignore_index=True)


# --------------------------------------------------------------------------- figure


def plot_auc_vs_p(table: pd.DataFrame, reference: pd.DataFrame | None = None,
                  rows: Sequence[str] = ("ood", "iid"), confidence: float = 0.95,
                  title: str | None = None):
    """The paper's figure: a column per (dataset, confounder), a row per test set, AUC vs p."""
    import matplotlib.pyplot as plt

    means = summarise(table[table["test_set"].isin(rows)], confidence)
    if means.empty:
        raise AnalysisError(f"no results for test sets {list(rows)}; run the grid first")
    columns = list(dict.fromkeys(zip(means["dataset"], means["confounder"], means["strength"])))
    several_datasets = means["dataset"].nunique() > 1
    several_strengths = means.groupby("confounder")["strength"].nunique().max() > 1
    sources = list(dict.fromkeys(table["source"]))
    colours = {s: plt.get_cmap("tab10")(i % 10) for i, s in enumerate(sources)}
    fig, axes = plt.subplots(len(rows), len(columns), figsize=(3.2 * len(columns), 2.9 * len(rows)),
                             sharex=True, sharey=True, squeeze=False)
    names = {"ood": "o.o.d. AUC", "iid": "i.i.d. AUC", "clean": "clean AUC"}
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
                    ax.plot(line["p"], line["mean_auc"], marker="o", color=colours[source], label=label)
                    # AUC lives in [0, 1]; with few folds the t interval reaches far beyond
                    ax.fill_between(line["p"], line["ci_low"].clip(0, 1), line["ci_high"].clip(0, 1),
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
                ax.set_title(head + (f"\n{dataset}" if several_datasets else ""), fontsize=10)
            if i == len(rows) - 1:
                ax.set_xlabel("prevalence p")
            if j == 0:
                ax.set_ylabel(names.get(test_set, test_set))
    handles, labels = [], []
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), frameon=False,
               bbox_to_anchor=(0.5, -0.01))
    n_folds = int(means["n_folds"].max())
    note = f"mean over {n_folds} fold(s); band: {100 * confidence:g} % t interval over folds"
    fig.suptitle((f"{title}: " if title else "") + note, fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig


def save_figure(fig, base: str | os.PathLike) -> list[Path]:
    """Save ``base``.png (150 dpi) and ``base``.pdf atomically; returns both paths.

    No creation date is written, so the same figure gives the same bytes on every rerun.
    """
    base = Path(base)
    written = []
    for suffix, kwargs in ((".png", {"dpi": 150}), (".pdf", {"metadata": {"CreationDate": None}})):
        target = base.with_suffix(suffix)
        with atomic_path(target) as tmp:
            fig.savefig(tmp, format=suffix[1:], bbox_inches="tight", **kwargs)
        written.append(target)
    return written


# --------------------------------------------------------------------------- everything at once


def load_results(path: str | os.PathLike):
    """A results table saved by :func:`save_results` and its per-group table if beside it."""
    path = Path(path)
    table = pd.read_csv(path, dtype={"run_id": str})
    table["arch"] = table["arch"].fillna("default")
    groups_path = path.with_name(path.stem + "_groups.csv")
    columns = ["run_id", *AXES, "test_set", "group", "auc"]
    groups = pd.read_csv(groups_path, dtype={"run_id": str}) if groups_path.exists() else pd.DataFrame(columns=columns)
    return table, groups


def analyse(table: pd.DataFrame, groups: pd.DataFrame, out_dir: str | os.PathLike,
            figures_dir: str | os.PathLike, name: str,
            reference_datasets: dict[str, str] | None = None,
            reference_csv: str | os.PathLike = REFERENCE_CSV,
            n_permutations: int = 9999, n_bootstrap: int = 9999, seed: int = 0) -> dict[str, Any]:
    """Statistics tables into ``out_dir`` and the figure into ``figures_dir``."""
    import matplotlib.pyplot as plt

    out_dir, figures_dir = Path(out_dir), Path(figures_dir)
    if table.empty:
        raise AnalysisError("the results table is empty; run the grid first")
    comparisons = compare_sources(table, n_permutations=n_permutations, n_bootstrap=n_bootstrap, seed=seed)
    robustness = robustness_summary(table)
    paths = [atomic_write_csv(out_dir / "comparisons.csv", comparisons),
             atomic_write_csv(out_dir / "robustness.csv", robustness)]
    reference = None
    if reference_datasets:
        reference = reference_lines(load_reference(reference_csv), reference_datasets)
    fig = plot_auc_vs_p(table, reference=reference, title=f"grid {name}")
    figures = save_figure(fig, figures_dir / f"{name}_auc_vs_p")
    plt.close(fig)
    return {"table": table, "groups": groups, "group_summary": group_auc_summary(groups),
            "comparisons": comparisons, "robustness": robustness, "reference": reference,
            "tables": paths, "figures": figures}


def analyse_runs(runs_dir: str | os.PathLike, figures_dir: str | os.PathLike, name: str,
                 reference_datasets: dict[str, str] | None = None,
                 reference_csv: str | os.PathLike = REFERENCE_CSV,
                 n_permutations: int = 9999, n_bootstrap: int = 9999, seed: int = 0) -> dict[str, Any]:
    """Collect a grid's run directories, save the results table beside them, and :func:`analyse`."""
    runs_dir = Path(runs_dir)
    table, groups = collect_results(runs_dir, with_groups=True)
    if table.empty:
        raise AnalysisError(f"no complete run directories (with {METRICS_FILE}) under {runs_dir}")
    paths = save_results(table, runs_dir / "results.csv")
    if not groups.empty:
        paths += save_results(groups, runs_dir / "results_groups.csv")
    out = analyse(table, groups, runs_dir, figures_dir, name, reference_datasets, reference_csv,
                  n_permutations, n_bootstrap, seed)
    out["tables"] = paths + out["tables"]
    return out
