"""NIH ChestX-ray14 adapter on provider-format files the tests write."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from fakes.nih_files import (
    HEADER,
    Record,
    make_nih_root,
    synthetic_records,
    write_data_entry,
    write_official_lists,
    write_pngs,
)

from sm_utils.datasets import build_dataset
from sm_utils.datasets.nih import NIHInputError, parse_age, read_metadata, split_header
from sm_utils.manifest import find_leakage, load_manifest


def test_split_header_keeps_bracketed_names_whole():
    names = split_header(HEADER + ",\n")
    assert names[-3:] == ["OriginalImage[Width,Height]", "OriginalImagePixelSpacing[x,y]", ""]
    assert len(names) == 10


@pytest.mark.parametrize("value,years", [("060Y", 60.0), (60, 60.0), ("60", 60.0),
                                         ("006M", 0.5), ("  045Y ", 45.0)])
def test_parse_age(value, years):
    assert parse_age(value) == pytest.approx(years)


def test_parse_age_rejects_garbage():
    with pytest.raises(NIHInputError, match="060Y"):
        parse_age("sixty")


@pytest.mark.parametrize("variant", ["2017", "v2020"])
def test_read_metadata_both_variants(tmp_path, variant):
    records = synthetic_records(6, seed=1)
    path = write_data_entry(tmp_path / "meta.csv", records, variant)
    frame = read_metadata(path)
    assert len(frame) == len(records)
    assert frame["age"].tolist() == [float(r.age) for r in records]
    assert frame["patient_id"].tolist() == [str(r.patient_id) for r in records]
    assert frame["finding_labels"].tolist() == [r.findings for r in records]
    assert frame["width"].tolist() == [2500] * len(records)
    assert frame["pixel_spacing_y"].tolist() == [0.143] * len(records)
    assert set(frame["sex"]) <= {"M", "F"}


@pytest.mark.parametrize("variant,layout", [("2017", "provider"), ("v2020", "flat")])
def test_nih_task_manifest(tmp_path, variant, layout):
    root = tmp_path / "nih"
    records = make_nih_root(root, n_patients=60, variant=variant, layout=layout)
    manifest = build_dataset("nih_cxr14", tmp_path / "out", root=root, positive="Atelectasis",
                             negative="No Finding", views="PA", n_folds=3)
    table = manifest.table
    expected = [r for r in records if r.view == "PA"
                and (("Atelectasis" in r.findings.split("|")) or r.findings == "No Finding")]
    assert sorted(table["image_id"]) == sorted(r.image_index for r in expected)
    truth = {r.image_index: int("Atelectasis" in r.findings) for r in expected}
    assert dict(zip(table["image_id"], table["label"])) == truth
    assert set(table["view"]) == {"PA"}
    if layout == "provider":
        assert table["path"].str.match(r"images_\d{3}/images/\d{8}_\d{3}\.png").all()
    loaded = load_manifest(tmp_path / "out" / "manifest.csv")  # validates, checks files
    assert len(loaded.table) == len(expected)
    assert not find_leakage(loaded.table)
    assert set(loaded.table["fold_0"]) == {"train", "val", "test"}


def test_multi_label_query_and_sampling(tmp_path):
    root = tmp_path / "nih"
    records = make_nih_root(root, n_patients=80)
    manifest = build_dataset("nih_cxr14", tmp_path / "out", root=root,
                             positive="Effusion|Cardiomegaly", negative="No Finding", views=None,
                             n_positive=20, n_negative=15, seed=3)
    table = manifest.table
    assert (table["label"] == 1).sum() == 20 and (table["label"] == 0).sum() == 15
    findings = {r.image_index: set(r.findings.split("|")) for r in records}
    for image_id, label in zip(table["image_id"], table["label"]):
        assert bool(findings[image_id] & {"Effusion", "Cardiomegaly"}) == bool(label)
    again = build_dataset("nih_cxr14", tmp_path / "out2", root=root,
                          positive="Effusion|Cardiomegaly", negative="No Finding", views=None,
                          n_positive=20, n_negative=15, seed=3)
    pd.testing.assert_frame_equal(table, again.table)


def test_official_split_is_the_fixed_test_set(tmp_path):
    root = tmp_path / "nih"
    records = make_nih_root(root, n_patients=60)
    test_patients = set(range(1, 61, 4))
    write_official_lists(root, records, test_patients)
    manifest = build_dataset("nih_cxr14", tmp_path / "out", root=root, views=None,
                             official_split=True, n_folds=2)
    table = manifest.table
    is_test = table["patient_id"].astype(int).isin(test_patients)
    for fold in ("fold_0", "fold_1"):
        assert (table.loc[is_test, fold] == "test").all()
        assert set(table.loc[~is_test, fold]) == {"train", "val"}
    assert (table["fold_0"] == "val").sum() > 0
    assert not (table.loc[table["fold_0"] == "val", "image_id"].isin(
        table.loc[table["fold_1"] == "val", "image_id"])).any()


def test_sex_task_is_leak_free_with_paper_structure(tmp_path):
    root = tmp_path / "nih"
    records = [Record(f"{pid:08d}_{k:03d}.png", finding, k, pid, 50, sex, "PA")
               for pid in range(1, 121)
               for sex in ["MF"[pid % 2]]
               for k, finding in enumerate(["Atelectasis", "No Finding", "Atelectasis|Effusion"]
                                           [: 1 + pid % 3])]
    records.append(Record("00000999_000.png", "Atelectasis", 0, 999, 40, "M", "AP"))  # wrong view
    write_data_entry(root / "Data_Entry_2017_v2020.csv", records)
    write_pngs(root, records)
    sizes = {"n_dev_female_positive": 8, "n_dev_male_positive": 8, "n_dev_male_negative": 8,
             "n_test_male_positive": 8, "n_test_female_negative": 8, "n_iid_test_per_group": 4}
    build_dataset("nih_sex_task", tmp_path / "out", root=root, n_folds=5,
                  val_fraction=0.15, seed=812, **sizes)
    table = load_manifest(tmp_path / "out" / "manifest.csv").table
    test = table[table["fold_0"] == "test_ood"]
    iid = table[table["fold_0"] == "test"]
    dev = table[table["fold_0"].isin(["train", "val"])]
    assert sorted(zip(test["sex"], test["label"])) == [("F", 0)] * 8 + [("M", 1)] * 8
    cells = dev.groupby(["sex", "label"]).size().to_dict()
    assert cells == {("F", 1): 8, ("M", 1): 8, ("M", 0): 8}
    # our i.i.d. pool: every sex/class group, so a run can draw any p and a balanced clean set
    assert iid.groupby(["sex", "label"]).size().to_dict() == {
        ("F", 0): 4, ("F", 1): 4, ("M", 0): 4, ("M", 1): 4}
    for a, b in ((dev, test), (dev, iid), (iid, test)):
        assert set(a["patient_id"]).isdisjoint(b["patient_id"])
    assert find_leakage(table) == []
    assert "00000999_000.png" not in set(table["image_id"])
    for k in range(5):
        assert set(table[f"fold_{k}"]) == {"train", "val", "test_ood", "test"}
        assert (table[f"fold_{k}"] == "test_ood").sum() == 16
    meta = json.loads((tmp_path / "out" / "manifest.meta.json").read_text())
    assert meta["counts"]["test_ood_M_1"] == 8 and meta["counts"]["dev_F_1"] == 8
    assert meta["counts"]["test_F_0"] == 4 and meta["iid_test"].startswith("ours")
    assert meta["patients_in_dev_and_test"] == 0


def test_sex_task_without_the_iid_pool_is_the_papers_structure(tmp_path):
    root = tmp_path / "nih"
    make_nih_root(root, n_patients=120, seed=3)
    sizes = {"n_dev_female_positive": 8, "n_dev_male_positive": 8, "n_dev_male_negative": 8,
             "n_test_male_positive": 3, "n_test_female_negative": 3, "n_iid_test_per_group": 0}
    build_dataset("nih_sex_task", tmp_path / "out", root=root, n_folds=2, seed=1,
                  val_fraction=0.25, **sizes)
    table = load_manifest(tmp_path / "out" / "manifest.csv").table
    assert set(table["fold_0"]) == {"train", "val", "test_ood"}


def test_our_iid_pool_never_starves_the_papers_pools(tmp_path):
    """On a small data set the paper's pools come first: a shortfall is our i.i.d. pool's, and
    the error names its parameter."""
    root = tmp_path / "nih"
    records = [Record(f"{pid:08d}_{k:03d}.png", finding, k, pid, 50, sex, "PA")
               for pid in range(1, 121)
               for sex in ["MF"[pid % 2]]
               for k, finding in enumerate(["Atelectasis", "No Finding", "Atelectasis|Effusion"]
                                           [: 1 + pid % 3])]
    write_data_entry(root / "Data_Entry_2017_v2020.csv", records)
    write_pngs(root, records)
    sizes = {"n_dev_female_positive": 14, "n_dev_male_positive": 14, "n_dev_male_negative": 14,
             "n_test_male_positive": 8, "n_test_female_negative": 8}
    build_dataset("nih_sex_task", tmp_path / "paper", root=root, n_folds=2, seed=812,
                  n_iid_test_per_group=0, **sizes)  # the paper's pools alone fit
    with pytest.raises(NIHInputError, match=r"need 40 \(n_iid_test_per_group\)") as err:
        build_dataset("nih_sex_task", tmp_path / "out", root=root, n_folds=2, seed=812,
                      n_iid_test_per_group=40, **sizes)
    assert "n_dev_" not in str(err.value).split(". Images")[0]
    assert "(n_test_" not in str(err.value)


def test_sex_task_too_few_images_says_what_is_available(tmp_path):
    root = tmp_path / "nih"
    make_nih_root(root, n_patients=20)
    with pytest.raises(NIHInputError, match=r"not enough images.*Lower the pool sizes"):
        build_dataset("nih_sex_task", tmp_path / "out", root=root)


# --- bad inputs -------------------------------------------------------------------------

def test_wrong_root(tmp_path):
    with pytest.raises(NIHInputError, match="is not a directory"):
        build_dataset("nih_cxr14", tmp_path / "out", root=tmp_path / "nowhere")


def test_missing_metadata_file(tmp_path):
    (tmp_path / "nih").mkdir()
    with pytest.raises(NIHInputError, match=r"no NIH metadata file.*Data_Entry_2017_v2020\.csv"):
        build_dataset("nih_cxr14", tmp_path / "out", root=tmp_path / "nih")


def test_not_a_metadata_file(tmp_path):
    root = tmp_path / "nih"
    root.mkdir()
    (root / "Data_Entry_2017.csv").write_text("a,b\n1,2\n")
    with pytest.raises(NIHInputError, match="header lacks"):
        build_dataset("nih_cxr14", tmp_path / "out", root=root)


def test_images_listed_but_absent(tmp_path):
    root = tmp_path / "nih"
    records = make_nih_root(root, n_patients=30, skip=("00000003_000.png",))
    with pytest.raises(NIHInputError, match=r"1 of \d+ images .* absent.*00000003_000\.png"):
        build_dataset("nih_cxr14", tmp_path / "out", root=root, views=None,
                      positive="Atelectasis|Effusion|Cardiomegaly|Nodule")
    assert not (tmp_path / "out" / "manifest.csv").exists()
    manifest = build_dataset("nih_cxr14", tmp_path / "out", root=root, views=None,
                             positive="Atelectasis|Effusion|Cardiomegaly|Nodule",
                             missing_images="drop")
    assert "00000003_000.png" not in set(manifest.table["image_id"])
    assert len(manifest.table) == len(records) - 1
    assert manifest.meta["absent_images_dropped"] == 1


def test_unknown_finding_lists_valid_ones(tmp_path):
    root = tmp_path / "nih"
    make_nih_root(root, n_patients=20)
    with pytest.raises(NIHInputError, match=r"unknown finding.*'Atelektasis'.*Valid findings: "
                                            r"Atelectasis, Cardiomegaly"):
        build_dataset("nih_cxr14", tmp_path / "out", root=root, positive="Atelektasis")


def test_unknown_view(tmp_path):
    root = tmp_path / "nih"
    make_nih_root(root, n_patients=20)
    with pytest.raises(NIHInputError, match="valid views: PA, AP"):
        build_dataset("nih_cxr14", tmp_path / "out", root=root, views="LL")


def test_truncated_row(tmp_path):
    root = tmp_path / "nih"
    records = make_nih_root(root, n_patients=5)
    path = root / "Data_Entry_2017_v2020.csv"
    path.write_text(path.read_text() + "00000099_000.png,No Finding,0\n")
    with pytest.raises(NIHInputError, match=rf"line {len(records) + 2}: expected 11 fields"):
        build_dataset("nih_cxr14", tmp_path / "out", root=root)


def test_missing_official_lists(tmp_path):
    root = tmp_path / "nih"
    make_nih_root(root, n_patients=30)
    with pytest.raises(NIHInputError, match=r"train_val_list\.txt.*official_split=False"):
        build_dataset("nih_cxr14", tmp_path / "out", root=root, official_split=True)


def test_header_resaved_with_quotes(tmp_path):
    """A copy re-saved by a spreadsheet quotes the bracketed names; still one name each."""
    records = synthetic_records(3, seed=2)
    path = write_data_entry(tmp_path / "meta.csv", records, "v2020")
    text = path.read_text().replace("OriginalImage[Width,Height]", '"OriginalImage[Width,Height]"')
    path.write_text(text)
    frame = read_metadata(path)
    assert frame["height"].tolist() == [2048] * len(records)


def test_unreadable_images_are_all_named_at_once_or_dropped_and_counted(tmp_path, monkeypatch):
    """Three damaged files among the provider's PNGs (truncated, overwritten, empty): the build
    names all three in one error; with unreadable_images="drop" it finishes without them."""
    monkeypatch.setenv("SM_CACHE_DIR", str(tmp_path / "cache"))
    root = tmp_path / "nih"
    records = make_nih_root(root, n_patients=30)
    files = {p.name: p for p in root.rglob("*.png")}
    damaged = sorted(files)[3:6]
    whole = files[damaged[0]].read_bytes()
    files[damaged[0]].write_bytes(whole[: len(whole) // 2])           # a download cut short
    files[damaged[1]].write_bytes(b"<html>503 Service Unavailable</html>")  # an error page
    files[damaged[2]].write_bytes(b"")                                   # an empty file
    task = {"views": None, "positive": "Atelectasis|Effusion|Cardiomegaly|Nodule"}
    with pytest.raises(ValueError, match=r"3 of \d+ images under .* cannot be read") as err:
        build_dataset("nih_cxr14", tmp_path / "out", root=root, **task)
    assert sorted(Path(p).name for p in err.value.unreadable) == damaged
    assert all(name in str(err.value) for name in damaged)
    assert not (tmp_path / "out" / "manifest.csv").exists()
    manifest = build_dataset("nih_cxr14", tmp_path / "out", root=root, unreadable_images="drop",
                             **task)
    assert manifest.meta["unreadable_images_dropped"] == 3
    assert sorted(manifest.meta["unreadable_images"]) == damaged
    assert len(manifest.table) == len(records) - 3
    assert not set(damaged) & set(manifest.table["image_id"])
