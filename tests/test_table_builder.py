"""Your own data (builder ``table``): a labels file beside a folder of images, as a researcher
has it. Label rules, patients, attributes (sex, age, view), missing images and DICOM, each
with the error a user gets; end to end through `sm run` from a grid file outside the project,
with a sampled confounder (sex) and a synthetic one (tag)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from dataset_grid import run_dataset_grid
from PIL import Image

from sm_utils.datasets import build_dataset, list_datasets
from sm_utils.manifest import find_leakage, load_manifest

ROOT = Path(__file__).resolve().parents[1]


def user_folder(folder: Path, n_patients: int = 40, seed: int = 0) -> Path:
    """images/<patient>_<study>.png and labels.csv as a researcher's export has them:
    findings as words (one 'uncertain'), sex as words, ages as DICOM strings, views lower-case;
    positives carry a bright blob, so a model can learn the task."""
    rng = np.random.default_rng(seed)
    rows = []
    (folder / "images").mkdir(parents=True)
    for patient in range(n_patients):
        sex = "Female" if patient % 2 else "Male"
        for study in range(1 + patient % 3):
            positive = rng.random() < 0.45
            image = rng.normal(100, 20, (64, 64))
            if positive:
                image[20:40, 20:40] += 80
            name = f"images/p{patient:03d}_s{study}.png"
            Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(folder / name)
            rows.append({"file": name, "finding": "effusion" if positive else "normal",
                         "patient": f"p{patient:03d}", "Sex": sex,
                         "Age": f"{30 + patient:03d}Y", "View": "pa" if study < 2 else "ap"})
    rows[3]["finding"] = "uncertain"
    pd.DataFrame(rows).to_csv(folder / "labels.csv", index=False)
    return folder


PARAMS = {"table": "labels.csv", "path_column": "file", "label_column": "finding",
          "positive": "effusion", "negative": "normal", "other_labels": "drop",
          "patient_column": "patient",
          "attributes": {"Sex": "sex", "Age": "age", "View": "view"}, "n_folds": 2}


def test_a_users_table_becomes_a_manifest_with_standard_attributes(tmp_path, capsys):
    data = user_folder(tmp_path / "my_data")
    built = build_dataset("table", tmp_path / "out", root=data, **PARAMS)
    labels = pd.read_csv(data / "labels.csv")
    table = load_manifest(tmp_path / "out/manifest.csv").table   # validated, files checked
    assert len(table) == len(labels) - 1                          # the uncertain one dropped
    assert built.meta["rows_removed"] == {"label outside the rule": 1}
    assert "table: rows removed: 1 (label outside the rule)" in capsys.readouterr().out
    assert set(table["sex"]) == {"F", "M"} and set(table["view"]) == {"PA", "AP"}
    first = table.set_index("image_id").loc["images/p000_s0"]
    assert first["age"] == 30.0 and first["label"] == int(labels.loc[0, "finding"] == "effusion")
    assert table["patient_id"].nunique() == 40 and not find_leakage(table)
    assert "table" in list_datasets()


def test_a_flat_folder_with_a_labels_file_works_out_of_the_box(tmp_path, capsys):
    folder = tmp_path / "flat"
    folder.mkdir()
    rows = []
    for i in range(30):
        Image.fromarray(np.full((8, 8), i, dtype=np.uint8)).save(folder / f"{i}.png")
        rows.append({"path": f"{i}.png", "label": i % 2})
    pd.DataFrame(rows).to_csv(folder / "labels.csv", index=False)
    built = build_dataset("table", tmp_path / "out", root=folder)
    assert len(built.table) == 30 and built.meta["patients"] == "one per image (no patient column)"
    assert "every image counts as its own patient" in capsys.readouterr().out


def test_label_values_outside_the_rule_are_an_error_that_says_how_to_fix_it(tmp_path):
    data = user_folder(tmp_path / "my_data")
    params = {**PARAMS, "other_labels": "error"}
    with pytest.raises(ValueError, match=r"1 row\(s\) have finding values outside the label rule"
                                         r".*'uncertain' x1.*other_labels='drop'"):
        build_dataset("table", tmp_path / "out", root=data, **params)
    assert not (tmp_path / "out/manifest.csv").exists()


def test_unrecognised_sex_is_an_error_or_dropped_and_counted(tmp_path):
    data = user_folder(tmp_path / "my_data")
    labels = pd.read_csv(data / "labels.csv")
    labels.loc[[0, 5], "Sex"] = ["O", "Unknown"]
    labels.to_csv(data / "labels.csv", index=False)
    with pytest.raises(ValueError, match=r"2 row\(s\) have a sex that is not recognised: 'O' x1, "
                                         r"'Unknown' x1.*unknown_sex='drop'"):
        build_dataset("table", tmp_path / "out", root=data, **PARAMS)
    built = build_dataset("table", tmp_path / "out", root=data, unknown_sex="drop", **PARAMS)
    assert built.meta["rows_removed"]["sex not recognised"] == 2
    assert len(built.table) == len(labels) - 3


def test_ages_in_months_or_dicom_strings_become_years(tmp_path):
    data = user_folder(tmp_path / "my_data")
    labels = pd.read_csv(data / "labels.csv")
    labels["Age"] = 24 * np.arange(len(labels))  # months
    labels.loc[0, "Age"] = 600
    labels.to_csv(data / "labels.csv", index=False)
    built = build_dataset("table", tmp_path / "out", root=data, age_unit="months", **PARAMS)
    ages = built.table.set_index("image_id")["age"]
    assert ages["images/p000_s0"] == 50.0 and ages["images/p001_s0"] == 2.0
    labels["Age"] = "054Y"
    labels.loc[0, "Age"] = "054X"
    labels.to_csv(data / "labels.csv", index=False)
    with pytest.raises(ValueError, match="cannot read patient age '054X'"):
        build_dataset("table", tmp_path / "out", root=data, **PARAMS)


def test_a_missing_patient_column_and_missing_images_say_what_to_do(tmp_path):
    data = user_folder(tmp_path / "my_data")
    with pytest.raises(ValueError, match=r"no patient column 'Patient ID'; the table has \['file'"):
        build_dataset("table", tmp_path / "out", root=data,
                      **{**PARAMS, "patient_column": "Patient ID"})
    (data / "images/p000_s0.png").unlink()
    with pytest.raises(ValueError, match=r"1 of \d+ images listed in labels.csv are absent under "
                                         r".*images/p000_s0.png.*missing_images='drop'"):
        build_dataset("table", tmp_path / "out", root=data, **PARAMS)
    built = build_dataset("table", tmp_path / "out", root=data, missing_images="drop", **PARAMS)
    assert built.meta["rows_removed"]["image missing"] == 1


def test_dicom_images_are_converted_once_with_monochrome1_inverted(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    folder = tmp_path / "dicom"
    folder.mkdir()
    rows = []
    for i in range(40):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        pixels = np.zeros((16, 16), dtype=np.uint16)
        pixels[:, 8:] = 1000                            # right half: the highest stored value
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, 16, 12, 11
        ds.PixelRepresentation = 0
        ds.PhotometricInterpretation = "MONOCHROME1"   # high values are dark
        ds.RescaleSlope, ds.RescaleIntercept = 1, 0
        ds.PixelData = pixels.tobytes()
        ds.save_as(folder / f"{i}.dcm", enforce_file_format=True)
        rows.append({"path": f"{i}.dcm", "label": i % 2, "patient": f"P{i}"})
    pd.DataFrame(rows).to_csv(folder / "labels.csv", index=False)
    built = build_dataset("table", tmp_path / "out", root=folder, patient_column="patient")
    assert built.meta["dicom_converted"] == 40
    png = np.asarray(Image.open(tmp_path / "out/images/0.png"))
    assert png[0, 0] == 255 and png[0, 15] == 0        # MONOCHROME1 inverted: bright on the left
    load_manifest(tmp_path / "out/manifest.csv")       # its paths point at the PNGs


@pytest.mark.numerics
def test_a_grid_on_a_users_own_table_runs_from_a_file_outside_the_project(tmp_path):
    """The grid file, the data and the runs all live outside the checkout; sex (sampled from
    the table's own column) and tag (synthetic) confounders at p = 1, one fold, one source."""
    data = user_folder(tmp_path / "my_data", n_patients=100)
    run_dataset_grid(tmp_path, [{
        "name": "my_cxr", "builder": "table",
        "manifest": str(tmp_path / "manifests/my_cxr/manifest.csv"),
        "params": {"data_root": str(data), "n_folds": 2, "seed": 0, "val_fraction": 0.2,
                   "dataset_params": {k: v for k, v in PARAMS.items() if k != "n_folds"}}}])
    manifest = load_manifest(tmp_path / "manifests/my_cxr/manifest.csv")
    assert manifest.meta["rows_removed"] == {"label outside the rule": 1}
