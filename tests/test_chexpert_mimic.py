"""CheXpert and MIMIC-CXR-JPG from fixtures in their providers' formats (file names, column
names and orders, path patterns, label encodings with an uncertain label, a lateral view, a
patient with several studies, CheXpert's "Unknown" sex), and end to end through `sm run`
with a sampled (sex) and a synthetic (tag) confounder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from dataset_grid import run_dataset_grid
from PIL import Image

from sm_utils.datasets import build_dataset, list_datasets
from sm_utils.datasets.chexpert import FINDINGS
from sm_utils.manifest import find_leakage, load_manifest

# The providers' column orders
CHEXPERT_COLUMNS = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *FINDINGS]
MIMIC_LABEL_COLUMNS = ["subject_id", "study_id", "Atelectasis", "Cardiomegaly", "Consolidation",
                       "Edema", "Enlarged Cardiomediastinum", "Fracture", "Lung Lesion",
                       "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other",
                       "Pneumonia", "Pneumothorax", "Support Devices"]
MIMIC_METADATA_COLUMNS = ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription",
                          "ViewPosition", "Rows", "Columns", "StudyDate", "StudyTime",
                          "ProcedureCodeSequence_CodeMeaning", "ViewCodeSequence_CodeMeaning",
                          "PatientOrientationCodeSequence_CodeMeaning"]


def xray(path: Path, positive: bool, rng) -> None:
    image = rng.normal(110, 20, (64, 64))
    if positive:
        image[30:50, 10:54] += 70   # an effusion-like band low in the chest
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(path, quality=95)


def findings(effusion: float | None, rng) -> dict:
    """A row of the 14 findings: Pleural Effusion as given, No Finding 1 when it is absent."""
    row = {f: np.nan for f in FINDINGS}
    row["Pleural Effusion"] = effusion
    if effusion is None or np.isnan(effusion) or effusion == 0:
        row["No Finding"] = 1.0
    row["Support Devices"] = float(rng.random() < 0.2)
    return row


def chexpert_download(root: Path, n_patients: int = 60) -> Path:
    """CheXpert-v1.0-small/train.csv, valid.csv and JPEGs as the download has them."""
    rng = np.random.default_rng(1)
    rows = {"train": [], "valid": []}
    for patient in range(1, n_patients + 1):
        split = "valid" if patient > n_patients - 6 else "train"
        sex = "Female" if patient % 2 else "Male"
        for study in range(1, 2 + patient % 2):          # some patients have two studies
            effusion = float(rng.random() < 0.45)
            for view in (1, 2) if patient % 7 == 0 else (1,):   # a lateral beside the frontal
                lateral = view == 2
                path = (f"CheXpert-v1.0-small/{split}/patient{patient:05d}/study{study}/"
                        f"view{view}_{'lateral' if lateral else 'frontal'}.jpg")
                xray(root / path, effusion == 1.0, rng)
                rows[split].append({"Path": path, "Sex": sex, "Age": 40 + patient,
                                    "Frontal/Lateral": "Lateral" if lateral else "Frontal",
                                    "AP/PA": "" if lateral else ("PA" if study == 1 else "AP"),
                                    **findings(effusion, rng)})
    rows["train"][0]["Pleural Effusion"] = -1.0          # uncertain
    rows["train"][0]["No Finding"] = np.nan
    rows["train"][1]["Sex"] = "Unknown"
    for split, table in rows.items():
        pd.DataFrame(table, columns=CHEXPERT_COLUMNS).to_csv(
            root / f"CheXpert-v1.0-small/{split}.csv", index=False)
    return root


def mimic_download(root: Path, n_patients: int = 60) -> Path:
    """mimic-cxr-2.0.0-chexpert/-metadata.csv.gz, files/pNN/p<subject>/s<study>/<dicom>.jpg,
    and MIMIC-IV's patients.csv.gz."""
    rng = np.random.default_rng(2)
    labels, metadata, patients = [], [], []
    for i in range(n_patients):
        subject = 10000032 + 1000 * i
        patients.append({"subject_id": subject, "gender": "F" if i % 2 else "M",
                         "anchor_age": 30 + i, "anchor_year": 2150, "anchor_year_group":
                         "2008 - 2010", "dod": ""})
        for s in range(1 + i % 2):
            study = 50000000 + 100 * i + s
            effusion = float(rng.random() < 0.45)
            labels.append({"subject_id": subject, "study_id": study, **findings(effusion, rng)})
            for view in ("PA", "LATERAL") if i % 5 == 0 else ("AP" if s else "PA",):
                dicom = "-".join(f"{rng.integers(0, 16**8):08x}" for _ in range(5))
                metadata.append({"dicom_id": dicom, "subject_id": subject, "study_id": study,
                                 "PerformedProcedureStepDescription": "CHEST (PA AND LAT)",
                                 "ViewPosition": view, "Rows": 64, "Columns": 64,
                                 "StudyDate": 21800506, "StudyTime": 213014.531,
                                 "ProcedureCodeSequence_CodeMeaning": "CHEST (PA AND LAT)",
                                 "ViewCodeSequence_CodeMeaning": "postero-anterior",
                                 "PatientOrientationCodeSequence_CodeMeaning": "Erect"})
                xray(root / f"files/p{str(subject)[:2]}/p{subject}/s{study}/{dicom}.jpg",
                     effusion == 1.0, rng)
    labels[0]["Pleural Effusion"] = -1.0
    labels[0]["No Finding"] = np.nan
    pd.DataFrame(labels, columns=MIMIC_LABEL_COLUMNS).to_csv(
        root / "mimic-cxr-2.0.0-chexpert.csv.gz", index=False)
    pd.DataFrame(metadata, columns=MIMIC_METADATA_COLUMNS).to_csv(
        root / "mimic-cxr-2.0.0-metadata.csv.gz", index=False)
    pd.DataFrame(patients).to_csv(root / "patients.csv.gz", index=False)
    return root


def test_chexpert_as_downloaded(tmp_path, capsys):
    root = chexpert_download(tmp_path / "chexpert")
    built = build_dataset("chexpert", tmp_path / "out", root=root, n_folds=2)
    table = load_manifest(tmp_path / "out/manifest.csv").table      # files exist, no leakage
    removed = built.meta["rows_removed"]
    assert removed["Pleural Effusion uncertain (policy drop)"] == 1
    assert removed["sex not recognised (Unknown)"] == 1
    assert removed["view not in PA/AP"] == sum(1 for p in range(1, 61) if p % 7 == 0) * 1 + \
        sum(1 for p in range(1, 61) if p % 7 == 0 and p % 2)         # one lateral per study
    assert "rows removed" in capsys.readouterr().out
    assert set(table["view"]) == {"PA", "AP"} and set(table["sex"]) == {"F", "M"}
    assert table["patient_id"].str.fullmatch(r"patient\d{5}").all()
    assert (table.groupby("patient_id")["study"].nunique() == 2).any()
    # the labels are the file's: positives are exactly the frontal, known-sex Effusion == 1 rows
    files = pd.concat([pd.read_csv(root / f"CheXpert-v1.0-small/{s}.csv") for s in ("train", "valid")])
    expected = files[(files["Pleural Effusion"] == 1) & (files["Frontal/Lateral"] == "Frontal")
                     & (files["Sex"] != "Unknown")]
    assert sorted(table.loc[table["label"] == 1, "path"]) == sorted(expected["Path"])
    assert not find_leakage(table) and {"chexpert", "mimic_cxr_jpg"} <= set(list_datasets())
    # data_root may also be the release folder itself
    again = build_dataset("chexpert", tmp_path / "out2", root=root / "CheXpert-v1.0-small",
                          n_folds=2)
    assert again.table["path"].equals(built.table["path"])


def test_chexpert_uncertain_policies_and_bad_choices(tmp_path):
    root = chexpert_download(tmp_path / "chexpert")
    ones = build_dataset("chexpert", tmp_path / "ones", root=root, n_folds=2, uncertain="positive")
    first = "train/patient00001/study1/view1_frontal"
    assert ones.table.set_index("image_id").loc[first, "label"] == 1
    zeros = build_dataset("chexpert", tmp_path / "zeros", root=root, n_folds=2,
                          uncertain="negative", negative="absent")
    assert zeros.table.set_index("image_id").loc[first, "label"] == 0
    with pytest.raises(ValueError, match="uncertain must be one of"):
        build_dataset("chexpert", tmp_path / "x", root=root, uncertain="maybe")
    with pytest.raises(ValueError, match="finding must be one of"):
        build_dataset("chexpert", tmp_path / "x", root=root, finding="Effusion")
    with pytest.raises(ValueError, match="sex that is not recognised: 'Unknown' x1"):
        build_dataset("chexpert", tmp_path / "x", root=root, unknown_sex="error", n_folds=2)
    with pytest.raises(ValueError, match=r"no CheXpert train.csv in .*as downloaded"):
        build_dataset("chexpert", tmp_path / "x", root=tmp_path)


def test_mimic_cxr_jpg_as_downloaded(tmp_path):
    root = mimic_download(tmp_path / "mimic")
    built = build_dataset("mimic_cxr_jpg", tmp_path / "out", root=root, n_folds=2,
                          patients_csv="patients.csv.gz")
    table = load_manifest(tmp_path / "out/manifest.csv").table
    metadata = pd.read_csv(root / "mimic-cxr-2.0.0-metadata.csv.gz")
    labels = pd.read_csv(root / "mimic-cxr-2.0.0-chexpert.csv.gz")
    frontal = metadata[metadata["ViewPosition"].isin(["PA", "AP"])]
    uncertain_study = labels.loc[labels["Pleural Effusion"] == -1, "study_id"].iloc[0]
    assert len(table) == len(frontal) - (frontal["study_id"] == uncertain_study).sum()
    removed = built.meta["rows_removed"]       # images, in the order the rules run
    in_uncertain = metadata["study_id"] == uncertain_study
    assert removed["Pleural Effusion uncertain (policy drop)"] == in_uncertain.sum()
    assert removed["view not in PA/AP"] == ((metadata["ViewPosition"] == "LATERAL")
                                            & ~in_uncertain).sum()
    positives = labels.loc[labels["Pleural Effusion"] == 1, "study_id"].astype(str)
    studies = table["study"].astype(str)
    assert set(studies[table["label"] == 1]) == set(positives) & set(studies)
    assert (table["label"] == 1).any() and (table["label"] == 0).any()
    row = table.astype(str).iloc[0]
    assert row["path"] == f"files/p{row['patient_id'][:2]}/p{row['patient_id']}/s{row['study']}/{row['image_id']}.jpg"
    assert set(table["sex"]) == {"F", "M"} and table["age"].between(30, 90).all()
    assert "anchor_age" in built.meta["age"]
    without = build_dataset("mimic_cxr_jpg", tmp_path / "plain", root=root, n_folds=2)
    assert "sex" not in without.table.columns


@pytest.mark.numerics
def test_chexpert_and_mimic_grids_run_end_to_end(tmp_path):
    chexpert = chexpert_download(tmp_path / "chexpert", n_patients=80)
    mimic = mimic_download(tmp_path / "mimic", n_patients=80)
    common = {"n_folds": 2, "seed": 0, "val_fraction": 0.2}
    run_dataset_grid(tmp_path, [
        {"name": "chexpert", "manifest": str(tmp_path / "m/chexpert/manifest.csv"),
         "params": {"data_root": str(chexpert), **common}},
        {"name": "mimic_cxr_jpg", "manifest": str(tmp_path / "m/mimic/manifest.csv"),
         "params": {"data_root": str(mimic), **common,
                    "dataset_params": {"patients_csv": "patients.csv.gz"}}}])
