"""The paper's primary statistic as the paper ran it (ImageNet vs RadImageNet, o.o.d. AUC,
permutation t-test per confounder and p, uncorrected), better tests beside it, and a report
of what the folds at hand allow."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from .results import METRICS, PAPER_METRIC, AnalysisError
from .statistics import (
    _family_floor,
    _fold_differences,
    _holm,
    _paired_permutation_test,
    _permutation_t_test,
    min_p_independent,
    min_p_paired,
)

# The two arms of the paper's test, and the names of this registry that can fill them.
ARM_CANDIDATES = {"ImageNet": ("imagenet_keras", "imagenet", "imagenet_lite0"),
                  "RadImageNet": ("radimagenet", "radimagenet_torch", "radiology_phantom")}
# Offline sources that only stand in for the paper's (the demo has neither network nor weights).
STAND_INS = {"imagenet_lite0": "ImageNet EfficientNet-Lite0, an offline stand-in for the paper's "
                               "ImageNet ResNet50",
             "radiology_phantom": "pretrained on synthetic radiology, an offline stand-in for "
                                  "RadImageNet"}
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
    metric: str = PAPER_METRIC,
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
      (``arms``; see :func:`paper_arms`), ``metric`` (default ``"keras_auc"``, the paper's
      metric as its code computed it; ``"micro_auc"`` the same average exact, ``"auc"`` the
      binary AUC) on ``test_set``, two-sided Student t-test with a permutation null, the
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
    metric_words = {"auc": "binary AUC",
                    "keras_auc": "Keras AUC (the paper's metric as its code computed it)",
                    "micro_auc": "micro-averaged AUC (the paper's metric, computed exactly)"}[metric]
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
