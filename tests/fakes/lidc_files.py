"""A fake LIDC-IDRI download: small synthetic CT series written with pydicom, and an
annotation table, where the nodule slice and label are known by construction."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

LUNG_HU = -850.0
NODULE_HU = 40.0


@dataclass
class FakeNodule:
    slice_index: int          # index in the position-sorted volume
    row: int
    col: int
    radius: float             # pixels, in-plane, at the centre slice
    ratings: tuple[int, ...]  # one per reader

    @property
    def label(self) -> int | None:
        median = float(np.median(self.ratings))
        return None if median == 3 else int(median > 3)


@dataclass
class FakeSeries:
    patient_id: str
    series_uid: str
    hu: np.ndarray                      # (slices, rows, cols), position-sorted
    z_positions: np.ndarray             # mm, ascending
    origin_xy: tuple[float, float]
    pixel_spacing: float
    nodules: list[FakeNodule] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)

    def voxel_to_patient(self, slice_index: float, row: float, col: float):
        x = self.origin_xy[0] + col * self.pixel_spacing
        y = self.origin_xy[1] + row * self.pixel_spacing
        z = self.z_positions[0] + slice_index * (self.z_positions[1] - self.z_positions[0])
        return x, y, z


def synthetic_hu(shape, nodules: list[FakeNodule]) -> np.ndarray:
    """Lung-like background with a gradient (so slices differ) and ball-shaped nodules."""
    n, rows, cols = shape
    hu = np.full(shape, LUNG_HU, dtype=np.float32)
    hu += np.arange(n, dtype=np.float32)[:, None, None] * 10.0
    rr, cc = np.mgrid[:rows, :cols]
    for nod in nodules:
        for s in range(n):
            r2 = nod.radius ** 2 - (2.0 * (s - nod.slice_index)) ** 2
            if r2 > 0:
                hu[s][(rr - nod.row) ** 2 + (cc - nod.col) ** 2 <= r2] = NODULE_HU
    return hu


def write_ct_slice(path: Path, stored: np.ndarray, *, patient_id: str, study_uid: str,
                   series_uid: str, instance: int, position: tuple[float, float, float],
                   pixel_spacing: float, thickness: float, slope: float,
                   intercept: float) -> None:
    """One axial CT slice as a DICOM file: stored values ``stored`` (uint16, or int16 as TCIA
    stores LIDC) with HU = stored * slope + intercept."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientID = patient_id
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.Modality = "CT"
    ds.InstanceNumber = instance
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = list(position)
    ds.PixelSpacing = [pixel_spacing, pixel_spacing]
    ds.SliceThickness = thickness
    ds.RescaleSlope = slope
    ds.RescaleIntercept = intercept
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = int(stored.dtype == np.int16)  # 1: signed
    ds.PixelData = stored.tobytes()
    ds.save_as(path, enforce_file_format=True)


def write_ct_series(
    folder: Path, patient_id: str, nodules: list[FakeNodule], *, n_slices: int = 8,
    size: int = 40, pixel_spacing: float = 0.7, slice_step: float = 2.5, z0: float = -120.0,
    slope: float = 2.0, intercept: float = -1024.0, seed: int = 0,
    drop_slice: int | None = None, jitter_slice: int | None = None,
) -> FakeSeries:
    """Write one CT series as ``<folder>/<n>.dcm`` with file names and InstanceNumbers
    shuffled against the positions, stored values = (HU - intercept) / slope."""
    rng = np.random.default_rng(seed)
    hu = synthetic_hu((n_slices, size, size), nodules)
    z = z0 + slice_step * np.arange(n_slices)
    series = FakeSeries(patient_id, generate_uid(), hu, z, (-80.0, -60.0), pixel_spacing, nodules)
    study_uid = generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    names = rng.permutation(n_slices)
    for k in range(n_slices):
        if k == drop_slice:
            continue
        path = folder / f"{int(names[k]) + 1}.dcm"
        zk = float(z[k]) + (0.9 * slice_step if k == jitter_slice else 0.0)
        stored = np.round((hu[k] - intercept) / slope).astype(np.uint16)
        write_ct_slice(path, stored, patient_id=patient_id, study_uid=study_uid,
                       series_uid=series.series_uid, instance=int(names[k]) + 1,
                       position=(series.origin_xy[0], series.origin_xy[1], zk),
                       pixel_spacing=pixel_spacing, thickness=slice_step, slope=slope,
                       intercept=intercept)
        series.files.append(path)
    return series


def annotation_rows(series: FakeSeries, coordinates: str = "patient", seed: int = 0) -> list[dict]:
    """One row per reader per nodule, centroids jittered by under a pixel, nodule ids given
    per reader as in LIDC's XML (so they do not match across readers)."""
    rng = np.random.default_rng(seed)
    rows = []
    for n, nod in enumerate(series.nodules):
        for reader, rating in enumerate(nod.ratings):
            s, r, c = nod.slice_index + rng.uniform(-0.3, 0.3), *(np.array([nod.row, nod.col])
                                                                  + rng.uniform(-0.8, 0.8, 2))
            row = {"patient_id": series.patient_id, "series_uid": series.series_uid,
                   "nodule_id": f"reader{reader}-{n}", "reader": f"r{reader}",
                   "malignancy": rating}
            if coordinates == "patient":
                row.update(zip(("centroid_x", "centroid_y", "centroid_z"),
                               series.voxel_to_patient(s, r, c)))
            else:
                row.update(centroid_slice=s, centroid_row=r, centroid_col=c)
            rows.append(row)
    return rows


def make_lidc_root(root: Path, n_patients: int = 6, coordinates: str = "patient", seed: int = 0,
                   pixel_spacing: float = 0.7):
    """Patients LIDC-IDRI-0001.. in the TCIA layout, each with a malignant nodule, a benign
    one and (for odd patients) a nodule rated 3 that must be excluded. Returns the series
    and the annotation table path."""
    rng = np.random.default_rng(seed)
    all_series, rows = [], []
    for i in range(1, n_patients + 1):
        pid = f"LIDC-IDRI-{i:04d}"
        nodules = [FakeNodule(int(rng.integers(1, 4)), 8, 8, 3.0, (4, 5, 4, 3)),
                   FakeNodule(int(rng.integers(4, 7)), 30, 31, 2.5, (2, 1, 2))]
        if i % 2:  # about 15 mm from the others, so clusters stay apart
            nodules.append(FakeNodule(5, 8, 30, 2.0, (3, 3, 4, 2)))
        folder = root / pid / f"1.3.6.{i}" / f"1.3.6.{i}.1"
        series = write_ct_series(folder, pid, nodules, seed=seed + i, pixel_spacing=pixel_spacing)
        all_series.append(series)
        rows += annotation_rows(series, coordinates, seed=seed + i)
    table = root.parent / f"annotations_{coordinates}.csv"
    pd.DataFrame(rows).to_csv(table, index=False)
    return all_series, table


def read_back(path: Path) -> pydicom.Dataset:
    return pydicom.dcmread(path)
