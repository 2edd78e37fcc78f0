"""From run directories to the paper's figure and statistics.

- :func:`collect_results`: every complete run directory of a grid -> one tidy table, one row per
  (run, test set), with the grid axes (dataset, confounder, strength, p, fold, source, arch, seed)
  and the metrics: ``auc`` (binary ROC AUC, our primary metric), ``keras_auc`` (the paper's
  metric as its Keras code computed it: a micro-average over both softmax columns at 200
  thresholds) and ``micro_auc`` (the same average computed exactly).
- :func:`summarise`: mean and t interval over folds of each metric.
- :func:`plot_auc_vs_p`: the paper's figure: a column per confounder, o.o.d. AUC on the top row
  and i.i.d. AUC on the bottom row against p, a line per source with a confidence band over
  folds; ``metric="keras_auc"`` with the paper's reported means as dashed lines (they are
  micro-averages, so they are never drawn over the binary AUC).
- :func:`paper_test`: the paper's primary statistic as the paper ran it (ImageNet vs RadImageNet,
  o.o.d. Keras AUC, two-sided permutation t-test per confounder and p, folds as independent samples,
  no correction) and beside it a paired, fold-matched sign-flip test, Holm over the prevalences
  of a confounder, and the smallest p-value each can give; :func:`paper_test_report` says in
  one paragraph what those bounds mean for the folds at hand.
- :func:`compare_sources`: per (confounder, p, test set), the same permutation t-test between
  every pair of sources, the paired test, Holm correction over the prevalences of each pair
  (statsmodels) and a bootstrap confidence interval of the mean difference (scipy).
- :func:`robustness_summary`: per source, clean AUC, i.i.d. minus o.o.d. gap and the first p at
  which the o.o.d. AUC falls below 0.5.

Modules: ``results`` (the table), ``summaries``, ``statistics`` (tests between sources),
``paper`` (the paper's test), ``reference`` (the paper's reported means), ``figures`` and
``pipeline`` (:func:`analyse`, :func:`analyse_runs`); every public name is importable from
``sm_utils.analysis`` itself.
"""

from __future__ import annotations

from .claims import CLAIMS, check_claims, claims_against_paper, format_claims, paper_claims
from .figures import plot_auc_vs_p, save_figure
from .paper import (
    ARM_CANDIDATES,
    PAPER_COLUMNS,
    PAPER_CONDITION,
    PAPER_FAMILY,
    STAND_INS,
    paper_arms,
    paper_test,
    paper_test_report,
)
from .pipeline import analyse, analyse_runs
from .reference import (
    REFERENCE_CONFOUNDERS,
    REFERENCE_CSV,
    REFERENCE_SOURCES,
    load_reference,
    reference_lines,
)
from .results import (
    AXES,
    CONDITION,
    MECHANISM_COLUMNS,
    METRIC_COLUMNS,
    METRICS,
    PAPER_METRIC,
    PAPER_METRICS,
    RAN_ON_COLUMNS,
    RUN_COLUMNS,
    SOURCE_PROBE_COLUMNS,
    TEST_SET_ORDER,
    AnalysisError,
    check_one_device_per_condition,
    collect_results,
    load_results,
    save_results,
)
from .statistics import compare_sources, min_p_independent, min_p_paired
from .summaries import SUMMARY_COLUMNS, group_auc_summary, robustness_summary, summarise

__all__ = [
    "ARM_CANDIDATES",
    "AXES",
    "CLAIMS",
    "CONDITION",
    "MECHANISM_COLUMNS",
    "METRICS",
    "METRIC_COLUMNS",
    "PAPER_COLUMNS",
    "PAPER_CONDITION",
    "PAPER_FAMILY",
    "PAPER_METRIC",
    "PAPER_METRICS",
    "RAN_ON_COLUMNS",
    "REFERENCE_CONFOUNDERS",
    "REFERENCE_CSV",
    "REFERENCE_SOURCES",
    "RUN_COLUMNS",
    "SOURCE_PROBE_COLUMNS",
    "STAND_INS",
    "SUMMARY_COLUMNS",
    "TEST_SET_ORDER",
    "AnalysisError",
    "analyse",
    "analyse_runs",
    "check_claims",
    "check_one_device_per_condition",
    "claims_against_paper",
    "collect_results",
    "compare_sources",
    "format_claims",
    "group_auc_summary",
    "load_reference",
    "load_results",
    "min_p_independent",
    "min_p_paired",
    "paper_arms",
    "paper_claims",
    "paper_test",
    "paper_test_report",
    "plot_auc_vs_p",
    "reference_lines",
    "robustness_summary",
    "save_figure",
    "save_results",
    "summarise",
]
