"""The paper's sex-confounder task on NIH ChestX-ray14 (builder ``nih_sex_task``): PA views,
Atelectasis vs No Finding, a development pool, the paper's o.o.d. test set (male positives vs
female negatives) and an i.i.d. test pool of our own (all four sex/class groups: the paper
published none) that share no patient: whole patients are assigned to one side before any
image is drawn. Reads the provider's files as :mod:`sm_utils.datasets.nih` does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..manifest import Manifest, find_leakage, format_leakage
from . import register_dataset
from .image_check import drop_unreadable
from .nih import (
    NIHInputError,
    attach_paths,
    find_metadata,
    fixed_test_folds,
    label_task,
    read_metadata,
    to_manifest_columns,
)

# Manifest role of each side of the sex task.
SEX_TASK_ROLES = {"dev": "dev", "test": "test_ood", "iid": "test"}
# The parameter that sizes each pool (what an error names when a pool cannot be filled).
POOL_PARAMETERS = {("dev", "F", 1): "n_dev_female_positive", ("dev", "M", 1): "n_dev_male_positive",
                   ("dev", "M", 0): "n_dev_male_negative", ("test", "M", 1): "n_test_male_positive",
                   ("test", "F", 0): "n_test_female_negative"}


def assign_patients(
    frame: pd.DataFrame, quotas: dict[tuple[str, str, int], int], rng: np.random.Generator,
) -> dict[str, str]:
    """Put every useful patient wholly on one side ("dev", "test", ...: the sides of ``quotas``).

    ``quotas`` maps (side, sex, label) to the images wanted. Patients are visited in seeded
    random order; each goes to the side where it fills more still-open cells (one image per
    cell per patient is counted, so quotas are met with as many distinct patients as the
    data allow; ties are drawn at random). Returns patient id -> side; patients who fill
    nothing are left out.
    """
    remaining = dict(quotas)
    sides = list(dict.fromkeys(side for side, _, _ in quotas))
    cells_by_patient = frame.groupby("patient_id").apply(
        lambda g: set(zip(g["sex"], g["label"])), include_groups=False)
    patients = cells_by_patient.index.to_numpy()
    side_of: dict[str, str] = {}
    for pid in patients[rng.permutation(len(patients))]:
        cells = cells_by_patient[pid]
        gain = {side: [c for c in cells if remaining.get((side, *c), 0) > 0] for side in sides}
        best = max(len(g) for g in gain.values())
        if best == 0:
            continue
        tied = [side for side in sides if len(gain[side]) == best]
        side = tied[int(rng.integers(len(tied)))] if len(tied) > 1 else tied[0]
        side_of[str(pid)] = side
        for cell in gain[side]:
            remaining[(side, *cell)] -= 1
    return side_of


def draw_spread(frame: pd.DataFrame, n: int, rng: np.random.Generator) -> pd.DataFrame:
    """Draw ``n`` rows, taking one image per patient before any patient's second one."""
    order = frame.iloc[rng.permutation(len(frame))].copy()
    order["_rank"] = order.groupby("patient_id").cumcount()
    return order.sort_values("_rank", kind="stable").head(n).drop(columns="_rank")


@register_dataset("nih_sex_task")
def build_nih_sex_task(
    out_dir: str | Path,
    root: str | Path,
    metadata_csv: str | Path | None = None,
    positive: str = "Atelectasis",
    negative: str = "No Finding",
    view: str = "PA",
    n_dev_female_positive: int = 200,
    n_dev_male_positive: int = 200,
    n_dev_male_negative: int = 200,
    n_test_male_positive: int = 200,
    n_test_female_negative: int = 200,
    n_iid_test_per_group: int = 100,
    n_folds: int = 5,
    val_fraction: float = 0.15,
    seed: int = 0,
    missing_images: str = "error",
    unreadable_images: str = "error",
) -> Manifest:
    """The paper's sex task, leak-free.

    Development pool (roles train/val in each fold): female positives, male positives and
    male negatives; for a prevalence p the training set takes a fraction p of its positives
    from the female ones (sm_utils.confounders). o.o.d. test (role ``test_ood``, as in the
    paper): male positives vs female negatives. i.i.d. test pool (role ``test``; ours, the
    paper has none): ``n_iid_test_per_group`` images of each of F+, M+, M-, F-, from which a
    run draws the training correlation at its p (i.i.d.) and a sex-balanced clean set;
    0 leaves it out. Each patient is on one side only. The paper's pools are filled first; our
    i.i.d. pool takes only patients they left, so on a small data set it never starves them.
    """
    root = Path(root)
    meta_file = find_metadata(root, metadata_csv)
    frame = label_task(read_metadata(meta_file), positive, negative, view)
    frame, absent = attach_paths(frame, root, missing_images=missing_images)
    frame, unreadable = drop_unreadable(frame, root, name_column="image_index",
                                        unreadable_images=unreadable_images)
    quotas = {
        ("dev", "F", 1): n_dev_female_positive, ("dev", "M", 1): n_dev_male_positive,
        ("dev", "M", 0): n_dev_male_negative,
        ("test", "M", 1): n_test_male_positive, ("test", "F", 0): n_test_female_negative,
    }
    bad = {k: v for k, v in quotas.items() if not isinstance(v, (int, np.integer)) or v < 1}
    if not isinstance(n_iid_test_per_group, (int, np.integer)) or n_iid_test_per_group < 0:
        bad["n_iid_test_per_group"] = n_iid_test_per_group
    if bad:
        raise NIHInputError(f"pool sizes must be positive integers; got {bad}.")
    iid_quotas = {("iid", sex, label): n_iid_test_per_group
                  for sex, label in (("F", 1), ("M", 1), ("M", 0), ("F", 0))
                  if n_iid_test_per_group}
    rng = np.random.default_rng(np.random.SeedSequence([seed, 1402]))
    side_of = assign_patients(frame, quotas, rng)  # the paper's pools first
    if iid_quotas:  # then ours, from the patients left
        side_of.update(assign_patients(frame[~frame["patient_id"].astype(str).isin(side_of)],
                                       iid_quotas, rng))
    quotas.update(iid_quotas)
    frame["side"] = frame["patient_id"].astype(str).map(side_of)

    picked, shortfalls = [], []
    for (side, sex, label), n in quotas.items():
        pool = frame[(frame["side"] == side) & (frame["sex"] == sex) & (frame["label"] == label)]
        if len(pool) < n:
            parameter = POOL_PARAMETERS.get((side, sex, label), "n_iid_test_per_group")
            shortfalls.append(f"{side} {sex} label={label}: need {n} ({parameter}), "
                              f"have {len(pool)}")
            continue
        picked.append(draw_spread(pool, n, rng))
    if shortfalls:
        available = frame.groupby(["sex", "label"]).size().to_dict()
        raise NIHInputError(
            "not enough images for the sex task pools with whole patients on one side: "
            + "; ".join(shortfalls) + f". Images available per (sex, label): {available}. "
            "Lower the pool sizes named; our i.i.d. pool takes only patients the paper's pools "
            "leave (n_iid_test_per_group=0 leaves it out)."
        )
    table = pd.concat(picked).sort_values("image_index").reset_index(drop=True)
    fixed = table["side"].map(SEX_TASK_ROLES)
    strata = table["label"] * 2 + (table["sex"] == "F").astype(int)
    table = fixed_test_folds(table.drop(columns="side"), fixed, n_folds=n_folds,
                             val_fraction=val_fraction, seed=seed, strata=strata)
    leaks = find_leakage(table)
    if leaks:  # impossible by construction; a guard against regressions
        raise NIHInputError("internal error: sex task leaked patients.\n" + format_leakage(leaks))
    counts = table.assign(role=fixed.to_numpy()).groupby(["role", "sex", "label"]).size()
    meta = {
        "dataset": "nih_sex_task",
        "metadata_file": meta_file.name,
        "positive": positive, "negative": negative, "view": view,
        "pool_sizes": {f"{s}_{x}_{y}": n for (s, x, y), n in quotas.items()},
        "counts": {f"{r}_{s}_{y}": int(n) for (r, s, y), n in counts.items()},
        "n_patients_dev": int(table.loc[fixed.to_numpy() == "dev", "patient_id"].nunique()),
        "n_patients_test": int(table.loc[fixed.to_numpy() == "test_ood", "patient_id"].nunique()),
        "n_patients_iid_test": int(table.loc[fixed.to_numpy() == "test", "patient_id"].nunique()),
        "iid_test": "ours (the paper published no i.i.d. test for the sex task)"
                    if n_iid_test_per_group else None,
        "patients_in_dev_and_test": 0,
        "seed": seed,
        "absent_images_dropped": len(absent),
        "unreadable_images_dropped": len(unreadable),
        "unreadable_images": unreadable,
    }
    return Manifest(table=to_manifest_columns(table), root=root.resolve(), meta=meta)
