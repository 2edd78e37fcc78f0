"""PadChest (BIMCV) and VinDr-CXR (PhysioNet), read from their providers' files.

- ``padchest``: ``PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv`` (one row per image:
  ImageID, ImageDir, StudyDate_DICOM, StudyID, PatientID, PatientBirth, PatientSex_DICOM,
  ViewPosition_DICOM, Projection, ..., MethodLabel, Labels, ...) and the images, 16-bit PNG,
  in the numbered folders of the download (``<ImageDir>/<ImageID>``) or in one folder (e.g. the
  224 px copy). Labels are a list per report (``['pleural effusion', 'cardiomegaly']``); the
  task is one label against ``['normal']`` (``negative="normal"``) or its absence; reports
  labelled "exclude" or "suboptimal study", and rows without labels, are dropped and counted.
  Age: study year minus birth year (to within a year). 16-bit images are stretched to 8 bits
  once, from each image's own minimum to maximum.
- ``vindr_cxr``: VinDr-CXR 1.0.0: ``annotations/image_labels_train.csv`` (three radiologists
  per image: image_id, rad_id, 28 labels 0/1) and ``annotations/image_labels_test.csv`` (the
  consensus of five; its "Other disease" is train's "Other diseases"), DICOM images
  ``train/<image_id>.dicom`` and ``test/<image_id>.dicom``. A training image's label is the
  readers' ``majority`` (2 of 3, default) or ``any``; the official test set stays the fixed
  test set (``official_split``). The collection has no patient ids: every image counts as its
  own patient (said). Sex and age come from the DICOM headers where present.
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pandas as pd

from ..manifest import Manifest
from . import register_dataset
from .nih import parse_age
from .table import TableInputError, finish_manifest, keep_views, standard_sex

PADCHEST_CSV = "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv"
PADCHEST_EXCLUDED = ("exclude", "suboptimal study")
VINDR_LABELS = ("Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly",
                "Clavicle fracture", "Consolidation", "Edema", "Emphysema", "Enlarged PA", "ILD",
                "Infiltration", "Lung Opacity", "Lung cavity", "Lung cyst", "Mediastinal shift",
                "Nodule/Mass", "Pleural effusion", "Pleural thickening", "Pneumothorax",
                "Pulmonary fibrosis", "Rib fracture", "Other lesion", "COPD", "Lung tumor",
                "Pneumonia", "Tuberculosis", "Other diseases", "No finding")
VINDR_FILES = {"train": "annotations/image_labels_train.csv",
               "test": "annotations/image_labels_test.csv"}


def padchest_labels(value) -> list[str] | None:
    """``"['pleural effusion', ' cardiomegaly']"`` -> the stripped labels; None when empty."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    try:
        labels = ast.literal_eval(str(value))   # a Python list literal, never code
    except (ValueError, SyntaxError):
        raise TableInputError(f"PadChest Labels {value!r} is not a list such as "
                              "['normal'] or ['pleural effusion', 'cardiomegaly'].") from None
    return [str(label).strip() for label in labels if str(label).strip()]


def _padchest_image(root: Path, image_dir, image_id: str) -> str | None:
    """Where the download put an image: <ImageDir>/<ImageID>, or one folder of them."""
    folder = str(int(image_dir)) if pd.notna(image_dir) else None
    for candidate in ((f"{folder}/{image_id}",) if folder else ()) + (image_id,
                                                                       f"images/{image_id}"):
        if (root / candidate).is_file():
            return candidate
    return f"{folder}/{image_id}" if folder else image_id   # reported as missing


@register_dataset("padchest")
def build_padchest(
    out_dir: str | Path,
    root: str | Path,
    finding: str = "pleural effusion",
    negative: str = "normal",
    views: str | list[str] | None = ("PA", "AP"),
    labelled_by: str | None = None,
    labels_csv: str | Path = PADCHEST_CSV,
    n_folds: int = 5,
    test_fraction: float = 0.2,
    val_fraction: float = 0.1,
    seed: int = 0,
    missing_images: str = "error",
    unreadable_images: str = "error",
) -> Manifest:
    """A binary PadChest task. ``views``: Projection values (PA, AP, AP_horizontal, L, ...);
    ``labelled_by``: "Physician" (the reports labelled by hand) or "RNN_model"; None keeps
    both. Sex other than M/F is dropped and counted."""
    root, out_dir = Path(root), Path(out_dir)
    path = Path(labels_csv) if Path(labels_csv).is_absolute() else root / labels_csv
    if not path.is_file() and Path(f"{path}.gz").is_file():
        path = Path(f"{path}.gz")
    if not path.is_file():
        raise TableInputError(f"no {Path(labels_csv).name} in {root}: expected PadChest's label "
                              "file as downloaded (or pass labels_csv=).")
    frame = pd.read_csv(path, low_memory=False)
    needed = ["ImageID", "ImageDir", "StudyDate_DICOM", "PatientID", "PatientBirth",
              "PatientSex_DICOM", "Projection", "MethodLabel", "Labels"]
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise TableInputError(f"{path.name}: not PadChest's label file, no column(s) {missing}.")
    if negative not in ("normal", "absent"):
        raise TableInputError(f"negative must be 'normal' (reports labelled ['normal']) or "
                              f"'absent' (reports without the finding); got {negative!r}.")
    removed: dict[str, int] = {}
    labels = frame["Labels"].map(padchest_labels)
    removed["no labels"] = int(labels.isna().sum())
    frame, labels = frame[labels.notna()], labels[labels.notna()]
    excluded = labels.map(lambda ls: any(x in PADCHEST_EXCLUDED for x in ls))
    removed["report labelled exclude or suboptimal study"] = int(excluded.sum())
    frame, labels = frame[~excluded], labels[~excluded]
    known = sorted({x for ls in labels for x in ls})
    if finding not in known:
        common = pd.Series([x for ls in labels for x in ls]).value_counts().head(12)
        raise TableInputError(f"no PadChest report is labelled {finding!r}; the commonest "
                              f"labels are {list(common.index)} (lower case, as in Labels).")
    positive = labels.map(lambda ls: finding in ls)
    negative_rows = (labels.map(lambda ls: ls == ["normal"]) if negative == "normal"
                     else ~positive)
    keep = positive | negative_rows
    removed["neither positive nor negative"] = int((~keep).sum())
    frame = frame[keep].assign(
        positive=positive[keep],
        view=frame["Projection"].fillna("").astype(str).str.strip().str.upper())
    if labelled_by is not None:
        removed[f"not labelled by {labelled_by}"] = int((frame["MethodLabel"] != labelled_by).sum())
        frame = frame[frame["MethodLabel"] == labelled_by]
    frame, _ = keep_views(frame, views, removed)
    sex, unknown = standard_sex(frame["PatientSex_DICOM"], "drop", path)
    removed["sex not M or F"] = int(unknown.sum())
    study_year = pd.to_numeric(frame["StudyDate_DICOM"], errors="coerce") // 10000
    out = pd.DataFrame({
        "image_id": frame["ImageID"].str.replace(r"\.png$", "", regex=True),
        "path": [_padchest_image(root, d, i) for d, i in zip(frame["ImageDir"], frame["ImageID"])],
        "label": frame["positive"].astype(int), "patient_id": frame["PatientID"].astype(str),
        "sex": sex, "age": study_year - pd.to_numeric(frame["PatientBirth"], errors="coerce"),
        "view": frame["view"], "study": frame.get("StudyID", frame["ImageID"]).astype(str),
        "labelled_by": frame["MethodLabel"]}, index=frame.index)[~unknown.to_numpy()]
    meta = {"dataset": "padchest", "builder": "padchest", "release": "01.02.19 (160K)",
            "finding": finding, "negative": negative, "views": views, "labelled_by": labelled_by,
            "age": "study year minus birth year (to within a year)",
            "images": "16-bit PNG stretched to 8 bits per image (own min to max)"}
    return finish_manifest(out, root, out_dir, meta, removed, what=path.name, n_folds=n_folds,
                           test_fraction=test_fraction, val_fraction=val_fraction, seed=seed,
                           missing_images=missing_images, sixteen_bit=True,
                           unreadable_images=unreadable_images)


def _dicom_attributes(path: Path) -> tuple[object, float]:
    """(PatientSex, age in years) from a DICOM header; missing ones as None / NaN."""
    import pydicom

    if not path.is_file():
        return None, float("nan")
    header = pydicom.dcmread(path, stop_before_pixels=True)
    age = header.get("PatientAge", "") or ""
    try:
        years = parse_age(age) if str(age).strip() else float("nan")
    except ValueError:
        years = float("nan")
    return (str(header.get("PatientSex", "") or "") or None), years


@register_dataset("vindr_cxr")
def build_vindr_cxr(
    out_dir: str | Path,
    root: str | Path,
    finding: str = "Pleural effusion",
    negative: str = "No finding",
    readers: str = "majority",
    official_split: bool = True,
    unknown_sex: str = "drop",
    n_folds: int = 5,
    test_fraction: float = 0.2,
    val_fraction: float = 0.1,
    seed: int = 0,
    missing_images: str = "error",
    unreadable_images: str = "error",
) -> Manifest:
    """A binary VinDr-CXR task: ``finding`` (one of the 28 labels) against "No finding" or
    ``"absent"``; ``readers``: "majority" or "any" of a training image's three radiologists.
    ``official_split``: the official test images are the fixed test set, folds over the rest;
    False pools them for patient-grouped splits."""
    root, out_dir = Path(root), Path(out_dir)
    if finding not in VINDR_LABELS or finding == "No finding":
        raise TableInputError(f"finding must be one of {list(VINDR_LABELS[:-1])}; got {finding!r}.")
    if negative not in ("No finding", "absent"):
        raise TableInputError(f"negative must be 'No finding' or 'absent'; got {negative!r}.")
    if readers not in ("majority", "any"):
        raise TableInputError(f"readers must be 'majority' or 'any'; got {readers!r}.")
    parts = []
    for split, name in VINDR_FILES.items():
        path = root / name
        if not path.is_file():
            raise TableInputError(f"no {name} under {root}: expected VinDr-CXR 1.0.0 as "
                                  "downloaded (annotations/, train/, test/).")
        table = pd.read_csv(path).rename(columns={"Other disease": "Other diseases"})
        missing = [c for c in ("image_id", finding, "No finding") if c not in table.columns]
        if missing:
            raise TableInputError(f"{name}: no column(s) {missing}; is this VinDr-CXR 1.0.0?")
        votes = table.groupby("image_id", sort=True)[[finding, "No finding"]]
        share = votes.mean()  # the test file has one (consensus) row per image
        needed = 0.5 if readers == "majority" else 0.0
        labels = pd.DataFrame({"positive": share[finding] > needed,
                               "no_finding": share["No finding"] > needed})
        labels["split"] = split
        parts.append(labels)
    labels = pd.concat(parts)
    negative_rows = labels["no_finding"] if negative == "No finding" else ~labels["positive"]
    keep = labels["positive"] | (negative_rows & ~labels["positive"])
    removed = {"neither positive nor negative": int((~keep).sum())}
    labels = labels[keep]
    image_ids = labels.index.astype(str)
    paths = [f"{split}/{image_id}.dicom" for image_id, split in zip(image_ids, labels["split"])]
    attributes = [_dicom_attributes(root / p) for p in paths]
    print("vindr_cxr: no patient ids in VinDr-CXR: every image counts as its own patient.")
    out = pd.DataFrame({"image_id": image_ids, "path": paths,
                        "label": labels["positive"].astype(int).to_numpy(),
                        "patient_id": image_ids,
                        "age": [age for _, age in attributes],
                        "official_split": labels["split"].to_numpy()})
    sexes = pd.Series([sex for sex, _ in attributes], dtype=object)
    if sexes.notna().any():
        sex, unknown = standard_sex(sexes.fillna("missing"), unknown_sex, root / "DICOM headers")
        removed["sex not M or F in the DICOM header"] = int(unknown.sum())
        out = out.assign(sex=sex.to_numpy())[~unknown.to_numpy()]
    fixed = (out["official_split"].map({"test": "test", "train": "dev"}) if official_split
             else None)
    meta = {"dataset": "vindr_cxr", "builder": "vindr_cxr", "release": "1.0.0",
            "finding": finding, "negative": negative, "readers": readers,
            "official_split": official_split, "patients": "one per image (no patient ids)"}
    return finish_manifest(out, root, out_dir, meta, removed, what="VinDr-CXR", n_folds=n_folds,
                           test_fraction=test_fraction, val_fraction=val_fraction, seed=seed,
                           missing_images=missing_images, fixed_roles=fixed,
                           unreadable_images=unreadable_images)
