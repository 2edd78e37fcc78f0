"""A real (tiny) run's files agree with each other: every number of metrics.json is recomputed
here from predictions.csv and history.csv, independently of sm_utils.evaluation."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from sm_utils.evaluation import bootstrap_auc_ci, keras_auc
from sm_utils.runs import RunConfig, execute_run


@pytest.fixture(scope="module")
def run(phantom_cxr, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run_outputs")
    # Up to 6 epochs with patience 1: the run stops one epoch after its lowest validation loss
    # unless all 6 improve, which none of four CPUs' kernels did (their losses go up and down),
    # so the best epoch is neither the only one nor the last.
    config = RunConfig(manifest=str(phantom_cxr), confounder="tag", p=1.0, source="random",
                       arch="tf_efficientnet_lite0", image_size=32, epochs=6, patience=1,
                       batch_size=16, device="cpu", runs_dir=str(tmp / "runs"))
    run_dir = execute_run(config, progress=False, cache_dir=tmp / "cache", n_boot=50)
    return {
        "metrics": json.loads((run_dir / "metrics.json").read_text()),
        "config": json.loads((run_dir / "config.json").read_text()),
        "predictions": pd.read_csv(run_dir / "predictions.csv", dtype={"patient_id": str}),
        "history": pd.read_csv(run_dir / "history.csv"),
    }


def _auc(labels, scores):
    """scikit-learn's binary ROC AUC; None (JSON's NaN) when only one class is present."""
    labels = np.asarray(labels)
    return None if len(set(labels)) < 2 else float(roc_auc_score(labels, scores))


def _close(recorded, recomputed):
    if recomputed is None:
        return recorded is None
    return recorded is not None and math.isclose(recorded, recomputed, rel_tol=1e-12, abs_tol=1e-12)


@pytest.mark.numerics
def test_every_test_set_metric_is_recomputed_from_the_predictions(run):
    predictions, test_sets = run["predictions"], run["metrics"]["test_sets"]
    assert sorted(test_sets) == sorted(predictions["test_set"].unique()) == ["clean", "iid", "ood"]
    for name, part in predictions.groupby("test_set"):
        recorded = test_sets[name]
        labels = part["label"].to_numpy()
        assert set(labels) == {0, 1}
        np.testing.assert_array_equal(part["score"], part["prob_1"])
        np.testing.assert_allclose(part["prob_0"] + part["prob_1"], 1.0, atol=1e-6)
        assert _close(recorded["auc"], _auc(labels, part["score"])), name
        # The paper's micro-average: one-hot labels against both softmax columns, pooled.
        one_hot = np.stack([1 - labels, labels], axis=1)
        probs = part[["prob_0", "prob_1"]].to_numpy()
        assert _close(recorded["micro_auc"], _auc(one_hot.ravel(), probs.ravel())), name
        # ... and as the paper's Keras code counted it, at 200 thresholds (tf.keras.metrics.AUC)
        assert _close(recorded["keras_auc"], keras_auc(labels, probs)), name
        assert recorded["n"] == len(part)
        assert recorded["n_pos"] == int(labels.sum())
        assert recorded["n_confounded"] == int(part["confounded"].sum())
        assert recorded["auc_ci_low"] <= recorded["auc_ci_high"]
        # the interval resamples the set's patients (their images together), seeded by the run
        assert recorded["n_patients"] == part["patient_id"].nunique() < len(part)
        interval = bootstrap_auc_ci(labels, part["score"].to_numpy(),
                                    groups=part["patient_id"].to_numpy(), n_boot=50,
                                    seed=run["metrics"]["config"]["seed"])
        assert (recorded["auc_ci_low"], recorded["auc_ci_high"]) == pytest.approx(interval)
        # Group AUCs: every categorical attribute with two or more levels in this set.
        groups = {}
        for column in ("sex", "view", "modality", "confounded"):
            if part[column].nunique() < 2:
                continue
            for value, group in part.groupby(column):
                groups[f"{column}={value}"] = _auc(group["label"], group["score"])
        assert sorted(recorded["group_auc"]) == sorted(groups), name
        for key, value in groups.items():
            assert _close(recorded["group_auc"][key], value), (name, key)


@pytest.mark.numerics
def test_the_sets_are_the_ones_the_run_describes(run):
    # p = 1: the i.i.d. set confounds every positive, the o.o.d. set every negative.
    predictions, sizes = run["predictions"], run["config"]["split_sizes"]
    for name, part in predictions.groupby("test_set"):
        assert sizes[name] == {"n": len(part), "n_pos": int(part["label"].sum()),
                               "n_confounded": int(part["confounded"].sum())}
        expected = {"iid": part["label"] == 1, "ood": part["label"] == 0,
                    "clean": pd.Series(False, index=part.index)}[name]
        assert part["confounded"].equals(expected), name


@pytest.mark.numerics
def test_the_best_epoch_is_the_one_with_the_lowest_validation_loss(run):
    history, metrics = run["history"], run["metrics"]
    assert list(history["epoch"]) == list(range(1, metrics["epochs_run"] + 1))
    best = history.loc[history["val_loss"].idxmin()]
    assert metrics["best_epoch"] == int(best["epoch"])
    assert metrics["best_epoch"] != metrics["epochs_run"]  # this run peaked early: not trivial
    # It stopped after one epoch without a lower validation loss (patience 1).
    assert metrics["epochs_run"] == metrics["best_epoch"] + 1 <= 6


@pytest.mark.numerics
def test_the_run_says_where_and_in_what_precision_it_trained(run):
    # results.csv's device and precision columns come from here (and decide what may be pooled)
    assert run["metrics"]["ran_on"] == {"device": "cpu", "gpu": None, "precision": "fp32",
                                        "deterministic": True}
    assert run["config"]["device"]["training_precision"] == "fp32"
    assert run["config"]["device"]["scoring_precision"] == "fp32"
    assert run["config"]["device"]["data_placement"]["reason"] == "CPU run"


def test_ran_on_names_a_gpus_tf32_and_bf16_and_what_an_old_record_lacks():
    from sm_utils.training import ran_on

    gpu = {"device": "cuda:0", "gpu": "NVIDIA H200", "deterministic": False, "tf32": True}
    assert ran_on({**gpu, "training_precision": "bf16"})["precision"] == "bf16"
    assert ran_on({**gpu, "training_precision": "fp32"}) == {
        "device": "cuda", "gpu": "NVIDIA H200", "precision": "tf32", "deterministic": False}
    assert ran_on({**gpu, "training_precision": "fp32", "tf32": False})["precision"] == "fp32"
    assert ran_on({"device": "cuda:1"})["precision"] == "unknown"  # a GPU run before the record
    assert ran_on({}) == {"device": "unknown", "gpu": None, "precision": "unknown",
                          "deterministic": None}
