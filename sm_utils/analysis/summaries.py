"""Means over folds with t intervals, per-source robustness and per-group AUC summaries."""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from .results import CONDITION


def _t_interval(values: np.ndarray, confidence: float) -> tuple[float, float]:
    values = values[~np.isnan(values)]
    if len(values) < 2:
        return (np.nan, np.nan)
    sem = stats.sem(values)
    if sem == 0:
        return (float(values.mean()), float(values.mean()))
    low, high = stats.t.interval(confidence, df=len(values) - 1, loc=values.mean(), scale=sem)
    return float(low), float(high)


def _describe(values: np.ndarray, confidence: float) -> tuple[float, float, float, float, int]:
    """Mean, SD, t interval and count of the non-missing values."""
    values = values[~np.isnan(values)]
    n = len(values)
    mean = float(values.mean()) if n else np.nan
    sd = float(values.std(ddof=1)) if n > 1 else np.nan
    low, high = _t_interval(values, confidence)
    return mean, sd, low, high, n


# metric -> its summary columns: mean, SD, t interval, number of folds
SUMMARY_COLUMNS = {
    "auc": ("mean_auc", "sd_auc", "ci_low", "ci_high", "n_folds"),
    "micro_auc": ("mean_micro_auc", "sd_micro_auc", "micro_ci_low", "micro_ci_high", "n_folds_micro"),
    "keras_auc": ("mean_keras_auc", "sd_keras_auc", "keras_ci_low", "keras_ci_high", "n_folds_keras"),
}


def summarise(table: pd.DataFrame, confidence: float = 0.95) -> pd.DataFrame:
    """Mean over folds per (condition, source) of each metric, with t confidence intervals.

    Binary ROC AUC (``auc``, our primary metric): ``mean_auc``, ``sd_auc``, ``ci_low``,
    ``ci_high``, ``n_folds``. The paper's metric as its Keras code computed it (``keras_auc``):
    ``mean_keras_auc``, ``sd_keras_auc``, ``keras_ci_low``, ``keras_ci_high``,
    ``n_folds_keras``; the same average computed exactly (``micro_auc``): ``mean_micro_auc``,
    ... ``n_folds_micro`` (NaN and 0 where the table has no such column).
    """
    keys_columns = [*CONDITION, "source"]
    columns = [*keys_columns, *(c for names in SUMMARY_COLUMNS.values() for c in names)]
    rows = []
    for keys, group in table.groupby(keys_columns, sort=False, dropna=False):
        row = dict(zip(keys_columns, keys))
        for metric, (mean, sd, low, high, n) in SUMMARY_COLUMNS.items():
            values = (group[metric].to_numpy(dtype=float) if metric in group.columns
                      else np.full(len(group), np.nan))
            row.update(zip((mean, sd, low, high, n), _describe(values, confidence)))
        rows.append(row)
    return pd.DataFrame(rows, columns=columns)


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
