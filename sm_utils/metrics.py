"""Metrics of your own, computed by the analysis for every run and test set.

A metric is a function ``fn(labels, scores) -> float`` (labels 0/1, scores the probability of
class 1, both numpy arrays of one test set) registered under a name::

    from sm_utils.metrics import register_metric

    @register_metric("sensitivity_at_spec90", description="Sensitivity at 90% specificity.")
    def sensitivity_at_spec90(labels, scores):
        threshold = np.quantile(scores[labels == 0], 0.9)
        return float((scores[labels == 1] > threshold).mean())

The analysis (``sm analyse``, ``sm run``'s notebook 04, ``sm report``) adds a column of that
name to the results table, computed from each run's ``predictions.csv``; runs are not
repeated, so a metric added later applies to every run already done. The metrics every run
writes into ``metrics.json`` (AUC, Keras AUC, ...) are :mod:`sm_utils.evaluation`'s.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from . import plugins

MetricFn = Callable[[np.ndarray, np.ndarray], float]


class MetricError(ValueError):
    """A metric that cannot be registered or computed."""


@dataclass(frozen=True)
class Metric:
    name: str
    fn: MetricFn
    description: str


_METRICS: dict[str, Metric] = {}


def register_metric(name: str, fn: MetricFn | None = None, *, description: str,
                    replace: bool = False):
    """Register ``fn(labels, scores) -> float`` as ``name`` (usable as a decorator). A name
    registered before (by the package or a plugin) is refused, naming both, unless
    ``replace=True``."""
    def add(function: MetricFn) -> MetricFn:
        if not callable(function):
            raise MetricError(f"metric {name!r}: expected a function fn(labels, scores) -> "
                              f"float; found {function!r}.")
        if name in _METRICS and not replace:
            raise MetricError(plugins.duplicate_message("metric", name, function))
        plugins.record("metric", name, function)
        _METRICS[name] = Metric(name, function, description)
        return function

    return add if fn is None else add(fn)


def list_metrics() -> list[str]:
    plugins.ensure_loaded()
    return sorted(_METRICS)


def get_metric(name: str) -> Metric:
    plugins.ensure_loaded()
    if name not in _METRICS:
        raise MetricError(f"unknown metric {name!r}; registered: {', '.join(list_metrics()) or 'none'}.")
    return _METRICS[name]


def compute_metrics(labels, scores) -> dict[str, float]:
    """Every registered metric of one test set; a metric that fails names itself."""
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=float)
    out = {}
    for name in list_metrics():
        try:
            out[name] = float(_METRICS[name].fn(labels, scores))
        except Exception as err:  # any failure: re-raised with the metric's name
            origin = plugins.registered_by("metric", name)
            raise MetricError(f"metric {name!r} (from {origin}) failed on a test set of "
                              f"{len(labels)} images: {type(err).__name__}: {err}. Expected "
                              "fn(labels, scores) -> float.") from err
    return out
