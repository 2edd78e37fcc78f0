"""Importing split files in the paper's formats, with patient overlap reported."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pandas as pd
import pytest
from fakes.split_files import paper_style_items, write_images_for, write_paper_splits

from sm_utils.datasets import build_dataset
from sm_utils.datasets.published import (
    SplitFileError,
    SplitOverlapWarning,
    import_published_splits,
)
from sm_utils.manifest import check_split_files, find_leakage, load_manifest


@pytest.fixture
def clean_splits(tmp_path):
    items = paper_style_items(30, seed=2)
    files = write_paper_splits(tmp_path / "splits", items, n_folds=3, seed=2)
    write_images_for(items["path"], tmp_path / "images")
    return items, files, tmp_path


def test_import_reproduces_the_files_exactly(clean_splits):
    items, files, tmp_path = clean_splits
    with warnings.catch_warnings():
        warnings.simplefilter("error", SplitOverlapWarning)
        manifest = build_dataset("published_splits", tmp_path / "out", root=tmp_path / "images",
                                 test_file=files["test"], train_files=files["train"],
                                 val_files=files["val"])
    table = load_manifest(tmp_path / "out" / "manifest.csv").table.set_index("image_id")
    assert len(table) == len(items)
    for fold in range(3):
        for group, path in (("test", files["test"]), ("train", files["train"][fold]),
                            ("val", files["val"][fold])):
            names = pd.read_csv(path)["path"].map(lambda p: Path(p).name)
            assert set(table.index[table[f"fold_{fold}"] == group]) == set(names)
    labels = dict(zip(items["path"].map(lambda p: Path(p).name), (items["class"] == "YES") * 1))
    assert table["label"].to_dict() == labels
    assert table["path"].str.match(r"images_\d{3}/images/").all()
    assert manifest.meta["overlap"] == {"n_patients": 0, "by_fold": {}}


def test_split_dir_discovery_and_sex_format(tmp_path):
    items = paper_style_items(24, seed=5)
    write_paper_splits(tmp_path / "images" / "splits", items, n_folds=2, seed=5, sex_format=True)
    write_images_for(items["path"], tmp_path / "images")
    manifest = build_dataset("published_splits", tmp_path / "out", root=tmp_path / "images",
                             split_dir="splits", test_role="test_ood")  # relative to root
    assert manifest.folds == [0, 1]
    assert set(manifest.table["fold_1"]) == {"train", "val", "test_ood"}
    sexes = dict(zip(items["path"].map(lambda p: Path(p).name), items["Patient Gender"]))
    assert dict(zip(manifest.table["image_id"], manifest.table["sex"])) == sexes


def test_overlap_is_reported_not_hidden(tmp_path):
    items = paper_style_items(30, seed=3)
    files = write_paper_splits(tmp_path / "splits", items, n_folds=3, seed=3, overlap_patients=2)
    write_images_for(list(items["path"]) + files["leaked_paths"], tmp_path / "images")
    # the foundation's split-file check sees the same leak
    leaks = check_split_files({"test": files["test"], "train": files["train"][0]})
    assert sorted(leak.patient_id for leak in leaks) == files["leaked_patients"]

    with pytest.warns(SplitOverlapWarning, match=r"2 patient\(s\) are in more than one"):
        manifest, report = import_published_splits(
            tmp_path / "images", test_file=files["test"], train_files=files["train"],
            val_files=files["val"])
    assert report.n_patients == 2
    assert sorted(report.table["patient_id"].unique()) == files["leaked_patients"]
    assert len(report.table) == 6  # 2 patients x 3 folds
    assert set(report.table["groups"]) == {"test+train"}
    assert set(report.table["kept"]) == {"test"}
    table = manifest.table.set_index("image_id")
    for leaked in files["leaked_paths"]:  # the extra train image is set unused, not dropped
        assert (table.loc[Path(leaked).name, ["fold_0", "fold_1", "fold_2"]] == "unused").all()
    assert find_leakage(manifest.table) == []
    assert manifest.meta["overlap"]["n_patients"] == 2
    assert manifest.meta["overlap"]["by_fold"]["fold_0"]["images_set_unused"] == 2

    with pytest.warns(SplitOverlapWarning):
        build_dataset("published_splits", tmp_path / "out", root=tmp_path / "images",
                      test_file=files["test"], train_files=files["train"], val_files=files["val"])
    meta = json.loads((tmp_path / "out" / "manifest.meta.json").read_text())
    assert meta["overlap"]["patients"] == files["leaked_patients"]
    assert len(meta["overlap_table"]) == 6


def test_overlap_error_option(tmp_path):
    items = paper_style_items(30, seed=3)
    files = write_paper_splits(tmp_path / "splits", items, n_folds=2, seed=3, overlap_patients=1)
    write_images_for(list(items["path"]) + files["leaked_paths"], tmp_path / "images")
    with pytest.raises(SplitFileError, match=r"(?s)leak patients.*on_overlap='report'"):
        build_dataset("published_splits", tmp_path / "out", root=tmp_path / "images",
                      test_file=files["test"], train_files=files["train"],
                      val_files=files["val"], on_overlap="error")
    assert not (tmp_path / "out" / "manifest.csv").exists()


def test_custom_class_map(clean_splits):
    items, files, tmp_path = clean_splits
    for path in [files["test"], *files["train"], *files["val"]]:
        frame = pd.read_csv(path)
        frame["class"] = frame["class"].map({"YES": "Atelectasis", "NO": "No Finding"})
        frame.to_csv(path, index=False)
    manifest, _ = import_published_splits(
        tmp_path / "images", test_file=files["test"], train_files=files["train"],
        val_files=files["val"], class_map={"Atelectasis": 1, "No Finding": 0})
    assert manifest.table["label"].sum() == (items["class"] == "YES").sum()


# --- malformed split files --------------------------------------------------------------

def _import(files, root, **kw):
    return import_published_splits(root / "images", test_file=files["test"],
                                   train_files=files["train"], val_files=files["val"], **kw)


def test_unknown_class_string_lists_found_classes(clean_splits):
    _, files, tmp_path = clean_splits
    with pytest.raises(SplitFileError, match=r"class value\(s\) \['NO', 'YES'\] are not in "
                                             r"class_map.*Pass class_map="):
        _import(files, tmp_path, class_map={"pos": 1, "neg": 0})


def test_missing_column(clean_splits):
    _, files, tmp_path = clean_splits
    pd.read_csv(files["val"][1]).drop(columns="pid").to_csv(files["val"][1], index=False)
    with pytest.raises(SplitFileError, match=r"val_1\.csv lacks column\(s\) \['pid'\]"):
        _import(files, tmp_path)


def test_empty_and_garbage_files(clean_splits):
    _, files, tmp_path = clean_splits
    files["train"][0].write_text("")
    with pytest.raises(SplitFileError, match=r"train_0\.csv is not a readable CSV"):
        _import(files, tmp_path)
    files["train"][0].write_text("path,pid,class\n")
    with pytest.raises(SplitFileError, match="header but no rows"):
        _import(files, tmp_path)


def test_inconsistent_label_across_files(clean_splits):
    _, files, tmp_path = clean_splits
    val = pd.read_csv(files["val"][0])
    flipped = val.head(1).assign(**{"class": val["class"].head(1).map({"YES": "NO", "NO": "YES"})})
    pd.concat([pd.read_csv(files["train"][1]), flipped]).to_csv(files["train"][1], index=False)
    with pytest.raises(SplitFileError, match=r"1 image\(s\) are listed with different"):
        _import(files, tmp_path)


def test_fold_file_counts_must_match(clean_splits):
    _, files, tmp_path = clean_splits
    files["val"] = files["val"][:2]
    with pytest.raises(SplitFileError, match=r"3 train file\(s\) but 2 val file\(s\)"):
        _import(files, tmp_path)


def test_images_not_found(clean_splits):
    _, files, tmp_path = clean_splits
    with pytest.raises(SplitFileError, match=r"not under .*nowhere.*root="):
        import_published_splits(tmp_path / "nowhere", test_file=files["test"],
                                train_files=files["train"], val_files=files["val"])


def test_split_dir_without_test_file(tmp_path):
    (tmp_path / "splits").mkdir()
    (tmp_path / "splits" / "train_0.csv").write_text("path,pid,class\na.png,1,YES\n")
    with pytest.raises(SplitFileError, match="expected one test file"):
        import_published_splits(tmp_path, split_dir=tmp_path / "splits")


def test_one_listed_image_absent(clean_splits):
    items, files, tmp_path = clean_splits
    gone = Path(items["path"].iloc[0]).name
    next((tmp_path / "images").rglob(gone)).unlink()
    with pytest.raises(SplitFileError, match=rf"1 of {len(items)} image\(s\).*{gone}"):
        _import(files, tmp_path)
    manifest, _ = _import(files, tmp_path, missing_images="drop")
    assert gone not in set(manifest.table["image_id"])
    assert len(manifest.table) == len(items) - 1
    assert manifest.meta["images_not_found_dropped"] == 1
