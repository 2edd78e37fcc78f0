"""CheXpert (Stanford) and MIMIC-CXR-JPG (PhysioNet), read from their providers' files.

Both carry the 14 findings of the CheXpert labeller, encoded alike: 1.0 positive, 0.0
negative, -1.0 uncertain, blank not mentioned. A binary task is one finding (``finding``)
against ``negative``: "No Finding" (images whose "No Finding" is 1) or "absent" (the finding
0, or blank: not mentioned). Uncertain labels follow a stated policy (``uncertain``): "drop"
(U-Ignore, the default), "positive" (U-Ones) or "negative" (U-Zeros), the policies of the
CheXpert paper (Irvin et al. 2019); the count of each is in the manifest meta.

- ``chexpert``: CheXpert v1.0 as downloaded, full size (``CheXpert-v1.0/``) or small
  (``CheXpert-v1.0-small/``): ``train.csv`` and ``valid.csv`` (columns Path, Sex, Age,
  Frontal/Lateral, AP/PA, then the findings), paths ``<release>/<split>/patientNNNNN/studyN/
  viewN_frontal.jpg``; the patient from the path. ``data_root``: the folder holding the
  release folder (or the release folder itself).
- ``mimic_cxr_jpg``: MIMIC-CXR-JPG 2.0.0 / 2.1.0: ``mimic-cxr-2.0.0-chexpert.csv(.gz)``
  (labels per study), ``mimic-cxr-2.0.0-metadata.csv(.gz)`` (ViewPosition per image),
  images ``files/pNN/p<subject_id>/s<study_id>/<dicom_id>.jpg``; the patient is subject_id.
  Sex and age are not in MIMIC-CXR-JPG: give MIMIC-IV's ``patients.csv(.gz)``
  (``patients_csv``: gender, anchor_age, the age in the patient's anchor year, which the meta
  says) to have them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..manifest import Manifest
from . import register_dataset
from .table import TableInputError, finish_manifest, keep_views, standard_sex

FINDINGS = ("No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity",
            "Lung Lesion", "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax",
            "Pleural Effusion", "Pleural Other", "Fracture", "Support Devices")
UNCERTAIN_POLICIES = {"drop": None, "positive": 1, "negative": 0}
CHEXPERT_FILES = ("train.csv", "valid.csv")
CHEXPERT_RELEASES = ("CheXpert-v1.0-small", "CheXpert-v1.0")
MIMIC_FILES = {"labels": "mimic-cxr-2.0.0-chexpert.csv", "metadata": "mimic-cxr-2.0.0-metadata.csv"}


def chexpert_labels(frame: pd.DataFrame, finding: str, negative: str, uncertain: str,
                    what: str) -> tuple[pd.DataFrame, dict[str, int]]:
    """Rows of ``frame`` with a label for ``finding`` against ``negative``; the counts removed."""
    if finding not in FINDINGS or finding == "No Finding":
        raise TableInputError(f"finding must be one of {[f for f in FINDINGS if f != 'No Finding']}; "
                              f"got {finding!r}.")
    if negative not in ("No Finding", "absent"):
        raise TableInputError(f"negative must be 'No Finding' (images labelled so) or 'absent' "
                              f"(the finding 0 or not mentioned); got {negative!r}.")
    if uncertain not in UNCERTAIN_POLICIES:
        raise TableInputError(f"uncertain must be one of {list(UNCERTAIN_POLICIES)} (U-Ignore, "
                              f"U-Ones, U-Zeros); got {uncertain!r}.")
    missing = [c for c in (finding, "No Finding") if c not in frame.columns]
    if missing:
        raise TableInputError(f"{what}: no column(s) {missing}; the findings of the CheXpert "
                              f"labeller are {list(FINDINGS)}. Is this the provider's file?")
    value = pd.to_numeric(frame[finding], errors="coerce")
    odd = frame[finding][value.notna() & ~value.isin([1.0, 0.0, -1.0])]
    if len(odd):
        raise TableInputError(f"{what}: {finding} values must be 1, 0, -1 or blank; found "
                              f"{sorted(set(odd))[:5]}.")
    removed = {}
    is_uncertain = value == -1.0
    policy = UNCERTAIN_POLICIES[uncertain]
    if policy is not None:
        value = value.where(~is_uncertain, float(policy))
    positive = value == 1.0
    if negative == "No Finding":
        negative_rows = (pd.to_numeric(frame["No Finding"], errors="coerce") == 1.0) & ~positive
    else:
        negative_rows = (value == 0.0) | value.isna()
    keep = (positive | negative_rows) & ~(is_uncertain & (policy is None))
    removed[f"{finding} uncertain (policy {uncertain})"] = int((is_uncertain & (policy is None)).sum())
    removed["neither positive nor negative"] = int((~keep).sum()) - removed[
        f"{finding} uncertain (policy {uncertain})"]
    out = frame[keep].copy()
    out["label"] = positive[keep].astype(int)
    return out, removed


def _find(root: Path, name: str) -> Path:
    for candidate in (root / name, root / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise TableInputError(f"no {name} (or {name}.gz) in {root}: expected the provider's files "
                          "as downloaded. Point data_root at the folder that holds them.")


@register_dataset("chexpert")
def build_chexpert(
    out_dir: str | Path,
    root: str | Path,
    finding: str = "Pleural Effusion",
    negative: str = "No Finding",
    uncertain: str = "drop",
    views: str | list[str] | None = ("PA", "AP"),
    csv_files: list[str] | tuple[str, ...] = CHEXPERT_FILES,
    unknown_sex: str = "drop",
    n_folds: int = 5,
    test_fraction: float = 0.2,
    val_fraction: float = 0.1,
    seed: int = 0,
    missing_images: str = "error",
    unreadable_images: str = "error",
) -> Manifest:
    """A binary CheXpert task (train.csv and valid.csv pooled, then patient-grouped splits).

    ``views``: AP/PA of frontal images ("LATERAL" for lateral ones); None keeps all.
    ``unknown_sex``: CheXpert's "Unknown" sex is dropped and counted (or "error")."""
    root, out_dir = Path(root), Path(out_dir)
    frames = []
    for name in csv_files:
        path = root / name
        for release in CHEXPERT_RELEASES:  # data_root may be the folder above the release
            if not path.is_file() and (root / release / name).is_file():
                path = root / release / name
        if not path.is_file():
            raise TableInputError(f"no CheXpert {name} in {root} or {root}/<release>: expected "
                                  f"{list(CHEXPERT_FILES)} as downloaded (releases "
                                  f"{list(CHEXPERT_RELEASES)}).")
        frames.append(pd.read_csv(path))
    frame = pd.concat(frames, ignore_index=True)
    needed = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA"]
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise TableInputError(f"{csv_files}: not CheXpert files, no column(s) {missing} "
                              f"(found {list(frame.columns)[:8]}...).")
    # paths start with the release folder: the image root is the folder above it
    release = frame["Path"].iloc[0].split("/")[0]
    image_root = root.parent if root.name == release else root
    frame, removed = chexpert_labels(frame, finding, negative, uncertain, "CheXpert")
    view = np.where(frame["Frontal/Lateral"].str.strip().str.lower() == "lateral", "LATERAL",
                    frame["AP/PA"].fillna("").astype(str).str.strip().str.upper())
    frame = frame.assign(view=view)
    frame, wanted = keep_views(frame, views, removed)
    patient = frame["Path"].str.extract(r"(patient\d+)/", expand=False)
    if patient.isna().any():
        raise TableInputError(f"CheXpert paths without a patientNNNNN folder, e.g. "
                              f"{frame['Path'][patient.isna()].iloc[0]!r}.")
    sex, unknown = standard_sex(frame["Sex"], unknown_sex, Path("CheXpert"))
    removed["sex not recognised (Unknown)"] = int(unknown.sum())
    out = pd.DataFrame({
        "image_id": frame["Path"].str.replace(r"\.jpg$", "", regex=True).str.split("/", n=1).str[1],
        "path": frame["Path"], "label": frame["label"], "patient_id": patient,
        "sex": sex, "age": pd.to_numeric(frame["Age"], errors="coerce"), "view": frame["view"],
        "study": frame["Path"].str.extract(r"/(study\d+)/", expand=False)})[~unknown.to_numpy()]
    meta = {"dataset": "chexpert", "builder": "chexpert", "release": release,
            "files": list(csv_files), "finding": finding, "negative": negative,
            "uncertain": uncertain, "views": wanted}
    return finish_manifest(out, image_root, out_dir, meta, removed, what="CheXpert",
                           n_folds=n_folds, test_fraction=test_fraction,
                           val_fraction=val_fraction, seed=seed, missing_images=missing_images,
                           unreadable_images=unreadable_images)


@register_dataset("mimic_cxr_jpg")
def build_mimic_cxr_jpg(
    out_dir: str | Path,
    root: str | Path,
    finding: str = "Pleural Effusion",
    negative: str = "No Finding",
    uncertain: str = "drop",
    views: str | list[str] | None = ("PA", "AP"),
    patients_csv: str | Path | None = None,
    n_folds: int = 5,
    test_fraction: float = 0.2,
    val_fraction: float = 0.1,
    seed: int = 0,
    missing_images: str = "error",
    unreadable_images: str = "error",
) -> Manifest:
    """A binary MIMIC-CXR-JPG task: the study's labels on each of its images, ViewPosition
    from the metadata; ``patients_csv`` (MIMIC-IV patients.csv(.gz)) adds sex and age."""
    root, out_dir = Path(root), Path(out_dir)
    labels = pd.read_csv(_find(root, MIMIC_FILES["labels"]))
    metadata = pd.read_csv(_find(root, MIMIC_FILES["metadata"]))
    for table, columns, name in ((labels, ["subject_id", "study_id"], MIMIC_FILES["labels"]),
                                 (metadata, ["dicom_id", "subject_id", "study_id", "ViewPosition"],
                                  MIMIC_FILES["metadata"])):
        missing = [c for c in columns if c not in table.columns]
        if missing:
            raise TableInputError(f"{name}: no column(s) {missing}; is this the provider's file?")
    frame = metadata.merge(labels, on=["subject_id", "study_id"], how="left", indicator=True)
    unlabelled = int((frame["_merge"] == "left_only").sum())
    frame, removed = chexpert_labels(frame[frame["_merge"] == "both"], finding, negative,
                                     uncertain, MIMIC_FILES["labels"])
    removed["study not in the labels file"] = unlabelled
    frame["view"] = frame["ViewPosition"].fillna("").astype(str).str.strip().str.upper()
    frame, wanted = keep_views(frame, views, removed)
    subject = frame["subject_id"].astype(int).astype(str)
    out = pd.DataFrame({
        "image_id": frame["dicom_id"].astype(str),
        "path": ("files/p" + subject.str[:2] + "/p" + subject + "/s"
                 + frame["study_id"].astype(int).astype(str) + "/" + frame["dicom_id"] + ".jpg"),
        "label": frame["label"], "patient_id": subject,
        "study": frame["study_id"].astype(int).astype(str), "view": frame["view"]})
    meta = {"dataset": "mimic_cxr_jpg", "builder": "mimic_cxr_jpg", "release": "2.0.0/2.1.0",
            "finding": finding, "negative": negative, "uncertain": uncertain, "views": wanted,
            "labels": "per study (CheXpert labeller), on each image of the study"}
    if patients_csv is not None:
        path = Path(patients_csv) if Path(patients_csv).is_absolute() else root / patients_csv
        if not path.is_file():
            raise TableInputError(f"patients_csv {path} does not exist (MIMIC-IV's "
                                  "hosp/patients.csv.gz).")
        patients = pd.read_csv(path)
        missing = [c for c in ("subject_id", "gender", "anchor_age") if c not in patients.columns]
        if missing:
            raise TableInputError(f"{path}: no column(s) {missing}; expected MIMIC-IV patients.")
        patients = patients.assign(patient_id=patients["subject_id"].astype(int).astype(str))
        out = out.merge(patients[["patient_id", "gender", "anchor_age"]], on="patient_id",
                        how="left")
        sex, unknown = standard_sex(out["gender"], "drop", path)
        removed["no sex in patients_csv"] = int(unknown.sum())
        out = out.assign(sex=sex, age=out["anchor_age"].astype(float))[~unknown.to_numpy()]
        out = out.drop(columns=["gender", "anchor_age"])
        meta["age"] = "MIMIC-IV anchor_age: the age in the patient's anchor year, not at the study"
    return finish_manifest(out, root, out_dir, meta, removed, what="MIMIC-CXR-JPG",
                           n_folds=n_folds, test_fraction=test_fraction,
                           val_fraction=val_fraction, seed=seed, missing_images=missing_images,
                           unreadable_images=unreadable_images)
