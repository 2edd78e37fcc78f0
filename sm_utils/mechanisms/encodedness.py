"""Encodedness against the o.o.d. drop across sources, and what a grid measured
(its per-source probes and per-run attribution), from results tables."""

from __future__ import annotations

import itertools
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..paths import SOURCE_PROBES_FILE
from .features import MechanismError


def _keys(table: pd.DataFrame) -> list[str]:
    """Grouping keys beside confounder and source that vary in the table (dataset, arch)."""
    return [c for c in ("dataset", "arch") if c in table.columns and table[c].nunique() > 1]


def ood_drop(table: pd.DataFrame) -> pd.DataFrame:
    """Per confounder and source: the o.o.d. AUC drop = (mean over folds of the clean-test AUC
    at p = 0) - (mean over folds of the o.o.d. AUC at the confounder's largest p, 1 in the demo).

    The clean AUC at p = 0 is what the model achieves without any shortcut on offer; the o.o.d.
    AUC at the largest p is what is left when the shortcut it learnt is reversed.
    """
    needed = {"confounder", "source", "p", "test_set", "auc"}
    missing = needed - set(table.columns)
    if missing:
        raise MechanismError(f"the results table lacks column(s) {sorted(missing)}; it needs "
                             f"{sorted(needed)} (analysis.collect_results / load_results).")
    keys = ["confounder", "source", *_keys(table)]
    rows = []
    for key, part in table.groupby(keys, sort=True):
        p_max = float(part["p"].max())
        clean = part[(part["test_set"] == "clean") & (part["p"] == 0)]["auc"]
        ood = part[(part["test_set"] == "ood") & (part["p"] == p_max)]["auc"]
        if clean.empty or ood.empty or p_max == 0:
            raise MechanismError(
                f"{dict(zip(keys, key))}: the o.o.d. drop needs clean-test AUCs at p = 0 and "
                f"o.o.d. AUCs at a p > 0; found p {sorted(part['p'].unique())} and test sets "
                f"{sorted(part['test_set'].unique())}.")
        rows.append({**dict(zip(keys, key)), "clean_auc_p0": float(clean.mean()),
                     "p_max": p_max, "ood_auc_p_max": float(ood.mean()),
                     "ood_drop": float(clean.mean() - ood.mean()),
                     "n_folds": int(min(len(clean), len(ood)))})
    return pd.DataFrame(rows)


def spearman_permutation(x, y, *, n_permutations: int = 9999, seed: int = 0) -> dict[str, Any]:
    """Spearman's rho of (x, y) and its two-sided permutation p (exact over all n! orderings
    when n! <= n_permutations, else Monte Carlo with the +1 correction), and the smallest p
    the test can give with n points (2 / n! exactly: with 3 sources, 1/3)."""
    from scipy.stats import rankdata

    x, y = np.asarray(x, float), np.asarray(y, float)
    n = len(x)
    out = {"n_points": n, "spearman_rho": float("nan"), "p_value": float("nan"),
           "p_exact": None, "min_p_value": float("nan")}
    if n < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return out
    rx, ry = rankdata(x), rankdata(y)

    def rho(a, b):
        a, b = a - a.mean(), b - b.mean()
        return float((a * b).sum() / math.sqrt((a * a).sum() * (b * b).sum()))

    observed = rho(rx, ry)
    exact = math.factorial(n) <= n_permutations
    if exact:
        null = np.array([rho(rx, ry[list(order)]) for order in itertools.permutations(range(n))])
        p = float(np.mean(np.abs(null) >= abs(observed) - 1e-12))
        smallest = float(np.mean(np.abs(null) >= np.abs(null).max() - 1e-12))
    else:
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), 5150]))
        null = np.array([rho(rx, rng.permutation(ry)) for _ in range(n_permutations)])
        p = float((np.sum(np.abs(null) >= abs(observed) - 1e-12) + 1) / (n_permutations + 1))
        smallest = 1.0 / (n_permutations + 1)
    out.update(spearman_rho=observed, p_value=p, p_exact=exact, min_p_value=smallest)
    return out


def encodedness_points(table: pd.DataFrame, probes: pd.DataFrame | None = None, *,
                       encodedness: str = "source_probe_auc") -> pd.DataFrame:
    """One row per (confounder, source): pre-fine-tuning encodedness beside the o.o.d. drop.

    ``probes``: a table with confounder, source and ``probe_auc`` (e.g. :func:`probe_table` at
    strength 1); without it, ``table`` must carry the column ``encodedness`` (the grid's
    ``source_probe_auc``, constant per source and confounder).
    """
    drops = ood_drop(table)
    keys = ["confounder", "source", *_keys(table)]
    if probes is None:
        if encodedness not in table.columns:
            raise MechanismError(
                f"the results table has no column {encodedness!r}: run the grid with "
                "`probe: true` (it adds the pre-fine-tuning probe AUC of each source) or pass "
                "probes=probe_table(...).")
        enc = table.groupby(keys, sort=True)[encodedness].mean().rename("encodedness")
    else:
        missing = {"confounder", "source", "probe_auc"} - set(probes.columns)
        if missing:
            raise MechanismError(f"probes lacks column(s) {sorted(missing)}.")
        chosen = probes
        if "strength" in probes.columns and probes["strength"].notna().any():
            # the strength the grid trains with (1 unless the table says otherwise)
            trained = table.groupby("confounder")["strength"].first() if "strength" in table else {}
            keep = probes.apply(lambda r: pd.isna(r["strength"]) or math.isclose(
                r["strength"], float(trained.get(r["confounder"], 1.0))), axis=1)
            chosen = probes[keep]
        on = [k for k in keys if k in chosen.columns]
        enc = chosen.groupby(on, sort=True)["probe_auc"].mean().rename("encodedness")
        keys = on
    points = drops.merge(enc.reset_index(), on=keys, how="inner")
    if points.empty:
        raise MechanismError("no (confounder, source) pair is in both the results and the probes.")
    return points


def encodedness_vs_drop(table: pd.DataFrame, probes: pd.DataFrame | None = None, *,
                        encodedness: str = "source_probe_auc", n_permutations: int = 9999,
                        seed: int = 0, decimals: int = 3) -> pd.DataFrame:
    """Per confounder: Spearman's rho between the sources' pre-fine-tuning encodedness (probe
    AUC) and their o.o.d. AUC drop (:func:`ood_drop`), with a two-sided permutation p over the
    sources (exact for few sources: with 3, no p below 1/3 is possible, see ``min_p_value``).
    Positive rho: the more decodable the confounder is before fine-tuning, the larger the drop.
    Probe AUCs equal to ``decimals`` places are ties (differences of 0.0001 between probes
    saturated at 1 are not a ranking); when all are equal, rho and p are NaN.
    """
    points = encodedness_points(table, probes, encodedness=encodedness)
    rows = []
    for confounder, part in points.groupby("confounder", sort=True):
        stats = spearman_permutation(part["encodedness"].round(decimals), part["ood_drop"],
                                     n_permutations=n_permutations, seed=seed)
        rows.append({"confounder": confounder, **stats,
                     "sources": ", ".join(part["source"].astype(str))})
    return pd.DataFrame(rows)


def grid_probes(runs_dir: str | os.PathLike, dataset: str | None = None) -> pd.DataFrame:
    """The pre-fine-tuning probes a grid with ``probe: true`` wrote (``source_probes.csv``), in
    the columns of :func:`probe_table` (source, confounder, strength, probe_auc, ...; means
    over the grid's seeds, their number in ``n_probes``)."""
    path = Path(runs_dir) / SOURCE_PROBES_FILE
    if not path.exists():
        raise MechanismError(f"{path} not found: it is written by a grid run with `probe: true` "
                             "(sm run GRID); run the grid with it, or leave runs_dir empty to "
                             "probe here.")
    probes = pd.read_csv(path).rename(columns=lambda c: c.removeprefix("source_"))
    if dataset is not None:
        probes = probes[probes["dataset"] == dataset]
    # one row per source, confounder and strength: the mean over the grid's seeds (and archs)
    values = ["probe_auc", "probe_auc_ci_low", "probe_auc_ci_high"]
    return (probes.groupby(["source", "confounder", "strength"], sort=False, dropna=False)
            .agg(**{c: (c, "mean") for c in values}, n_probes=("probe_auc", "count"))
            .reset_index())


# run-level attribution columns that grid_attribution averages over folds
MEAN_ATTRIBUTION_COLUMNS = ["attribution_share", "attribution_share_ci_low",
                            "attribution_share_ci_high", "mask_share", "attribution_ratio"]


def grid_attribution(table: pd.DataFrame, confounder: str | None = None) -> pd.DataFrame:
    """Attribution shares of a grid with ``attribution: true``, one row per (source, p) of
    ``confounder`` (default: the first confounder with attributions), mean over the folds (and
    seeds) beside the mean clean and o.o.d. AUC, in the columns of :func:`attribution_sweep`."""
    if "attribution_share" not in table.columns or table["attribution_share"].isna().all():
        raise MechanismError("the results table has no attribution_share: run the grid with "
                             "`attribution: true` and a confounder with a pixel mask (tag, "
                             "marker, support_device).")
    runs = table.dropna(subset=["attribution_share"])
    names = list(dict.fromkeys(runs["confounder"]))
    confounder = confounder if confounder in names else names[0]
    runs = table[table["confounder"] == confounder]
    auc = runs.pivot_table(index="run_id", columns="test_set", values="auc")
    auc = auc.rename(columns=lambda test_set: f"{test_set}_auc")
    per_run = (runs.drop_duplicates("run_id").set_index("run_id")
               [["source", "p", *MEAN_ATTRIBUTION_COLUMNS]]
               .join(auc[[c for c in ("clean_auc", "ood_auc") if c in auc.columns]]))
    values = [c for c in per_run.columns if c not in ("source", "p")]
    out = (per_run.groupby(["source", "p"], sort=False)
           .agg(**{c: (c, "mean") for c in values}, n_runs=("attribution_share", "count"))
           .reset_index().sort_values(["source", "p"], ignore_index=True))
    return out.assign(confounder=confounder)
