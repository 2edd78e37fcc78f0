"""PadChest and VinDr-CXR from fixtures in their providers' formats: PadChest's label file
(its column order, Labels as list literals with an 'exclude' report, a lateral, an 'O' sex,
16-bit PNGs in numbered folders, a patient with two studies); VinDr-CXR's annotations (three
readers per training image, the consensus test file with its 'Other disease' column) and DICOM
images; and end to end through `sm run` with sex and tag."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from dataset_grid import run_dataset_grid
from PIL import Image

from sm_utils.datasets import build_dataset, list_datasets
from sm_utils.datasets.padchest_vindr import PADCHEST_CSV, VINDR_LABELS
from sm_utils.manifest import find_leakage, load_manifest

PADCHEST_COLUMNS = [
    "ImageID", "ImageDir", "StudyDate_DICOM", "StudyID", "PatientID", "PatientBirth",
    "PatientSex_DICOM", "ViewPosition_DICOM", "Projection", "MethodProjection",
    "Pediatric", "Modality_DICOM", "Manufacturer_DICOM", "PhotometricInterpretation_DICOM",
    "PixelRepresentation_DICOM", "PixelAspectRatio_DICOM", "SpatialResolution_DICOM",
    "BitsStored_DICOM", "WindowCenter_DICOM", "WindowWidth_DICOM", "Rows_DICOM",
    "Columns_DICOM", "XRayTubeCurrent_DICOM", "Exposure_DICOM", "ExposureInuAs_DICOM",
    "ExposureTime", "RelativeXRayExposure_DICOM", "ReportID", "Report", "MethodLabel",
    "Labels", "Localizations", "LabelsLocalizationsBySentence", "labelCUIS",
    "LocalizationsCUIS"]


def xray16(path, positive: bool, rng) -> None:
    image = rng.normal(2000, 300, (64, 64))
    if positive:
        image[30:50, 10:54] += 1500
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(image, 0, 4095).astype(np.uint16)).save(path)


def padchest_download(root, n_patients: int = 80):
    rng = np.random.default_rng(3)
    rows = []
    for patient in range(n_patients):
        for study in range(1 + patient % 2):
            effusion = rng.random() < 0.45
            image_id = f"2168401113669640{patient:05d}{study}_00-0{patient % 90:02d}-1{study}.png"
            folder = patient % 3
            projection = "L" if patient % 9 == 0 and study else "PA" if study == 0 else "AP"
            labels = ["pleural effusion", "cardiomegaly"] if effusion else ["normal"]
            xray16(root / str(folder) / image_id, effusion, rng)
            rows.append({c: "" for c in PADCHEST_COLUMNS} | {
                "ImageID": image_id, "ImageDir": folder, "StudyDate_DICOM": 20140603 + study,
                "StudyID": f"s{patient}_{study}", "PatientID": f"pat{patient}",
                "PatientBirth": 1940.0 + patient % 40, "PatientSex_DICOM": "F" if patient % 2 else "M",
                "ViewPosition_DICOM": "POSTEROANTERIOR", "Projection": projection,
                "MethodLabel": "Physician" if patient % 4 == 0 else "RNN_model",
                "Labels": str(labels) if not effusion else "['pleural effusion', ' cardiomegaly']"})
    rows[2]["Labels"] = "['exclude']"
    rows[5]["PatientSex_DICOM"] = "O"
    rows[7]["Labels"] = ""
    pd.DataFrame(rows, columns=PADCHEST_COLUMNS).to_csv(root / PADCHEST_CSV, index=False)
    return root


def dicom(path, pixels, sex, age) -> None:
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, 16, 12, 11
    ds.PixelRepresentation, ds.PhotometricInterpretation = 0, "MONOCHROME2"
    if sex is not None:
        ds.PatientSex = sex
    if age is not None:
        ds.PatientAge = age
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def vindr_download(root, n_train: int = 70, n_test: int = 30):
    rng = np.random.default_rng(4)
    train, test = [], []
    columns = list(VINDR_LABELS)
    for i in range(n_train + n_test):
        image_id = "".join(f"{v:08x}" for v in rng.integers(0, 16**8, size=4))
        effusion = rng.random() < 0.45
        pixels = rng.normal(2000, 300, (32, 32)) + (np.pad(np.full((10, 20), 1500), 11)[:32, :32]
                                                   if effusion else 0)
        split = "train" if i < n_train else "test"
        dicom(root / split / f"{image_id}.dicom", np.clip(pixels, 0, 4095),
              "F" if i % 2 else "M", f"{40 + i % 40:03d}Y")
        if split == "train":   # three readers; the third disagrees on every fifth image
            for reader, rad in enumerate(("R8", "R9", "R10")):
                vote = effusion if not (reader == 2 and i % 5 == 0) else not effusion
                train.append({"image_id": image_id, "rad_id": rad, **dict.fromkeys(columns, 0),
                              "Pleural effusion": int(vote), "No finding": int(not vote)})
        else:
            test.append({"image_id": image_id, **dict.fromkeys(columns, 0),
                         "Pleural effusion": int(effusion), "No finding": int(not effusion)})
    (root / "annotations").mkdir(parents=True)
    pd.DataFrame(train, columns=["image_id", "rad_id", *columns]).to_csv(
        root / "annotations/image_labels_train.csv", index=False)
    test_columns = ["image_id", *[c if c != "Other diseases" else "Other disease" for c in columns]]
    pd.DataFrame(test).rename(columns={"Other diseases": "Other disease"})[test_columns].to_csv(
        root / "annotations/image_labels_test.csv", index=False)
    return root


def test_padchest_as_downloaded(tmp_path, capsys):
    root = padchest_download(tmp_path / "padchest")
    built = build_dataset("padchest", tmp_path / "out", root=root, n_folds=2)
    table = load_manifest(tmp_path / "out/manifest.csv").table
    removed = built.meta["rows_removed"]
    assert removed["report labelled exclude or suboptimal study"] == 1
    assert removed["no labels"] == 1 and removed["sex not M or F"] == 1
    assert removed["view not in PA/AP"] == sum(1 for p in range(80) if p % 9 == 0 and p % 2)
    assert built.meta["sixteen_bit_converted"] == len(table)
    assert "rows removed" in capsys.readouterr().out
    first = table.iloc[0]
    png = np.asarray(Image.open(tmp_path / "out" / first["path"]))
    assert png.dtype == np.uint8 and png.min() == 0 and png.max() == 255   # stretched, not clipped
    source = pd.read_csv(root / PADCHEST_CSV).set_index("PatientID")
    birth = source.loc[str(first["patient_id"]), "PatientBirth"]
    birth = birth.iloc[0] if hasattr(birth, "iloc") else birth
    assert first["age"] in (2014 - birth,)
    assert set(table["sex"]) == {"F", "M"} and set(table["view"]) == {"PA", "AP"}
    assert (table.groupby("patient_id")["study"].nunique() == 2).any() and not find_leakage(table)
    physician = build_dataset("padchest", tmp_path / "p", root=root, n_folds=2,
                              labelled_by="Physician", val_fraction=0.2)
    assert set(physician.table["labelled_by"]) == {"Physician"}
    with pytest.raises(ValueError, match="no PadChest report is labelled 'effusion'"):
        build_dataset("padchest", tmp_path / "x", root=root, finding="effusion")


def test_vindr_cxr_as_downloaded(tmp_path, capsys):
    root = vindr_download(tmp_path / "vindr")
    built = build_dataset("vindr_cxr", tmp_path / "out", root=root, n_folds=2)
    table = load_manifest(tmp_path / "out/manifest.csv").table
    assert "every image counts as its own patient" in capsys.readouterr().out
    assert len(table) == 100 and built.meta["dicom_converted"] == 100
    train = pd.read_csv(root / "annotations/image_labels_train.csv")
    majority = train.groupby("image_id")["Pleural effusion"].sum() >= 2
    labels = table.set_index("image_id")["label"]
    assert (labels[majority.index] == majority.astype(int)).all()   # 2 of 3 readers
    anyone = build_dataset("vindr_cxr", tmp_path / "any", root=root, n_folds=2, readers="any")
    any_labels = anyone.table.set_index("image_id")["label"]
    assert any_labels[majority.index].sum() > labels[majority.index].sum()
    test_ids = set(pd.read_csv(root / "annotations/image_labels_test.csv")["image_id"])
    for fold in ("fold_0", "fold_1"):   # the official test set is the fixed test set
        assert set(table.loc[table[fold] == "test", "image_id"]) == test_ids
    assert set(table["sex"]) == {"F", "M"} and table["age"].between(40, 80).all()
    assert {"padchest", "vindr_cxr"} <= set(list_datasets())


@pytest.mark.numerics
def test_padchest_and_vindr_grids_run_end_to_end(tmp_path):
    padchest = padchest_download(tmp_path / "padchest", n_patients=120)
    vindr = vindr_download(tmp_path / "vindr", n_train=110, n_test=40)
    common = {"n_folds": 2, "seed": 0, "val_fraction": 0.2}
    run_dataset_grid(tmp_path, [
        {"name": "padchest", "manifest": str(tmp_path / "m/padchest/manifest.csv"),
         "params": {"data_root": str(padchest), **common}},
        {"name": "vindr_cxr", "manifest": str(tmp_path / "m/vindr/manifest.csv"),
         "params": {"data_root": str(vindr), **common}}])
