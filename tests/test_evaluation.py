import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from sm_utils.evaluation import (
    EvaluationError,
    binary_auc,
    bootstrap_auc_ci,
    group_auc,
    json_safe,
    keras_auc,
    keras_micro_auc,
    keras_thresholds,
    summarise_test_set,
    weighted_auc,
)


def _toy(n=200, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    scores = np.clip(0.5 + 0.3 * (labels - 0.5) + rng.normal(0, 0.25, n), 0, 1)
    return labels, scores


def test_binary_auc_counts_ordered_pairs():
    # 2 positives, 2 negatives; pairs (pos > neg): 3 of 4 -> 0.75
    assert binary_auc([0, 0, 1, 1], [0.1, 0.6, 0.4, 0.9]) == pytest.approx(0.75)
    assert binary_auc([1, 1, 0, 0], [0.1, 0.2, 0.8, 0.9]) == 0.0


def test_binary_auc_single_class_is_nan():
    assert math.isnan(binary_auc([1, 1, 1], [0.2, 0.5, 0.9]))


def test_micro_auc_differs_from_binary_and_matches_pooled_definition():
    labels, scores = _toy()
    probs = np.stack([1 - scores, scores], axis=1)
    pooled_labels = np.concatenate([1 - labels, labels])
    pooled_scores = np.concatenate([probs[:, 0], probs[:, 1]])
    expected = roc_auc_score(pooled_labels, pooled_scores)
    assert keras_micro_auc(labels, probs) == pytest.approx(expected)
    assert keras_micro_auc(labels, scores) == pytest.approx(expected)  # (N,) form
    # Miscalibrated but perfectly ranked scores: binary AUC 1, micro AUC below 1.
    ranked = np.where(labels == 1, 0.30, 0.20) + np.linspace(0, 0.01, len(labels))
    assert binary_auc(labels, ranked) == 1.0
    assert keras_micro_auc(labels, ranked) < 0.9


def test_bootstrap_ci_is_seeded_and_brackets_the_auc():
    labels, scores = _toy()
    low, high = bootstrap_auc_ci(labels, scores, n_boot=300, seed=3)
    assert (low, high) == bootstrap_auc_ci(labels, scores, n_boot=300, seed=3)
    assert (low, high) != bootstrap_auc_ci(labels, scores, n_boot=300, seed=4)
    assert low < binary_auc(labels, scores) < high
    assert 0.02 < high - low < 0.3


def test_weighted_auc_counts_each_image_its_weight_and_halves_ties():
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 2, 40)
    scores = np.round(rng.random(40), 1)  # many ties
    weights = rng.integers(0, 4, (20, 40)).astype(float)
    expected = [roc_auc_score(np.repeat(labels, w.astype(int)), np.repeat(scores, w.astype(int)))
                for w in weights]
    np.testing.assert_allclose(weighted_auc(labels, scores, weights), expected, rtol=1e-12)
    assert np.isnan(weighted_auc(labels, scores, (labels == 1)[None, :].astype(float))[0])


def test_the_bootstrap_resamples_patients_whose_images_move_together():
    """20 images of each of 12 patients, a patient's images alike: resampling patients is the
    same as resampling one image per patient, and far wider than resampling the 240 images."""
    rng = np.random.default_rng(2)
    labels = np.repeat(rng.permutation([0, 1] * 6), 1)
    scores = np.clip(0.5 + 0.3 * (labels - 0.5) + rng.normal(0, 0.3, 12), 0, 1)
    patients = np.array([f"p{i}" for i in range(12)])
    one = bootstrap_auc_ci(labels, scores, groups=patients, n_boot=500, seed=1)
    many = bootstrap_auc_ci(np.repeat(labels, 20), np.repeat(scores, 20),
                            groups=np.repeat(patients, 20), n_boot=500, seed=1)
    assert many == pytest.approx(one, abs=1e-12)
    images = bootstrap_auc_ci(np.repeat(labels, 20), np.repeat(scores, 20), n_boot=500, seed=1)
    assert (images[1] - images[0]) < 0.5 * (many[1] - many[0])
    # and summarise_test_set resamples patients when it knows them, counting them
    frame = pd.DataFrame({"label": np.repeat(labels, 20), "score": np.repeat(scores, 20),
                          "patient_id": np.repeat(patients, 20)})
    out = summarise_test_set(frame, n_boot=500, seed=1)
    assert (out["auc_ci_low"], out["auc_ci_high"]) == pytest.approx(many, abs=1e-12)
    assert out["n"] == 240 and out["n_patients"] == 12


def test_group_auc_per_sex():
    labels = np.array([0, 1, 0, 1, 0, 1, 0, 1])
    scores = np.array([0.1, 0.9, 0.2, 0.8, 0.9, 0.1, 0.8, 0.2])  # right for F, reversed for M
    frame = pd.DataFrame({"label": labels, "score": scores, "sex": list("FFFFMMMM"),
                          "age": [30, 40, 50, 60, 70, 35, 45, 55], "image_id": list("abcdefgh")})
    out = group_auc(frame)
    assert out == {"sex=F": 1.0, "sex=M": 0.0}  # numeric age is not a group


def test_summary_fields_and_counts():
    labels, scores = _toy(60)
    frame = pd.DataFrame({"image_id": [f"i{i}" for i in range(60)], "label": labels,
                          "score": scores, "prob_0": 1 - scores, "prob_1": scores,
                          "confounded": np.arange(60) % 3 == 0,
                          "sex": np.where(np.arange(60) % 2, "F", "M")})
    out = summarise_test_set(frame, n_boot=100, seed=1)
    assert out["n"] == 60 and out["n_pos"] == int(labels.sum()) and out["n_confounded"] == 20
    assert out["n_patients"] == 60  # no patient_id: each image its own patient
    assert out["auc"] == pytest.approx(roc_auc_score(labels, scores))
    assert set(out["group_auc"]) == {"confounded=False", "confounded=True", "sex=F", "sex=M"}
    assert out["auc_ci_low"] < out["auc"] < out["auc_ci_high"]


def test_bad_input_is_refused_and_nan_becomes_null():
    with pytest.raises(EvaluationError, match="same length"):
        binary_auc([0, 1], [0.5])
    with pytest.raises(EvaluationError, match="0/1"):
        binary_auc([0, 2], [0.5, 0.1])
    assert json_safe({"a": float("nan"), "b": [1.0, float("inf")]}) == {"a": None, "b": [1.0, None]}


def test_keras_thresholds_are_kerass():
    # tf.keras.metrics.AUC(num_thresholds=200): -epsilon, i/199 for i = 1..198, 1 + epsilon
    thresholds = keras_thresholds()
    assert len(thresholds) == 200
    assert thresholds[0] == -1e-7 and thresholds[-1] == 1 + 1e-7
    assert thresholds[1] == 1 / 199 and thresholds[198] == 198 / 199


def test_keras_auc_counts_pairs_when_every_score_has_a_threshold_between():
    # softmax columns: A (label 1, p = 0.9): positive 0.9, negative 0.1; B (label 0, p = 0.7):
    # positive 0.3, negative 0.7; C (label 1, p = 0.45): positive 0.45, negative 0.55.
    # Positives {0.9, 0.3, 0.45} beat negatives {0.1, 0.7, 0.55} in 3 + 1 + 1 = 5 of 9 pairs;
    # with a threshold between any two scores the trapezoid sum is that fraction.
    labels, probs = [1, 0, 1], [0.9, 0.7, 0.45]
    assert keras_auc(labels, probs) == pytest.approx(5 / 9, abs=1e-12)
    assert keras_micro_auc(labels, probs) == pytest.approx(5 / 9)


def test_keras_auc_cannot_tell_apart_scores_between_two_thresholds():
    # A (label 1, p = 0.501): positive 0.501, negative 0.499; B (label 0, p = 0.502): positive
    # 0.498, negative 0.502. All four lie between the thresholds 99/199 = 0.4975 and
    # 100/199 = 0.5025, so Keras sees one tie: 0.5. Exactly, the positives beat the negatives
    # in 1 of 4 pairs (0.501 > 0.499): 0.25.
    labels, probs = [1, 0], [0.501, 0.502]
    assert keras_auc(labels, probs) == pytest.approx(0.5, abs=1e-12)
    assert keras_micro_auc(labels, probs) == pytest.approx(0.25)
    # (N, 2) softmax output gives the same as the probability of class 1
    assert keras_auc(labels, np.array([[0.499, 0.501], [0.498, 0.502]])) == pytest.approx(0.5)


def test_keras_auc_is_in_the_metrics_of_a_test_set():
    labels, scores = _toy()
    frame = pd.DataFrame({"label": labels, "score": scores, "prob_0": 1 - scores, "prob_1": scores})
    summary = summarise_test_set(frame, n_boot=50)
    assert summary["keras_auc"] == keras_auc(labels, scores)
    # smooth scores: Keras' thresholds move the micro-average by little, never to the binary AUC
    assert abs(summary["keras_auc"] - summary["micro_auc"]) < 0.01
    assert math.isnan(keras_auc([1, 1], [0.2, 0.3]))
