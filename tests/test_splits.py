import numpy as np
import pandas as pd
import pytest

from sm_utils.manifest import ManifestError, find_leakage, fold_columns
from sm_utils.splits import make_splits, split_summary


def table(n_patients=120, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        label = int(rng.random() < 0.3)
        for i in range(int(rng.integers(1, 5))):
            rows.append({"image_id": f"{p}_{i}", "patient_id": f"p{p}", "label": label, "path": "x"})
    return pd.DataFrame(rows)


def test_splits_are_grouped_stratified_and_fixed_test():
    base = table()
    out = make_splits(base, n_folds=5, test_fraction=0.2, val_fraction=0.1, seed=1)
    assert fold_columns(out) == [f"fold_{k}" for k in range(5)]
    assert find_leakage(out) == []
    test_masks = [out[c] == "test" for c in fold_columns(out)]
    assert all((m == test_masks[0]).all() for m in test_masks)  # same test set in every fold
    test_share = test_masks[0].mean()
    assert 0.12 < test_share < 0.28
    # Stratified: the positive rate in test is close to the overall rate.
    assert abs(out.loc[test_masks[0], "label"].mean() - out["label"].mean()) < 0.08
    # k-fold style: validation sets are disjoint when n_folds * val_fraction <= 1.
    vals = [set(out.index[out[c] == "val"]) for c in fold_columns(out)]
    assert all(not (a & b) for i, a in enumerate(vals) for b in vals[i + 1:])
    assert all(0.05 < len(v) / len(out) < 0.15 for v in vals)


def test_splits_are_deterministic_and_seed_dependent():
    base = table()
    a = make_splits(base, n_folds=3, seed=7)
    pd.testing.assert_frame_equal(a, make_splits(base, n_folds=3, seed=7))
    # The same rows in another order: the output keeps that order, and every image gets the
    # same role in every fold (splits depend on the rows, not on where they are).
    shuffled = base.sample(frac=1.0, random_state=0)
    b = make_splits(shuffled, n_folds=3, seed=7)
    assert list(b["image_id"]) == list(shuffled["image_id"]) != list(a["image_id"])
    pd.testing.assert_frame_equal(a.set_index("image_id"), b.set_index("image_id").loc[a["image_id"]])
    c = make_splits(base, n_folds=3, seed=8)
    assert not a["fold_0"].equals(c["fold_0"])


def test_many_folds_draw_overlapping_validation_sets():
    # 4 folds x 40 % cannot be disjoint: each fold draws its own grouped validation set.
    out = make_splits(table(), n_folds=4, val_fraction=0.4, seed=0)
    folds = fold_columns(out)
    assert len(folds) == 4
    dev = out["fold_0"] != "test"
    patients = {column: {role: set(out.loc[out[column] == role, "patient_id"])
                         for role in ("train", "val", "test")} for column in folds}
    # Across folds the validation sets share patients (some pair overlaps) but are not the same
    # draw (a seed per fold).
    vals = [patients[column]["val"] for column in folds]
    shared = [len(a & b) for i, a in enumerate(vals) for b in vals[i + 1:]]
    assert max(shared) > 0
    assert len({frozenset(v) for v in vals}) == 4
    for column in folds:
        # No patient in two roles of a fold (what find_leakage checks), stated explicitly.
        roles = patients[column]
        assert not (roles["train"] & roles["val"] or roles["train"] & roles["test"]
                    or roles["val"] & roles["test"])
        # About 40 % of the development rows (1 / round(1 / 0.4) = 1/2 of the groups' split).
        assert 0.3 < (out.loc[dev, column] == "val").mean() < 0.55
    assert find_leakage(out) == []

def test_too_few_patients_is_a_clear_error():
    with pytest.raises(ManifestError, match="3 patients are too few"):
        make_splits(table(3), n_folds=2)


def test_bad_fractions_are_rejected():
    with pytest.raises(ManifestError, match=r"test_fraction must be in \(0, 1\); got 1.5"):
        make_splits(table(), test_fraction=1.5)


def test_split_summary_counts_every_image_once_per_fold():
    out = make_splits(table(), n_folds=2, seed=0)
    summary = split_summary(out)
    assert summary.groupby("fold")["images"].sum().tolist() == [len(out), len(out)]
    assert set(summary["role"]) == {"train", "val", "test"}
