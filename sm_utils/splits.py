"""Patient-grouped, label-stratified splits: a fixed test set and k train/val folds.

Built on scikit-learn's ``StratifiedGroupKFold`` so that every image of a patient lands
in the same split and the class balance is kept as far as the groups allow.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from .manifest import ManifestError, find_leakage, fold_columns, format_leakage


def _first_group_split(labels: np.ndarray, groups: np.ndarray, fraction: float, seed: int):
    """(keep, held_out) index arrays, held_out ~ ``fraction`` of the rows, grouped."""
    n_splits = max(2, round(1.0 / fraction))
    splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    return next(splitter.split(np.zeros(len(labels)), labels, groups))


def make_splits(
    table: pd.DataFrame,
    *,
    n_folds: int = 5,
    test_fraction: float = 0.2,
    val_fraction: float = 0.1,
    seed: int = 0,
    patient_column: str = "patient_id",
    label_column: str = "label",
) -> pd.DataFrame:
    """Return ``table`` with columns ``fold_0 .. fold_{n_folds-1}`` set to train/val/test.

    The test set is the same in every fold. Validation sets are disjoint across folds when
    ``n_folds * val_fraction <= 1`` (k-fold style); otherwise each fold draws its own
    grouped validation split with seed ``seed + fold``. Deterministic for a given seed.
    """
    if not 0 < test_fraction < 1:
        raise ManifestError(f"test_fraction must be in (0, 1); got {test_fraction}.")
    if not 0 < val_fraction < 1:
        raise ManifestError(f"val_fraction must be in (0, 1); got {val_fraction}.")
    if n_folds < 1:
        raise ManifestError(f"n_folds must be at least 1; got {n_folds}.")
    n_patients = table[patient_column].nunique()
    needed = max(2, round(1 / test_fraction)) + max(2, round(1 / val_fraction))
    if n_patients < needed:
        raise ManifestError(
            f"{n_patients} patients are too few for test_fraction={test_fraction} and "
            f"val_fraction={val_fraction}: need at least {needed}. Add patients or raise "
            "the fractions."
        )

    out = table.drop(columns=fold_columns(table)).reset_index(drop=True)
    labels = out[label_column].to_numpy()
    groups = out[patient_column].astype(str).to_numpy()

    dev_idx, test_idx = _first_group_split(labels, groups, test_fraction, seed)
    dev_labels, dev_groups = labels[dev_idx], groups[dev_idx]

    n_val_splits = max(2, round(1.0 / val_fraction))
    if n_folds <= n_val_splits:
        splitter = StratifiedGroupKFold(n_splits=n_val_splits, shuffle=True, random_state=seed)
        val_sets = [val for _, val in splitter.split(dev_idx, dev_labels, dev_groups)][:n_folds]
    else:
        val_sets = [
            _first_group_split(dev_labels, dev_groups, val_fraction, seed + fold)[1]
            for fold in range(n_folds)
        ]

    for fold, val in enumerate(val_sets):
        roles = np.full(len(out), "train", dtype=object)
        roles[test_idx] = "test"
        roles[dev_idx[val]] = "val"
        out[f"fold_{fold}"] = roles

    leaks = find_leakage(out, patient_column=patient_column)
    if leaks:  # cannot happen with group splitters; kept as a guard against regressions
        raise ManifestError("internal error: grouped split leaked patients.\n" + format_leakage(leaks))
    return out


def split_summary(table: pd.DataFrame, by: tuple[str, ...] = ("label",)) -> pd.DataFrame:
    """Counts of images per fold, role and the ``by`` columns (long format)."""
    frames = []
    for column in fold_columns(table):
        counts = table.groupby([column, *by]).size().rename("images").reset_index()
        counts = counts.rename(columns={column: "role"})
        counts.insert(0, "fold", int(column.split("_")[1]))
        frames.append(counts)
    return pd.concat(frames, ignore_index=True)
