"""Metrics for one fine-tuning run: AUCs, bootstrap intervals, AUC per attribute group.

- ``auc``: binary ROC AUC of the positive-class score (scikit-learn), the primary metric.
- ``keras_auc``: the paper's metric as the paper computed it. Its Keras code (Keras 2.15) scored
  one-hot labels against both softmax columns with ``tf.keras.metrics.AUC()``: a micro-average
  over the two columns, counted at 200 fixed thresholds and integrated with the trapezoid rule
  (:func:`keras_auc`). It is not the binary AUC: it rewards calibration as well as ranking, and
  its thresholds cannot tell apart scores closer than 1/199 (saturated softmax outputs).
- ``micro_auc``: the same micro-average computed exactly (scikit-learn,
  ``roc_auc_score(one_hot, probs, average="micro")``), without the thresholds.
- ``auc_ci_low/high``: percentile bootstrap interval of the binary AUC (seeded), resampling
  patients: every image of a drawn patient comes along (a patient's images are not
  independent); ``n_patients`` beside ``n``. Without a ``patient_id`` column each image is
  its own patient.
- ``group_auc``: binary AUC within each level of each categorical attribute (e.g. ``sex=F``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

# Attributes with more levels than this (ids, ages) are not reported per group.
MAX_GROUP_LEVELS = 10
# Columns of a predictions table that are not attributes.
PREDICTION_COLUMNS = ("test_set", "image_id", "label", "score", "prob_0", "prob_1", "path",
                      "patient_id")


class EvaluationError(ValueError):
    """Predictions that cannot be scored as given."""


def _check(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels).astype(int).ravel()
    scores = np.asarray(scores, dtype=float)
    if len(labels) != len(scores):
        raise EvaluationError(
            f"labels and scores must have the same length; got {len(labels)} and {len(scores)}."
        )
    if not np.isin(labels, [0, 1]).all():
        raise EvaluationError(f"labels must be 0/1; found {sorted(set(labels.tolist()))}.")
    return labels, scores


def binary_auc(labels, scores) -> float:
    """ROC AUC of ``scores`` (probability of class 1); NaN when only one class is present."""
    labels, scores = _check(labels, scores)
    if len(np.unique(labels)) < 2:
        return float("nan")
    return float(roc_auc_score(labels, scores))


KERAS_THRESHOLDS = 200
KERAS_EPSILON = 1e-7  # keras.backend.epsilon()


def _two_columns(labels, probs) -> tuple[np.ndarray, np.ndarray]:
    """(labels 0/1, probs (N, 2)) from (N, 2) softmax output or (N,) probability of class 1."""
    probs = np.asarray(probs, dtype=float)
    if probs.ndim == 1:
        probs = np.stack([1.0 - probs, probs], axis=1)
    if probs.ndim != 2 or probs.shape[1] != 2:
        raise EvaluationError(f"probs must have shape (N, 2) or (N,); got {probs.shape}.")
    labels, _ = _check(labels, probs[:, 1])
    return labels, probs


def keras_thresholds(num_thresholds: int = KERAS_THRESHOLDS) -> np.ndarray:
    """Keras' thresholds: -epsilon, then i / (n - 1) for i = 1 .. n - 2, then 1 + epsilon."""
    inner = [(i + 1) * 1.0 / (num_thresholds - 1) for i in range(num_thresholds - 2)]
    return np.array([0.0 - KERAS_EPSILON, *inner, 1.0 + KERAS_EPSILON])


def keras_auc(labels, probs, num_thresholds: int = KERAS_THRESHOLDS) -> float:
    """The paper's metric: ``tf.keras.metrics.AUC()`` (ROC, 200 thresholds, ``summation_method=
    "interpolation"``, ``multi_label=False``) of one-hot labels against both softmax columns.

    As Keras 2.15 computes it: labels and predictions are flattened over the two columns (a
    micro-average); at each threshold t a prediction counts as positive when it is greater than
    t; true and false positive rates (0 where undefined, as ``divide_no_nan``) give the ROC
    points, and the area is the trapezoid sum over consecutive thresholds. ``probs`` as in
    :func:`keras_micro_auc`. NaN when only one class is present (Keras would report 0).
    """
    labels, probs = _two_columns(labels, probs)
    if len(np.unique(labels)) < 2:
        return float("nan")
    truth = np.stack([1 - labels, labels], axis=1).ravel().astype(bool)
    scores = probs.ravel()
    thresholds = keras_thresholds(num_thresholds)
    predicted = scores[None, :] > thresholds[:, None]           # (thresholds, 2N)
    tp = (predicted & truth).sum(axis=1).astype(float)
    fp = (predicted & ~truth).sum(axis=1).astype(float)
    fn, tn = truth.sum() - tp, (~truth).sum() - fp
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr = np.where(tp + fn > 0, tp / (tp + fn), 0.0)
        fpr = np.where(fp + tn > 0, fp / (fp + tn), 0.0)
    return float(np.sum((fpr[:-1] - fpr[1:]) * (tpr[:-1] + tpr[1:]) / 2.0))


def keras_micro_auc(labels, probs) -> float:
    """Micro-averaged AUC of one-hot labels against both softmax columns, computed exactly
    (the paper's metric without Keras' thresholds: see :func:`keras_auc`).

    ``probs`` is (N, 2) (softmax output) or (N,) (probability of class 1; the other column
    is ``1 - p``). NaN when only one class is present.
    """
    labels, probs = _two_columns(labels, probs)
    if len(np.unique(labels)) < 2:
        return float("nan")
    one_hot = np.stack([1 - labels, labels], axis=1)
    return float(roc_auc_score(one_hot, probs, average="micro"))


def weighted_auc(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Binary AUC (ties halved) of each row of ``weights`` (B, N): image i counted
    ``weights[b, i]`` times. NaN for a row whose weights leave a single class."""
    order = np.argsort(scores, kind="mergesort")
    sorted_scores, positive = scores[order], labels[order] == 1
    weights = np.asarray(weights, dtype=float)[:, order]
    levels = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    pos = np.add.reduceat(weights * positive, levels, axis=1)    # (B, distinct scores)
    neg = np.add.reduceat(weights * ~positive, levels, axis=1)
    below = np.cumsum(neg, axis=1) - neg                          # negatives strictly below
    denominator = pos.sum(axis=1) * neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (pos * (below + 0.5 * neg)).sum(axis=1) / denominator,
                        np.nan)


def bootstrap_auc_ci(
    labels, scores, *, groups=None, n_boot: int = 1000, level: float = 0.95, seed: int = 0,
    stream: int = 20240307,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the binary AUC, resampling ``groups`` (patients).

    A draw takes as many groups as there are, with replacement, and every image of a drawn
    group comes along (the images of a patient are not independent). ``groups`` None: each
    image is its own group. Draws holding a single class are skipped; (NaN, NaN) when the data
    hold a single class. Seeded by ``seed`` and ``stream`` (a caller's own sequence).
    """
    return bootstrap_mean_auc_ci([(labels, scores, groups)], n_boot=n_boot, level=level,
                                 seed=seed, stream=stream)


def bootstrap_mean_auc_ci(
    folds, *, n_boot: int = 1000, level: float = 0.95, seed: int = 0, stream: int = 20240307,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean binary AUC of several models scored on one
    test set: ``folds`` is a list of (labels, scores, groups), one per model (fold).

    Each draw resamples the groups (patients) once for all folds, so the interval is the test
    set's sampling error of the fold mean (the spread between folds is the training's, and not
    in it). Groups are matched across folds by value; ``groups`` None: each image is its own
    group, matched by position. With one fold this is :func:`bootstrap_auc_ci`, draw for draw.
    Draws where a fold holds a single class are skipped; (NaN, NaN) when a fold's data hold a
    single class.
    """
    values = bootstrap_mean_auc_draws(folds, n_boot=n_boot, seed=seed, stream=stream)
    if not len(values):
        return float("nan"), float("nan")
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def bootstrap_mean_auc_draws(
    folds, *, n_boot: int = 1000, seed: int = 0, stream: int = 20240307,
) -> np.ndarray:
    """The fold means of :func:`bootstrap_mean_auc_ci`'s draws (those where every fold holds
    both classes), in draw order; empty when a fold's data hold a single class."""
    checked, keys = [], []
    for labels, scores, groups in folds:
        labels, scores = _check(labels, scores)
        if len(np.unique(labels)) < 2:
            return np.array([])
        names = (pd.Series(np.arange(len(labels))) if groups is None
                 else pd.Series(np.asarray(groups)).astype(str))
        if len(names) != len(labels):
            raise EvaluationError(f"groups must have one entry per image; got {len(names)} for "
                                  f"{len(labels)} images.")
        checked.append((labels, scores))
        keys.append(names)
    if not checked:
        raise EvaluationError("no folds to bootstrap")
    codes = pd.factorize(pd.concat(keys, ignore_index=True))[0]  # shared across folds
    n_groups = int(codes.max()) + 1
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(stream)]))
    draws = rng.integers(0, n_groups, size=(n_boot, n_groups))
    counts = np.zeros((n_boot, n_groups))
    np.add.at(counts, (np.arange(n_boot)[:, None], draws), 1.0)
    values, offset = np.zeros(n_boot), 0
    for labels, scores in checked:
        fold_codes = codes[offset:offset + len(labels)]
        offset += len(labels)
        values += weighted_auc(labels, scores, counts[:, fold_codes])
    return values[np.isfinite(values)] / len(checked)


def group_attributes(frame: pd.DataFrame, exclude: Iterable[str] = ()) -> list[str]:
    """Categorical (text or boolean) attribute columns with 2..MAX_GROUP_LEVELS levels."""
    skip = set(PREDICTION_COLUMNS) | set(exclude)
    out = []
    for column in frame.columns:
        if column in skip or str(column).startswith("fold_"):
            continue
        values = frame[column]
        if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
            continue  # numbers (age, ...) are measurements, not groups
        if 2 <= values.nunique(dropna=True) <= MAX_GROUP_LEVELS:
            out.append(column)
    return out


def group_auc(frame: pd.DataFrame, attributes: Iterable[str] | None = None) -> dict[str, float]:
    """Binary AUC per ``attribute=value`` group; groups with a single class give NaN."""
    attributes = group_attributes(frame) if attributes is None else list(attributes)
    out = {}
    for column in attributes:
        for value, part in frame.groupby(column, sort=True):
            out[f"{column}={value}"] = binary_auc(part["label"], part["score"])
    return out


def summarise_test_set(frame: pd.DataFrame, *, n_boot: int = 1000, seed: int = 0) -> dict:
    """The metrics.json entry of one test set from its predictions.

    ``frame`` needs columns ``label``, ``score`` (probability of class 1) and optionally
    ``prob_0``, ``patient_id`` (the bootstrap resamples patients), ``confounded`` and
    attributes.
    """
    if len(frame) == 0:
        raise EvaluationError("cannot evaluate an empty test set; check the manifest's test rows.")
    labels = frame["label"].to_numpy()
    scores = frame["score"].to_numpy()
    probs = (frame[["prob_0", "prob_1"]].to_numpy() if {"prob_0", "prob_1"} <= set(frame)
             else scores)
    patients = frame["patient_id"].to_numpy() if "patient_id" in frame else None
    low, high = bootstrap_auc_ci(labels, scores, groups=patients, n_boot=n_boot, seed=seed)
    confounded = frame["confounded"].astype(bool) if "confounded" in frame else pd.Series(False)
    return {
        "auc": binary_auc(labels, scores),
        "auc_ci_low": low,
        "auc_ci_high": high,
        "micro_auc": keras_micro_auc(labels, probs),
        "keras_auc": keras_auc(labels, probs),
        "n": len(frame),
        "n_patients": int(pd.Series(patients).nunique()) if patients is not None else len(frame),
        "n_pos": int(labels.sum()),
        "n_confounded": int(confounded.sum()),
        "group_auc": group_auc(frame),
    }


def json_safe(value):
    """Replace NaN/inf floats by None (JSON has no NaN), recursively."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (float, np.floating)) and not math.isfinite(float(value)):
        return None
    return value
