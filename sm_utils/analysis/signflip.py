"""The claims' test and verdict rule on fold-paired differences (:mod:`.claims` explains them).

An exact one-sided sign-flip permutation test of the mean difference, the smallest p the folds
can reach (from the non-zero differences), the interval that inverts the same test, and the
verdict words; on reported means (no folds) a reading of direction and size instead.
"""

from __future__ import annotations

from functools import lru_cache
from itertools import product

import numpy as np

from .results import AnalysisError

ALPHA = 0.05
MARGIN = 0.05          # AUC: the size below which two sources count as "comparable"
# Means only: the paper's means are printed to 0.01 or read off its figures to about +-0.01,
# so a difference of two of them can be off by 0.02.
READING_ERROR = 0.02
HOLDS, NOT_SHOWN, OPPOSITE, CANNOT, UNTESTABLE = (
    "holds", "not shown", "the opposite holds", "cannot tell with these folds",
    "not testable here")
CANNOT_FROM_MEANS = "cannot tell from means"
VERDICTS = (HOLDS, NOT_SHOWN, OPPOSITE, CANNOT, UNTESTABLE, CANNOT_FROM_MEANS)

_TOLERANCE = 1e-12


@lru_cache(maxsize=32)
def _subsets(n: int) -> tuple[np.ndarray, np.ndarray]:
    masks = np.array(list(product((0, 1), repeat=n))[1:], dtype=float)
    return masks, masks.sum(axis=1)


def _subset_means(d: np.ndarray) -> np.ndarray:
    """The mean of every non-empty subset of ``d`` (2^n - 1 values): the points where the
    sign-flip p-value of d - delta jumps as delta moves."""
    if len(d) > 20:
        raise AnalysisError(f"{len(d)} folds: the exact sign-flip test enumerates 2^n patterns; "
                            "at most 20 folds")
    masks, sizes = _subsets(len(d))
    return masks @ d / sizes


def sign_flip_p(d: np.ndarray) -> float:
    """One-sided p that mean(d) > 0: the share of the 2^n sign patterns whose mean is at least
    the observed one (exact; equal to scipy's ``permutation_test(..., permutation_type=
    "samples", alternative="greater")``). A pattern flipping the subset S is as extreme exactly
    when the mean of d over S is <= 0, so p = (1 + #{S: mean_S(d) <= 0}) / 2^n."""
    d = np.asarray(d, dtype=float)
    return float((1 + np.sum(_subset_means(d) <= _TOLERANCE)) / 2 ** len(d))


def smallest_p(d: np.ndarray) -> float:
    """The smallest one-sided p these differences can reach, whatever their signs: 2^-k over
    the k non-zero ones (a zero difference is the same under both signs)."""
    return float(0.5 ** np.sum(np.abs(np.asarray(d, dtype=float)) > _TOLERANCE))


def sign_flip_bounds(d: np.ndarray, alpha: float = ALPHA) -> tuple[float, float]:
    """(lower, upper): the one-sided 1 - alpha bounds on the mean difference from inverting the
    sign-flip test: delta is rejected as too small exactly when fewer than alpha 2^n patterns
    reach, i.e. below the floor(alpha 2^n)-th smallest subset mean (-inf when alpha 2^n < 1);
    the upper bound mirrors it. Together: the 1 - 2 alpha two-sided interval of a TOST."""
    d = np.asarray(d, dtype=float)
    k = int(np.floor(alpha * 2 ** len(d) + 1e-9))
    if k < 1:
        return -np.inf, np.inf
    means = np.sort(_subset_means(d))
    return float(means[k - 1]), float(means[-k])


def fold_verdict(d: np.ndarray, kind: str = "greater", alpha: float = ALPHA,
                 margin: float = MARGIN) -> dict:
    """The verdict on fold-paired differences ``d`` (see the module's docstring): effect,
    matching interval, p-value, smallest reachable p and verdict."""
    d = np.asarray(d, dtype=float)
    low, high = sign_flip_bounds(d, alpha)
    row = {"effect": float(d.mean()), "n_folds": len(d)}
    if kind == "greater":
        p, against = sign_flip_p(d), sign_flip_p(-d)
        least = smallest_p(d)
        row.update(ci_low=low, ci_high=np.inf,
                   interval=f"one-sided {1 - alpha:.0%} lower bound")
    elif kind == "equivalent":  # TOST: both one-sided tests must reject
        p = max(sign_flip_p(d + margin), sign_flip_p(margin - d))
        against = 2 * min(sign_flip_p(d - margin), sign_flip_p(-margin - d))
        least = max(smallest_p(d + margin), smallest_p(margin - d))
        row.update(ci_low=low, ci_high=high, interval=f"{1 - 2 * alpha:.0%} (TOST)")
    else:
        raise ValueError(f"kind must be 'greater' or 'equivalent', not {kind!r}")
    verdict = (HOLDS if p <= alpha else OPPOSITE if against <= alpha
               else CANNOT if least > alpha else NOT_SHOWN)
    return {**row, "p_value": p, "min_p": least, "verdict": verdict}


def means_verdict(effect: float, kind: str = "greater", margin: float = MARGIN,
                  reading_error: float = READING_ERROR) -> str:
    """The verdict on one difference of reported means: no test, direction and size."""
    if kind == "greater":
        return (HOLDS if effect > reading_error else OPPOSITE if effect < -reading_error
                else CANNOT_FROM_MEANS)
    return (HOLDS if abs(effect) < margin else OPPOSITE if abs(effect) > margin + reading_error
            else CANNOT_FROM_MEANS)
