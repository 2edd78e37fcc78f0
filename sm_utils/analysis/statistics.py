"""Permutation tests between sources (independent and fold-paired), the smallest p-value
each can reach, Holm over a family, and every pair of sources compared."""

from __future__ import annotations

import gc
import math
import warnings
from collections.abc import Sequence
from itertools import combinations

import numpy as np
import pandas as pd
from scipy import stats

from .results import CONDITION, AnalysisError


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


def _welch_interval(x: np.ndarray, y: np.ndarray, confidence: float) -> tuple[float, float]:
    """Welch t interval of mean(x) - mean(y); the difference itself when both are constant."""
    if np.ptp(x) == 0 and np.ptp(y) == 0:
        difference = float(x.mean() - y.mean())
        return difference, difference
    with warnings.catch_warnings():
        # one constant sample has a variance of exactly 0, which scipy flags as possible
        # precision loss; Welch's interval then rests on the other sample's variance, exactly
        warnings.filterwarnings("ignore", "Precision loss occurred", RuntimeWarning)
        interval = stats.ttest_ind(x, y, equal_var=False).confidence_interval(confidence)
    return float(interval.low), float(interval.high)


def compare_sources(
    table: pd.DataFrame,
    test_sets: Sequence[str] = ("ood", "iid", "clean"),
    n_permutations: int = 9999,
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
    The mean difference (a minus b) gets a Welch t interval (scipy ``ttest_ind(...,
    equal_var=False).confidence_interval``): with 5 vs 5 folds a percentile bootstrap of the
    difference covers less than it claims; two constant samples give the point itself.
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
                row["diff_ci_low"], row["diff_ci_high"] = _welch_interval(x, y, confidence)
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
