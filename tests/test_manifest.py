import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from sm_utils.manifest import (
    Manifest,
    ManifestError,
    check_split_files,
    find_leakage,
    load_manifest,
    save_manifest,
    validate_manifest,
)


def make_table(n_patients=6, per_patient=2):
    rows = []
    for p in range(n_patients):
        for i in range(per_patient):
            rows.append({"image_id": f"im{p}_{i}", "path": f"images/im{p}_{i}.png",
                         "label": p % 2, "patient_id": f"p{p}", "sex": "FM"[p % 2],
                         "fold_0": ["train", "train", "train", "val", "test", "test"][p]})
    return pd.DataFrame(rows)


def write_images(root, table):
    for rel in table["path"]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / rel)


def test_round_trip_keeps_table_and_root(tmp_path):
    table = make_table()
    write_images(tmp_path, table)
    save_manifest(Manifest(table, tmp_path, {"dataset": "toy"}), tmp_path / "m.csv")
    loaded = load_manifest(tmp_path / "m.csv")
    pd.testing.assert_frame_equal(loaded.table, validate_manifest(table, check_files=False))
    assert loaded.root == tmp_path
    assert loaded.meta["dataset"] == "toy"
    assert json.loads((tmp_path / "m.meta.json").read_text())["root"] == "."
    assert list(loaded.rows(0, "test")["patient_id"].unique()) == ["p4", "p5"]
    assert loaded.attributes == ["sex"]


def test_root_outside_manifest_folder_is_recorded_absolute(tmp_path):
    images = tmp_path / "images_root"
    table = make_table()
    write_images(images, table)
    save_manifest(Manifest(table, images), tmp_path / "out" / "m.csv")
    assert load_manifest(tmp_path / "out" / "m.csv").root == images.resolve()


def test_missing_columns_are_named(tmp_path):
    with pytest.raises(ManifestError, match=r"missing required column\(s\) \['patient_id'\]"):
        validate_manifest(make_table().drop(columns="patient_id"), check_files=False)


def test_non_binary_labels_are_listed():
    table = make_table()
    table["label"] = table["label"].astype(object)
    table.loc[0, "label"] = 2
    table.loc[1, "label"] = "yes"
    with pytest.raises(ManifestError, match=r"found 2 other value\(s\): 2, yes"):
        validate_manifest(table, check_files=False)


def test_duplicate_ids_are_listed():
    table = make_table()
    table.loc[1, "image_id"] = "im0_0"
    with pytest.raises(ManifestError, match=r"1 duplicate\(s\): im0_0"):
        validate_manifest(table, check_files=False)


def test_missing_files_report_count_and_first_few(tmp_path):
    table = make_table()
    write_images(tmp_path, table.iloc[:5])
    with pytest.raises(ManifestError) as err:
        validate_manifest(table, tmp_path)
    message = str(err.value)
    assert "7 of 12 image file(s) are missing" in message
    assert "images/im2_1.png" in message and "(2 more)" in message


def test_patient_in_two_splits_is_leakage():
    table = make_table()
    table.loc[table["image_id"] == "im0_1", "fold_0"] = "test"
    with pytest.raises(ManifestError, match=r"fold_0: 1 patient\(s\) in more than one split: p0 \(test\+train\)"):
        validate_manifest(table, check_files=False)


def test_extra_test_sets_count_as_test_group():
    table = make_table()
    table.loc[table["image_id"] == "im5_1", "fold_0"] = "test_ood"
    assert find_leakage(table) == []  # test and test_ood may share a patient
    table.loc[table["image_id"] == "im3_0", "fold_0"] = "test_ood"
    leaks = find_leakage(table)
    assert [(x.patient_id, x.groups) for x in leaks] == [("p3", ("test", "val"))]


def test_unknown_role_is_rejected():
    table = make_table()
    table.loc[0, "fold_0"] = "training"
    with pytest.raises(ManifestError, match=r"unknown role\(s\) \['training'\]"):
        validate_manifest(table, check_files=False)


def test_unknown_fold_is_explained(tmp_path):
    manifest = Manifest(validate_manifest(make_table(), check_files=False), tmp_path)
    with pytest.raises(ManifestError, match=r"fold 3 does not exist: the manifest has folds \[0\]"):
        manifest.rows(3, "train")


def test_check_split_files_made_elsewhere(tmp_path):
    pd.DataFrame({"path": ["a", "b"], "pid": [1, 2]}).to_csv(tmp_path / "train.csv", index=False)
    pd.DataFrame({"path": ["c"], "pid": [3]}).to_csv(tmp_path / "val.csv", index=False)
    pd.DataFrame({"path": ["d", "e"], "pid": [2, 4]}).to_csv(tmp_path / "test.csv", index=False)
    files = {name: tmp_path / f"{name}.csv" for name in ("train", "val", "test")}
    leaks = check_split_files(files)
    assert [(x.patient_id, x.groups) for x in leaks] == [("2", ("test", "train"))]
    with pytest.raises(ManifestError, match="no patient column 'patient'"):
        check_split_files(files, patient_column="patient")


def test_missing_manifest_says_how_to_build(tmp_path):
    with pytest.raises(ManifestError, match="Build one first"):
        load_manifest(tmp_path / "nope.csv")
