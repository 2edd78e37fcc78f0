"""From run directories to the paper's figure and statistics.

- :func:`collect_results`: every complete run directory of a grid -> one tidy table, one row per
  (run, test set), with the grid axes (dataset, confounder, strength, p, fold, source, arch, seed)
  and both metrics: ``auc`` (binary ROC AUC, our primary metric) and ``micro_auc`` (the paper's
  Keras AUC, a micro-average over both softmax columns).
- :func:`summarise`: mean and t interval over folds of both metrics.
- :func:`plot_auc_vs_p`: the paper's figure: a column per confounder, o.o.d. AUC on the top row
  and i.i.d. AUC on the bottom row against p, a line per source with a confidence band over
  folds; ``metric="micro_auc"`` with the paper's reported means as dashed lines (they are
  micro-averages, so they are never drawn over the binary AUC).
- :func:`paper_test`: the paper's primary statistic as the paper ran it (ImageNet vs RadImageNet,
  o.o.d. AUC, two-sided permutation t-test per confounder and p, folds as independent samples,
  no correction) and beside it a paired, fold-matched sign-flip test, Holm over the prevalences
  of a confounder, and the smallest p-value each can give; :func:`paper_test_report` says in
  one paragraph what those bounds mean for the folds at hand.
- :func:`compare_sources`: per (confounder, p, test set), the same permutation t-test between
  every pair of sources, the paired test, Holm correction over the prevalences of each pair
  (statsmodels) and a bootstrap confidence interval of the mean difference (scipy).
- :func:`robustness_summary`: per source, clean AUC, i.i.d. minus o.o.d. gap and the first p at
  which the o.o.d. AUC falls below 0.5.
"""

from __future__ import annotations

import gc
import json
import math
import os
import textwrap
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
# Run-level columns of a grid with `probe: true` / `attribution: true` (sm_utils.mechanisms)
MECHANISM_COLUMNS = ["probe_auc", "probe_auc_ci_low", "probe_auc_ci_high", "attribution_share",
                     "attribution_share_ci_low", "attribution_share_ci_high", "mask_share",
                     "attribution_ratio"]
SOURCE_PROBES_FILE = "source_probes.csv"
SOURCE_PROBE_COLUMNS = ["source_probe_auc", "source_probe_auc_ci_low", "source_probe_auc_ci_high"]
TEST_SET_ORDER = {"ood": 0, "iid": 1, "clean": 2}
REFERENCE_CSV = Path(__file__).resolve().parents[1] / "data" / "reference" / "source_matters_2024_reported_auc.csv"
# Our registry names -> the names in the paper's reported table.
REFERENCE_SOURCES = {"imagenet": "ImageNet", "imagenet_keras": "ImageNet", "radimagenet": "RadImageNet",
                     "radimagenet_torch": "RadImageNet", "random": "random"}
REFERENCE_CONFOUNDERS = {"tag": "tag", "lowpass": "denoising", "denoising": "denoising",
                         "xray_noise": "xray_noise", "sex": "sex", "ct_noise": "ct_noise",
                         "xray_noise_ct": "xray_noise_in_ct"}
# The two arms of the paper's test, and the names of this registry that can fill them.
ARM_CANDIDATES = {"ImageNet": ("imagenet_keras", "imagenet", "imagenet_lite0"),
                  "RadImageNet": ("radimagenet", "radimagenet_torch", "radiology_phantom")}
# Offline sources that only stand in for the paper's (the demo has neither network nor weights).
STAND_INS = {"imagenet_lite0": "ImageNet EfficientNet-Lite0, an offline stand-in for the paper's "
                               "ImageNet ResNet50",
             "radiology_phantom": "pretrained on synthetic radiology, an offline stand-in for "
                                  "RadImageNet"}
# Metric column -> (summary mean, interval low, interval high, words for labels).
METRICS = {"auc": ("mean_auc", "ci_low", "ci_high", "binary AUC"),
           "micro_auc": ("mean_micro_auc", "micro_ci_low", "micro_ci_high", "micro-AUC")}


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
        mechanisms = {k: v for k, v in (metrics.get("mechanisms") or {}).items()
                      if k in MECHANISM_COLUMNS}
        for test_set, values in metrics["test_sets"].items():
            row = {**base, "test_set": test_set}
            row.update({k: values.get(k, np.nan) for k in METRIC_COLUMNS})
            row.update({k: metrics.get(k, np.nan) for k in RUN_COLUMNS})
            row.update(mechanisms)  # run-level: the same on each of the run's test sets
            rows.append(row)
            for group, auc in (values.get("group_auc") or {}).items():
                group_rows.append({**base, "test_set": test_set, "group": group, "auc": auc})
    columns = ["run_id", *AXES, "test_set", *METRIC_COLUMNS, *RUN_COLUMNS]
    present = [c for c in MECHANISM_COLUMNS if any(c in r for r in rows)]
    table = _sorted(pd.DataFrame(rows, columns=columns + present))
    probes = runs_dir / SOURCE_PROBES_FILE
    if probes.exists() and not table.empty:  # the grid's probe of each source before fine-tuning
        keys = ["dataset", "source", "arch", "seed", "confounder", "strength"]
        source = pd.read_csv(probes).drop_duplicates(keys, keep="last")
        source["arch"] = source["arch"].fillna("default")
        table = table.merge(source[[*keys, *SOURCE_PROBE_COLUMNS]], on=keys, how="left")
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


def _describe(values: np.ndarray, confidence: float) -> tuple[float, float, float, float, int]:
    """Mean, SD, t interval and count of the non-missing values."""
    values = values[~np.isnan(values)]
    n = len(values)
    mean = float(values.mean()) if n else np.nan
    sd = float(values.std(ddof=1)) if n > 1 else np.nan
    low, high = _t_interval(values, confidence)
    return mean, sd, low, high, n


def summarise(table: pd.DataFrame, confidence: float = 0.95) -> pd.DataFrame:
    """Mean over folds per (condition, source) of both metrics, with t confidence intervals.

    Binary ROC AUC (``auc``, our primary metric): ``mean_auc``, ``sd_auc``, ``ci_low``,
    ``ci_high``, ``n_folds``. The paper's micro-averaged AUC (``micro_auc``): ``mean_micro_auc``,
    ``sd_micro_auc``, ``micro_ci_low``, ``micro_ci_high``, ``n_folds_micro`` (NaN and 0 where
    the table has no ``micro_auc``).
    """
    keys_columns = [*CONDITION, "source"]
    columns = [*keys_columns, "mean_auc", "sd_auc", "ci_low", "ci_high", "n_folds", "mean_micro_auc",
               "sd_micro_auc", "micro_ci_low", "micro_ci_high", "n_folds_micro"]
    rows = []
    for keys, group in table.groupby(keys_columns, sort=False, dropna=False):
        row = dict(zip(keys_columns, keys))
        for metric, (mean, sd, low, high, n) in (
                ("auc", ("mean_auc", "sd_auc", "ci_low", "ci_high", "n_folds")),
                ("micro_auc", ("mean_micro_auc", "sd_micro_auc", "micro_ci_low", "micro_ci_high",
                               "n_folds_micro"))):
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


def _mean(x, axis=-1):
    return np.mean(x, axis=axis)


def _paired_permutation_test(differences: np.ndarray, n_permutations: int, seed: int) -> float:
    """Two-sided sign-flip permutation p-value of the mean of fold-matched differences.

    Under the null that the sources are exchangeable within each fold, every difference is as
    likely to have either sign: scipy's one-sample ``permutation_type="samples"`` test (exact
    over the 2^n sign patterns when 2^n <= ``n_permutations``).
    """
    result = stats.permutation_test((differences,), _mean, permutation_type="samples", vectorized=True,
                                    n_resamples=n_permutations, rng=seed)
    return float(result.pvalue)


def _smallest_p(arrangements: int, n_permutations: int) -> float:
    """The smallest two-sided p scipy's permutation tests can give (2 x the one-sided minimum).

    Exact (``arrangements`` <= ``n_permutations``): the observed arrangement alone is as extreme
    on one side, 1 / arrangements; randomised: scipy counts the observed one among the
    resamples, 1 / (n_permutations + 1).
    """
    denominator = arrangements if arrangements <= n_permutations else n_permutations + 1
    return min(1.0, 2 / denominator)


def min_p_independent(n_a: int, n_b: int, n_permutations: int = 9999) -> float:
    """Smallest two-sided p of the permutation t-test of ``n_a`` vs ``n_b`` independent folds.

    2 / C(n_a + n_b, n_a) when exact: 2/252 = 0.0079 for 5 vs 5 folds. NaN below 2 per sample.
    """
    if n_a < 2 or n_b < 2:
        return np.nan
    return _smallest_p(math.comb(n_a + n_b, n_a), n_permutations)


def min_p_paired(n: int, n_permutations: int = 9999) -> float:
    """Smallest two-sided p of the sign-flip test of ``n`` fold-matched differences.

    2 / 2^n when exact: 2/32 = 0.0625 for 5 folds, so 5 folds can never reach 0.05. NaN below 2.
    """
    if n < 2:
        return np.nan
    return _smallest_p(2 ** n, n_permutations)


def _fold_differences(a: pd.DataFrame, b: pd.DataFrame, metric: str) -> np.ndarray:
    """``a - b`` per fold, for the folds where both have a value (matched by the ``fold`` column)."""
    if "fold" not in a.columns:
        return np.array([])
    for part in (a, b):
        folds = part.loc[part[metric].notna(), "fold"]
        if folds.duplicated().any():
            raise AnalysisError(f"fold(s) {sorted(set(folds[folds.duplicated()]))} appear twice for "
                                f"source {part['source'].iloc[0]!r} in one condition; the folds cannot "
                                "be matched (one run per fold, source and condition expected)")
    merged = (a[["fold", metric]].dropna().merge(b[["fold", metric]].dropna(), on="fold",
                                                suffixes=("_a", "_b")).sort_values("fold"))
    return (merged[f"{metric}_a"] - merged[f"{metric}_b"]).to_numpy(dtype=float)


def _holm(out: pd.DataFrame, column: str, family: Sequence[str], alpha: float):
    """Holm-adjusted ``column`` within each group of rows sharing ``family``; family sizes."""
    from statsmodels.stats.multitest import multipletests

    adjusted = pd.Series(np.nan, index=out.index)
    reject = pd.Series(False, index=out.index)
    size = pd.Series(0, index=out.index)
    # statsmodels' Holm runs a full gc.collect() per call: with small families (many calls) in a
    # process holding many objects (a test session, a notebook kernel with figures) that takes
    # seconds. Objects alive now are frozen out of those collections, unless someone else froze.
    freeze = gc.get_freeze_count() == 0
    if freeze:
        gc.freeze()
    try:
        for _, members in out.groupby(list(family), sort=False, dropna=False):
            valid = members[column].notna()
            if not valid.any():
                continue
            index = members.index[valid]
            rejected, corrected, _, _ = multipletests(out.loc[index, column].to_numpy(dtype=float),
                                                      alpha=alpha, method="holm")
            adjusted[index] = corrected
            reject[index] = rejected
            size[index] = len(index)
    finally:
        if freeze:
            gc.unfreeze()
    return adjusted, reject, size


def _family_floor(out: pd.DataFrame, column: str, sizes: pd.Series, family: Sequence[str]) -> pd.Series:
    """The smallest Holm-adjusted value a family can give: its size x its members' smallest p."""
    floor = out.groupby(list(family), sort=False, dropna=False)[column].transform("min")
    return (sizes * floor).where(sizes > 0).clip(upper=1.0)


PAPER_CONDITION = ["dataset", "confounder", "strength", "seed", "test_set", "p"]
PAPER_FAMILY = ("dataset", "confounder", "strength", "seed", "test_set")
PAPER_COLUMNS = [
    *PAPER_CONDITION, "source_imagenet", "source_radimagenet", "arch_imagenet", "arch_radimagenet",
    "metric", "n_imagenet", "n_radimagenet", "mean_imagenet", "mean_radimagenet", "mean_difference",
    "statistic", "p_value", "min_p_value", "reject", "family_size", "p_holm", "min_p_holm",
    "reject_holm", "n_paired", "mean_paired_difference", "p_paired", "min_p_paired", "p_paired_holm",
    "min_p_paired_holm",
]


def paper_arms(table: pd.DataFrame, arms: dict[str, str] | None = None) -> dict[str, str]:
    """The sources that play the paper's ImageNet and RadImageNet arms in ``table``.

    ``arms`` (``{"ImageNet": ..., "RadImageNet": ...}``) is returned as given (checked for its
    keys). Otherwise each arm is the one of its known names (:data:`ARM_CANDIDATES`) present
    among the table's sources; an arm with no known name present is left out, and an arm with
    several raises :class:`AnalysisError` naming them.
    """
    if arms is not None:
        arms = dict(arms)
        if set(arms) != set(ARM_CANDIDATES):
            raise AnalysisError(f"arms= must map exactly {sorted(ARM_CANDIDATES)} to source names, "
                                f"got {sorted(arms)}")
        return arms
    present = set(table["source"].dropna())
    found = {}
    for arm, candidates in ARM_CANDIDATES.items():
        here = [name for name in candidates if name in present]
        if len(here) > 1:
            raise AnalysisError(
                f"several sources could be the paper's {arm} arm: {', '.join(here)}; pass "
                f"arms={{'ImageNet': ..., 'RadImageNet': ...}} to say which to compare")
        if here:
            found[arm] = here[0]
    return found


def paper_test(
    table: pd.DataFrame,
    arms: dict[str, str] | None = None,
    test_set: str | Sequence[str] = "ood",
    metric: str = "auc",
    n_permutations: int = 9999,
    alpha: float = 0.05,
    family: Sequence[str] = PAPER_FAMILY,
    seed: int = 0,
) -> pd.DataFrame:
    """The paper's primary test as the paper ran it, and better-founded values beside it.

    One row per (dataset, confounder, strength, seed, test set, p); the architecture is not a
    grouping key, since the two arms may name theirs differently (``arch_imagenet``,
    ``arch_radimagenet`` record them; an arm with several architectures in one condition raises
    :class:`AnalysisError`: filter the table by ``arch`` first).

    - **The paper's test** (``statistic``, ``p_value``): ImageNet arm vs RadImageNet arm
      (``arms``; see :func:`paper_arms`), ``metric`` (``"auc"``, or ``"micro_auc"`` for the
      paper's own AUC) on ``test_set``, two-sided Student t-test with a permutation null, the
      folds as independent samples (scipy ``ttest_ind(..., method=PermutationMethod(...))``;
      exact when C(n_a + n_b, n_a) <= ``n_permutations``; the paper passed
      ``permutations=10000``), no multiple-comparison correction. ``reject``: ``p_value`` <=
      ``alpha``, as the paper read it. ``min_p_value``: the smallest p this test can give with
      the folds present, 2 / C(n_a + n_b, n_a) (2/252 = 0.0079 for 5 vs 5).
    - **Holm** (``p_holm``, ``reject_holm``, ``family_size``, ``min_p_holm``): ``p_value``
      Holm-adjusted (statsmodels ``multipletests``) within the rows sharing ``family`` (default:
      the prevalences of one dataset, confounder, strength, seed and test set: 6 tests on the
      paper's grid, so the smallest adjusted value is 6 x 2/252 = 0.048). ``min_p_holm`` is the
      family size times its members' smallest attainable p (capped at 1).
    - **The paired test** (``n_paired``, ``mean_paired_difference``, ``p_paired``,
      ``min_p_paired``, and Holm over the same family: ``p_paired_holm``,
      ``min_p_paired_holm``): the folds share the split and the test set, so they are matched
      by the ``fold`` column (only folds present for both arms) and the mean of the per-fold
      differences is tested by sign flips (scipy ``permutation_test``,
      ``permutation_type="samples"``; exact when 2^n <= ``n_permutations``). Its smallest
      two-sided p is 2 / 2^n: 2/32 = 0.0625 for 5 folds, which never reaches 0.05.

    Differences are ImageNet minus RadImageNet. Fewer than 2 folds in an arm (or 2 matched
    folds): NaN p-values. When an arm is absent (or named in ``arms`` but not in the table),
    the result is an empty table whose ``attrs["message"]`` says why; it is never raised, so
    that a grid without one of the arms (e.g. ImageNet vs random only) still gets its analysis.
    """
    test_sets = [test_set] if isinstance(test_set, str) else list(test_set)
    empty = pd.DataFrame(columns=PAPER_COLUMNS)
    if metric not in METRICS:
        raise AnalysisError(f"metric must be one of {sorted(METRICS)}, not {metric!r}")
    if metric not in table.columns:
        empty.attrs["message"] = f"no {metric} column in these results: no paper test"
        return empty
    found = paper_arms(table, arms)
    present = list(dict.fromkeys(table["source"].dropna()))
    missing = [arm for arm in ARM_CANDIDATES if found.get(arm) not in present]
    if missing:
        wanted = "; ".join(f"{arm}: {found[arm]!r}" if arm in found
                           else f"{arm}: one of {', '.join(ARM_CANDIDATES[arm])}" for arm in missing)
        empty.attrs["message"] = (
            f"No paper test: the results have no source for the {' and '.join(missing)} arm "
            f"({wanted}); sources present: {', '.join(present) or 'none'}. Pass arms= to name "
            "the two sources to compare.")
        return empty
    source_a, source_b = found["ImageNet"], found["RadImageNet"]
    subset = table[table["test_set"].isin(test_sets) & table["source"].isin([source_a, source_b])]
    rows = []
    for keys, group in subset.groupby(PAPER_CONDITION, sort=False, dropna=False):
        a = group[group["source"] == source_a]
        b = group[group["source"] == source_b]
        archs = {}
        for name, part, source in (("imagenet", a, source_a), ("radimagenet", b, source_b)):
            names = list(dict.fromkeys(part["arch"])) if "arch" in part.columns else ["default"]
            if len(names) > 1:
                raise AnalysisError(
                    f"source {source!r} has several architectures ({', '.join(map(str, names))}) in "
                    f"condition {dict(zip(PAPER_CONDITION, keys))}; filter the table by arch first")
            archs[name] = names[0] if names else np.nan
        x = a[metric].dropna().to_numpy(dtype=float)
        y = b[metric].dropna().to_numpy(dtype=float)
        row = {**dict(zip(PAPER_CONDITION, keys)), "source_imagenet": source_a,
               "source_radimagenet": source_b, "arch_imagenet": archs["imagenet"],
               "arch_radimagenet": archs["radimagenet"], "metric": metric, "n_imagenet": len(x),
               "n_radimagenet": len(y), "mean_imagenet": x.mean() if len(x) else np.nan,
               "mean_radimagenet": y.mean() if len(y) else np.nan}
        row["mean_difference"] = row["mean_imagenet"] - row["mean_radimagenet"]
        row["statistic"], row["p_value"] = np.nan, np.nan
        if len(x) >= 2 and len(y) >= 2:
            row["statistic"], row["p_value"] = _permutation_t_test(x, y, n_permutations, seed)
        row["min_p_value"] = min_p_independent(len(x), len(y), n_permutations)
        differences = _fold_differences(a, b, metric)
        row["n_paired"] = len(differences)
        row["mean_paired_difference"] = differences.mean() if len(differences) else np.nan
        row["p_paired"] = (_paired_permutation_test(differences, n_permutations, seed)
                           if len(differences) >= 2 else np.nan)
        row["min_p_paired"] = min_p_paired(len(differences), n_permutations)
        rows.append(row)
    out = pd.DataFrame(rows, columns=PAPER_COLUMNS)
    if out.empty:
        out.attrs["message"] = (f"No paper test: no {source_a} or {source_b} results on test set(s) "
                                f"{', '.join(test_sets)}")
        return out
    out["reject"] = out["p_value"] <= alpha
    out["p_holm"], out["reject_holm"], out["family_size"] = _holm(out, "p_value", family, alpha)
    out["min_p_holm"] = _family_floor(out, "min_p_value", out["family_size"], family)
    out["p_paired_holm"], _, paired_size = _holm(out, "p_paired", family, alpha)
    out["min_p_paired_holm"] = _family_floor(out, "min_p_paired", paired_size, family)
    out.attrs.update(alpha=alpha, arms={"ImageNet": source_a, "RadImageNet": source_b},
                     metric=metric, test_sets=test_sets, n_permutations=n_permutations,
                     family=tuple(family))
    return out


def _number(value: float) -> str:
    """Two significant digits unless three or four give the value exactly (0.0625, not 0.062)."""
    for digits in (2, 3, 4):
        text = f"{value:.{digits}g}"
        if float(text) == value:
            return text
    return f"{value:.2g}"


def _bound(arrangements: int, n_permutations: int) -> str:
    """'2/252 = 0.0079' (exact) or '2/10000 = 0.0002' (randomised): a smallest p in words."""
    denominator = arrangements if arrangements <= n_permutations else n_permutations + 1
    if denominator <= 2:
        return "1"
    return f"2/{denominator} = {_number(2 / denominator)}"


def paper_test_report(result: pd.DataFrame, alpha: float | None = None) -> str:
    """One plain-text paragraph on a :func:`paper_test` table: what its tests can and did show.

    Computed from the table: the smallest p each test can give with the folds present (the
    paper's test, Holm over the family, the paired test), which of them can never reach
    ``alpha`` (default: the table's), and how many conditions each rejects.
    """
    if result.empty:
        return result.attrs.get("message", "No paper test: the table is empty.")
    alpha = result.attrs.get("alpha", 0.05) if alpha is None else alpha
    n_permutations = int(result.attrs.get("n_permutations", 9999))
    metric = result.attrs.get("metric", result["metric"].iloc[0])
    source_a, source_b = result["source_imagenet"].iloc[0], result["source_radimagenet"].iloc[0]

    def named(arm: str, source: str) -> str:
        return f"{arm} arm {source}" + (f" ({STAND_INS[source]})" if source in STAND_INS else "")

    spelled = {"ood": "o.o.d.", "iid": "i.i.d."}
    test_sets = ", ".join(spelled.get(name, name) for name in dict.fromkeys(result["test_set"]))
    metric_words = "binary AUC" if metric == "auc" else "micro-averaged AUC (the paper's metric)"
    opening = (f"The paper's test compares the {named('ImageNet', source_a)} with the "
               f"{named('RadImageNet', source_b)} on the {test_sets} {metric_words}: a two-sided "
               "permutation t-test per confounder and p, folds as independent samples, uncorrected.")
    parts = [opening]
    never = []
    tested = result[result["p_value"].notna()]
    if tested.empty:
        parts.append("No condition has 2 folds or more in both arms, so nothing could be tested.")
        return " ".join(parts)
    best = tested.loc[tested["min_p_value"].idxmin()]
    n_a, n_b = int(best["n_imagenet"]), int(best["n_radimagenet"])
    varied = tested[["n_imagenet", "n_radimagenet"]].drop_duplicates().shape[0] > 1
    exact = math.comb(n_a + n_b, n_a) <= n_permutations
    most = " (the most of any condition)" if varied else ""
    parts.append(f"With {n_a} vs {n_b} folds{most} the paper's "
                 f"{'exact ' if exact else ''}permutation test cannot give p below "
                 f"{_bound(math.comb(n_a + n_b, n_a), n_permutations)};")
    if best["min_p_value"] > alpha:
        never.append("the paper's test")
    family = tuple(result.attrs.get("family", PAPER_FAMILY))
    at = tested["min_p_holm"].idxmin()
    holm_floor = float(tested.loc[at, "min_p_holm"])
    size = int(tested.loc[at, "family_size"])
    floors = tested.groupby(list(family), sort=False, dropna=False)["min_p_value"].transform("min")
    base = float(floors[at])
    unit = ("prevalences of a confounder" if set(family) == set(PAPER_FAMILY)
            else f"tests sharing {', '.join(family)}")
    product = f"{size} x {_number(base)}"
    holm_text = (f"1 ({product}, capped at 1)" if holm_floor >= 1
                 else f"{product} = {_number(holm_floor)}")
    parts.append(f"Holm over the {size} {unit} cannot give below {holm_text};")
    if holm_floor > alpha:
        never.append("Holm")
    paired = tested[tested["min_p_paired"].notna()]
    if paired.empty:
        parts.append("no folds could be matched for the paired sign-flip test.")
    else:
        n_matched = int(paired["n_paired"].max())
        parts.append(f"the paired sign-flip test (the folds share split and test set) over "
                     f"{n_matched} matched folds cannot go below "
                     f"{_bound(2 ** n_matched, n_permutations)} (two-sided).")
        if float(paired["min_p_paired"].min()) > alpha:
            never.append("the paired test")
    if never == ["the paired test"]:
        parts[-1] = parts[-1][:-1] + f", so with {n_matched} folds it can never reach {_number(alpha)}."
    elif len(never) == 3:
        parts[-1] = (parts[-1][:-1] + f", so with {n_a} vs {n_b} folds none of the three can ever "
                     f"reach {_number(alpha)}.")
    elif never:
        parts[-1] = (parts[-1][:-1] + f", so with {n_a} vs {n_b} folds {' and '.join(never)} can "
                     f"never reach {_number(alpha)}.")
    n = len(tested)
    k = int((tested["p_value"] <= alpha).sum())
    h = int((tested["p_holm"] <= alpha).sum())
    j = int((tested["p_paired"] <= alpha).sum())
    jh = int((tested["p_paired_holm"] <= alpha).sum())
    parts.append(f"Of the {n} conditions tested (confounder x p), {k} have p <= {_number(alpha)} as the "
                 f"paper tested them, {h} after Holm, {j} by the paired test ({jh} after Holm).")
    return " ".join(parts)


def compare_sources(
    table: pd.DataFrame,
    test_sets: Sequence[str] = ("ood", "iid", "clean"),
    n_permutations: int = 9999,
    n_bootstrap: int = 9999,
    confidence: float = 0.95,
    alpha: float = 0.05,
    family: Sequence[str] = ("dataset", "confounder", "strength", "arch", "seed", "test_set",
                             "source_a", "source_b"),
    seed: int = 0,
) -> pd.DataFrame:
    """Every pair of sources per (condition): permutation t-test, paired test, Holm, bootstrap CI.

    The test is scipy's two-sided Student t-test with a permutation null
    (``ttest_ind(a, b, method=PermutationMethod(n_resamples, rng=seed))``; exact when the number
    of distinct permutations is at most ``n_permutations``), folds as replicates, as in the paper
    (when neither sample varies, the equivalent test of the mean difference: see
    ``_permutation_t_test``). ``p_paired``: the sign-flip test of the mean fold-matched
    difference (``n_paired`` folds present for both; see :func:`paper_test`).
    p-values are Holm-corrected (statsmodels ``multipletests``) within each group of rows that
    share the ``family`` columns (default: the prevalences of one pair of sources, confounder,
    strength, architecture, seed and test set; a family across every confounder and p of a
    dataset, 54 tests on the paper's grid, would leave no adjusted p below 54 x 2/252 = 0.43
    with 5 vs 5 folds, whatever the data).
    The mean difference (a minus b) gets a percentile bootstrap interval (scipy ``bootstrap``,
    samples resampled independently).
    """
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
            differences = _fold_differences(group[group["source"] == a], group[group["source"] == b],
                                            "auc")
            row["n_paired"] = len(differences)
            row["p_paired"] = (_paired_permutation_test(differences, n_permutations, seed)
                               if len(differences) >= 2 else np.nan)
            rows.append(row)
    columns = [*CONDITION, "source_a", "source_b", "n_a", "n_b", "mean_a", "mean_b",
               "mean_difference", "diff_ci_low", "diff_ci_high", "statistic", "p_value",
               "n_paired", "p_paired"]
    out = pd.DataFrame(rows, columns=columns)
    out["p_holm"] = np.nan
    out["reject_holm"] = False
    if out.empty:
        return out
    out["p_holm"], out["reject_holm"], _ = _holm(out, "p_value", family, alpha)
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
                  title: str | None = None, metric: str = "auc"):
    """The paper's figure: a column per (dataset, confounder), a row per test set, AUC vs p.

    ``metric``: ``"auc"`` (binary ROC AUC, our primary metric) or ``"micro_auc"`` (the paper's
    Keras AUC, micro-averaged over both softmax columns); the axis labels and the title name it.
    ``reference`` (the paper's reported means, see :func:`reference_lines`) is drawn as dashed
    lines, and only with ``metric="micro_auc"``: the reported means are micro-averages, which
    differ from the binary AUC (binary 1.0 can be micro 0.86), so a non-empty ``reference``
    with ``metric="auc"`` raises :class:`AnalysisError` rather than drawing a misleading line.
    """
    import matplotlib.pyplot as plt

    if metric not in METRICS:
        raise AnalysisError(f"metric must be one of {sorted(METRICS)}, not {metric!r}")
    if reference is not None and not reference.empty and metric != "micro_auc":
        raise AnalysisError("the paper's reported means are micro-averaged AUCs: draw them with "
                            "metric='micro_auc', not over the binary AUC")
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
    colours = {s: plt.get_cmap("tab10")(i % 10) for i, s in enumerate(sources)}
    fig, axes = plt.subplots(len(rows), len(columns), figsize=(3.2 * len(columns), 2.9 * len(rows)),
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
                    ax.plot(line["p"], line[mean_column], marker="o", color=colours[source], label=label)
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
                ax.set_title(head + (f"\n{dataset}" if several_datasets else ""), fontsize=10)
            if i == len(rows) - 1:
                ax.set_xlabel("prevalence p")
            if j == 0:
                ax.set_ylabel(f"{names.get(test_set, test_set)} {words}")
    handles, labels = [], []
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), frameon=False,
               bbox_to_anchor=(0.5, -0.01))
    n_folds = int(means["n_folds" if metric == "auc" else "n_folds_micro"].max())
    what = "binary ROC AUC" if metric == "auc" else "micro-averaged AUC (the paper's metric)"
    note = f"{what}, mean over {n_folds} fold(s); band: {100 * confidence:g} % t interval over folds"
    if any(line.get_linestyle() == "--" for ax in axes.flat for line in ax.get_lines()):
        note += "; dashed: the paper's reported means"
    # about 38 characters of a 10-point title fit above each 3.2-inch column
    fig.suptitle(textwrap.fill((f"{title}: " if title else "") + note, width=max(60, 38 * len(columns))),
                 fontsize=10)
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
            n_permutations: int = 9999, n_bootstrap: int = 9999, seed: int = 0,
            arms: dict[str, str] | None = None) -> dict[str, Any]:
    """Statistics tables into ``out_dir`` and the figures into ``figures_dir``.

    Tables: ``comparisons.csv`` (:func:`compare_sources`), ``paper_test.csv``
    (:func:`paper_test` on the o.o.d. AUC, ``arms`` as there) and ``robustness.csv``.
    Figures: ``<name>_auc_vs_p.(png|pdf)``, binary AUC, no reference lines; and, when
    ``reference_datasets`` are given and match the paper's reported table, ``<name>_vs_paper``:
    micro-averaged AUC (the paper's metric) with the paper's reported means dashed.
    Returns the tables, ``paper_test`` and ``paper_test_report`` (:func:`paper_test_report`),
    the reference lines and the paths written. When the paper's arms cannot be found by name
    (several candidates, or an architecture clash) and ``arms`` is not given, the rest of the
    analysis still runs: ``paper_test`` is empty and the report (and a warning) says why.
    """
    import matplotlib.pyplot as plt

    out_dir, figures_dir = Path(out_dir), Path(figures_dir)
    if table.empty:
        raise AnalysisError("the results table is empty; run the grid first")
    comparisons = compare_sources(table, n_permutations=n_permutations, n_bootstrap=n_bootstrap, seed=seed)
    try:
        primary = paper_test(table, arms=arms, n_permutations=n_permutations, seed=seed)
    except AnalysisError as err:
        if arms is not None:
            raise
        warnings.warn(f"paper test skipped: {err}", stacklevel=2)
        primary = pd.DataFrame(columns=PAPER_COLUMNS)
        primary.attrs["message"] = f"No paper test: {err}"
    report = paper_test_report(primary)
    robustness = robustness_summary(table)
    paths = [atomic_write_csv(out_dir / "comparisons.csv", comparisons),
             atomic_write_csv(out_dir / "paper_test.csv", primary),
             atomic_write_csv(out_dir / "robustness.csv", robustness)]
    fig = plot_auc_vs_p(table, title=f"grid {name}")
    figures = save_figure(fig, figures_dir / f"{name}_auc_vs_p")
    plt.close(fig)
    reference = None
    if reference_datasets:
        reference = reference_lines(load_reference(reference_csv), reference_datasets)
        has_micro = "micro_auc" in table.columns and table["micro_auc"].notna().any()
        if reference.empty:
            warnings.warn(f"no reported values of the paper match datasets {reference_datasets}: "
                          "no comparison figure", stacklevel=2)
        elif not has_micro:
            warnings.warn("the results have no micro_auc, the paper's metric: no comparison figure",
                          stacklevel=2)
        else:
            fig = plot_auc_vs_p(table, reference=reference, metric="micro_auc",
                                title=f"grid {name} vs the paper")
            figures += save_figure(fig, figures_dir / f"{name}_vs_paper")
            plt.close(fig)
    encodedness = None
    if "source_probe_auc" in table.columns and table["source_probe_auc"].notna().any():
        from .mechanisms import encodedness_vs_drop  # a grid with `probe: true`

        encodedness = encodedness_vs_drop(table, n_permutations=n_permutations, seed=seed)
        paths.append(atomic_write_csv(out_dir / "encodedness_vs_drop.csv", encodedness))
    return {"table": table, "groups": groups, "group_summary": group_auc_summary(groups),
            "comparisons": comparisons, "paper_test": primary, "paper_test_report": report,
            "robustness": robustness, "reference": reference, "encodedness": encodedness,
            "tables": paths, "figures": figures}


def analyse_runs(runs_dir: str | os.PathLike, figures_dir: str | os.PathLike, name: str,
                 reference_datasets: dict[str, str] | None = None,
                 reference_csv: str | os.PathLike = REFERENCE_CSV,
                 n_permutations: int = 9999, n_bootstrap: int = 9999, seed: int = 0,
                 arms: dict[str, str] | None = None) -> dict[str, Any]:
    """Collect a grid's run directories, save the results table beside them, and :func:`analyse`."""
    runs_dir = Path(runs_dir)
    table, groups = collect_results(runs_dir, with_groups=True)
    if table.empty:
        raise AnalysisError(f"no complete run directories (with {METRICS_FILE}) under {runs_dir}")
    paths = save_results(table, runs_dir / "results.csv")
    if not groups.empty:
        paths += save_results(groups, runs_dir / "results_groups.csv")
    out = analyse(table, groups, runs_dir, figures_dir, name, reference_datasets, reference_csv,
                  n_permutations, n_bootstrap, seed, arms)
    out["tables"] = paths + out["tables"]
    return out
