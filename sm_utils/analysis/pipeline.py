"""Everything at once: tables, statistics and figures of a grid (notebook 04, `sm analyse`)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import pandas as pd

from ..io import atomic_write_csv, atomic_write_text
from ..paths import METRICS_FILE
from .claims import (
    UNTESTABLE,
    check_claims,
    claims_against_paper,
    claims_markdown,
    definitions_commit,
)
from .figures import plot_auc_vs_p, save_figure
from .paper import PAPER_COLUMNS, paper_test, paper_test_report
from .reference import REFERENCE_CSV, load_reference, reference_lines
from .results import (
    PAPER_METRIC,
    AnalysisError,
    check_one_device_per_condition,
    collect_results,
    save_results,
)
from .statistics import compare_sources
from .summaries import group_auc_summary, robustness_summary


def analyse(table: pd.DataFrame, groups: pd.DataFrame, out_dir: str | os.PathLike,
            figures_dir: str | os.PathLike, name: str,
            reference_datasets: dict[str, str] | None = None,
            reference_csv: str | os.PathLike = REFERENCE_CSV,
            n_permutations: int = 9999, seed: int = 0,
            arms: dict[str, str] | None = None,
            claim_roles: dict[str, str] | None = None) -> dict[str, Any]:
    """Statistics tables into ``out_dir`` and the figures into ``figures_dir``.

    Tables: ``comparisons.csv`` (:func:`compare_sources`), ``paper_test.csv``
    (:func:`paper_test` on the o.o.d. Keras AUC, the paper's metric, ``arms`` as there; its
    rows with ``metric`` "auc" repeat it on the binary AUC) and ``robustness.csv``.
    Figures: ``<name>_auc_vs_p.(png|pdf)``, binary AUC, no reference lines; and, when
    ``reference_datasets`` are given and match the paper's reported table, ``<name>_vs_paper``:
    the Keras AUC (the paper's metric) with the paper's reported means dashed.
    ``claims.csv`` and ``claims.md``: the paper's claims checked on this table
    (:func:`sm_utils.analysis.claims.check_claims`, sources in the claims' roles by name or
    ``claim_roles``) beside the paper's own verdicts.
    Returns the tables, ``paper_test`` (on the paper's metric), ``paper_test_binary`` (the
    same on the binary AUC) and ``paper_test_report`` (:func:`paper_test_report`),
    the reference lines and the paths written. When the paper's arms cannot be found by name
    (several candidates, or an architecture clash) and ``arms`` is not given, the rest of the
    analysis still runs: ``paper_test`` is empty and the report (and a warning) says why.
    """
    import matplotlib.pyplot as plt

    out_dir, figures_dir = Path(out_dir), Path(figures_dir)
    if table.empty:
        raise AnalysisError("the results table is empty; run the grid first")
    check_one_device_per_condition(table)
    comparisons = compare_sources(table, n_permutations=n_permutations, seed=seed)
    try:
        primary = paper_test(table, arms=arms, metric=PAPER_METRIC, n_permutations=n_permutations,
                             seed=seed)
        binary = paper_test(table, arms=arms, metric="auc", n_permutations=n_permutations,
                            seed=seed)
    except AnalysisError as err:
        if arms is not None:
            raise
        warnings.warn(f"paper test skipped: {err}", stacklevel=2)
        primary = pd.DataFrame(columns=PAPER_COLUMNS)
        primary.attrs["message"] = f"No paper test: {err}"
        binary = primary
    report = paper_test_report(primary)
    both = [t for t in (primary, binary) if not t.empty]
    robustness = robustness_summary(table)
    claims = _claims(table, claim_roles, reference_datasets)
    paths = [atomic_write_csv(out_dir / "comparisons.csv", comparisons),
             atomic_write_csv(out_dir / "claims.csv", claims),
             atomic_write_text(out_dir / "claims.md",
                               claims_markdown(claims, commit=definitions_commit())),
             atomic_write_csv(out_dir / "paper_test.csv",
                              pd.concat(both, ignore_index=True) if both else primary),
             atomic_write_csv(out_dir / "robustness.csv", robustness)]
    fig = plot_auc_vs_p(table, title=f"grid {name}")
    figures = save_figure(fig, figures_dir / f"{name}_auc_vs_p")
    plt.close(fig)
    reference = None
    if reference_datasets:
        reference = reference_lines(load_reference(reference_csv), reference_datasets)
        has_metric = PAPER_METRIC in table.columns and table[PAPER_METRIC].notna().any()
        if reference.empty:
            warnings.warn(f"no reported values of the paper match datasets {reference_datasets}: "
                          "no comparison figure", stacklevel=2)
        elif not has_metric:
            warnings.warn(f"the results have no {PAPER_METRIC}, the paper's metric: no comparison "
                          "figure", stacklevel=2)
        else:
            fig = plot_auc_vs_p(table, reference=reference, metric=PAPER_METRIC,
                                title=f"grid {name} vs the paper")
            figures += save_figure(fig, figures_dir / f"{name}_vs_paper")
            plt.close(fig)
    encodedness = None
    if "source_probe_auc" in table.columns and table["source_probe_auc"].notna().any():
        from ..mechanisms import encodedness_vs_drop  # a grid with `probe: true`

        encodedness = encodedness_vs_drop(table, n_permutations=n_permutations, seed=seed)
        paths.append(atomic_write_csv(out_dir / "encodedness_vs_drop.csv", encodedness))
    return {"table": table, "groups": groups, "group_summary": group_auc_summary(groups),
            "comparisons": comparisons, "paper_test": primary, "paper_test_binary": binary,
            "paper_test_report": report,
            "robustness": robustness, "reference": reference, "encodedness": encodedness,
            "claims": claims,
            "tables": paths, "figures": figures}


def _claims(table: pd.DataFrame, roles, reference_datasets) -> pd.DataFrame:
    """The claims beside the paper's; an analysis whose roles cannot be told apart still runs."""
    try:
        return claims_against_paper(check_claims(table, roles), datasets=reference_datasets)
    except AnalysisError as err:
        warnings.warn(f"claims not checked: {err}", stacklevel=3)
        return pd.DataFrame({"claim": ["-"], "verdict": [UNTESTABLE], "why": [str(err)]})


def analyse_runs(runs_dir: str | os.PathLike, figures_dir: str | os.PathLike, name: str,
                 reference_datasets: dict[str, str] | None = None,
                 reference_csv: str | os.PathLike = REFERENCE_CSV,
                 n_permutations: int = 9999, seed: int = 0,
                 arms: dict[str, str] | None = None,
                 claim_roles: dict[str, str] | None = None) -> dict[str, Any]:
    """Collect a grid's run directories, save the results table beside them, and :func:`analyse`."""
    runs_dir = Path(runs_dir)
    table, groups = collect_results(runs_dir, with_groups=True)
    if table.empty:
        raise AnalysisError(f"no complete run directories (with {METRICS_FILE}) under {runs_dir}")
    paths = save_results(table, runs_dir / "results.csv")
    if not groups.empty:
        paths += save_results(groups, runs_dir / "results_groups.csv")
    out = analyse(table, groups, runs_dir, figures_dir, name, reference_datasets, reference_csv,
                  n_permutations, seed, arms, claim_roles)
    out["tables"] = paths + out["tables"]
    return out
