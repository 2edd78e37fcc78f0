"""How often the claims' verdicts say "holds" on synthetic grids: under the null (calibration)
and at a given effect and fold spread (power). Used by benchmarks/claims_calibration.py and
the tests; a user planning folds can ask :func:`power` what their spread allows.

A synthetic grid: two sources' o.o.d. AUC curves over the prevalences ``ps``, per fold
``auc[s, f, p] = curve[s, p] + fold[f] + test_set[s] + test_set_p[s, p] + noise[s, f, p]``:

- ``fold`` (SD ``fold_sd``): the fold's training data, shared by the sources;
- ``test_set`` (SD ``test_set_sd``): the source x test-set component, shared by every fold
  and p (all folds are scored on one test set), which the fall (AUC at p = 0 minus at p)
  cancels and the level does not;
- ``test_set_p`` (SD ``test_set_p_sd``): the part of that component that differs between
  prevalences (shared by the folds), which neither cancels;
- ``noise`` (SD ``noise_sd``): everything else, independent.

The quantities are the claims' (:mod:`sm_utils.analysis.claims`: level and fall over p), the
verdict is :func:`~sm_utils.analysis.claims.fold_verdict`; rates come with their exact
(Clopper-Pearson) binomial intervals.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats
from scipy.integrate import trapezoid

from .signflip import ALPHA, HOLDS, MARGIN, VERDICTS, fold_verdict

PS = (0.0, 0.1, 0.2, 0.5, 0.8, 1.0)
# The paper's reported o.o.d. AUC under the tag (NIH ChestX-ray14), per p of PS
PAPER_TAG_OOD = {"imagenet": (0.87, 0.79, 0.759, 0.378, 0.05, 0.01),
                 "radimagenet": (0.84, 0.81, 0.79, 0.72, 0.62, 0.43)}


def synthetic_aucs(rng: np.random.Generator, curves: Sequence[Sequence[float]], n_folds: int,
                   noise_sd: float = 0.03, fold_sd: float = 0.02, test_set_sd: float = 0.0,
                   test_set_p_sd: float = 0.0) -> np.ndarray:
    """One grid's AUCs, shape (sources, folds, prevalences) (see the module's docstring)."""
    curves = np.asarray(curves, dtype=float)
    n_sources, n_ps = curves.shape
    return (curves[:, None, :]
            + rng.normal(0, fold_sd, (1, n_folds, 1))
            + rng.normal(0, test_set_sd, (n_sources, 1, 1))
            + rng.normal(0, test_set_p_sd, (n_sources, 1, n_ps))
            + rng.normal(0, noise_sd, (n_sources, n_folds, n_ps)))


def quantity(aucs: np.ndarray, measure: str, ps: Sequence[float] = PS) -> np.ndarray:
    """Per source and fold: the claims' ``"level"`` (mean o.o.d. AUC over p, trapezoidal) or
    ``"fall"`` (AUC at p = 0 minus that mean)."""
    ps = np.asarray(ps, dtype=float)
    level = trapezoid(aucs, ps, axis=-1) / (ps[-1] - ps[0])
    if measure == "level":
        return level
    if measure == "fall":
        return aucs[..., 0] - level
    raise ValueError(f"measure must be 'level' or 'fall', not {measure!r}")


def exact_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Clopper-Pearson interval of a rate k / n."""
    ci = stats.binomtest(k, n).proportion_ci(confidence, method="exact")
    return float(ci.low), float(ci.high)


def verdict_rates(curves: Sequence[Sequence[float]], measure: str, n_grids: int,
                  n_folds: int = 5, kind: str = "greater", seed: int = 0,
                  alpha: float = ALPHA, margin: float = MARGIN, **noise) -> dict:
    """Verdicts over ``n_grids`` synthetic grids: the difference source 0 minus source 1 of
    ``measure`` per fold, judged by ``kind``. Returns the counts, the rate of "holds" and its
    exact 95 % interval."""
    rng = np.random.default_rng(seed)
    counts: Counter = Counter()
    for _ in range(n_grids):
        q = quantity(synthetic_aucs(rng, curves, n_folds, **noise), measure)
        counts[fold_verdict(q[0] - q[1], kind, alpha, margin)["verdict"]] += 1
    low, high = exact_interval(counts[HOLDS], n_grids)
    return {"grids": n_grids, "holds": counts[HOLDS], "rate": counts[HOLDS] / n_grids,
            "rate_low": low, "rate_high": high,
            **{verdict: counts[verdict] for verdict in VERDICTS if counts[verdict]}}


def power(effect: float, sd: float, n_folds: int, n_grids: int = 10_000, seed: int = 0,
          alpha: float = ALPHA, test_set_sd: float = 0.0) -> dict:
    """The rate of "holds" for fold differences drawn as ``effect`` + a test-set component
    shared by the folds (SD ``test_set_sd``) + independent fold noise (SD ``sd``)."""
    rng = np.random.default_rng(seed)
    holds = 0
    for _ in range(n_grids):
        d = effect + rng.normal(0, test_set_sd) + rng.normal(0, sd, n_folds)
        holds += fold_verdict(d, "greater", alpha)["verdict"] == HOLDS
    low, high = exact_interval(holds, n_grids)
    return {"grids": n_grids, "holds": holds, "rate": holds / n_grids, "rate_low": low,
            "rate_high": high}


def fold_spread(table: pd.DataFrame, claim: str = "2", measure: str = "fall") -> pd.DataFrame:
    """Per confounder of a results table: the SD over folds of a claim's fold differences
    (from :func:`~sm_utils.analysis.claims.check_claims`' quantities)."""
    from .claims import CLAIMS, claim_roles

    chosen = next(c for c in CLAIMS if c.id == claim)
    m = next(m for m in chosen.measures if m.name == measure)
    roles = claim_roles(table)
    rows = []
    for confounder in sorted(set(table["confounder"]) & set(chosen.confounders or ())):
        a = m.values(table, roles[m.first], confounder, "auc")
        b = m.values(table, roles[m.second], confounder, "auc")
        d = (a - b).dropna()
        rows.append({"confounder": confounder, "n_folds": len(d), "mean": d.mean(),
                     "sd": d.std(ddof=1)})
    return pd.DataFrame(rows)
