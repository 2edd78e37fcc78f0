"""CT series from DICOM files: find the series of a download, read one into a volume in
Hounsfield units (slices sorted by position, spacing checked), and window it to 8 bits."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom

from ..hounsfield import window_to_uint8  # noqa: F401  (its home before sm_utils.hounsfield)
from ..manifest import ManifestError
from ..progress import progress_bar


class CTInputError(ManifestError):
    """CT input (DICOM series, their annotations) that cannot be read as given."""


@dataclass
class Volume:
    """A CT series, slices sorted by position along the slice normal.

    Only headers are read up front; :meth:`slice_hu` reads one slice's pixels (a nodule task
    needs a few slices of a series of hundreds), :attr:`hu` the whole volume.
    """

    files: list[Path]              # sorted like positions
    shape: tuple[int, int, int]    # (slices, rows, cols)
    positions: np.ndarray          # (slices, 3) ImagePositionPatient, sorted
    row_direction: np.ndarray      # direction of increasing column index
    col_direction: np.ndarray      # direction of increasing row index
    pixel_spacing: tuple[float, float]  # (between rows, between columns) in mm
    slice_spacing: float
    patient_id: str
    series_uid: str

    def slice_hu(self, index: int) -> np.ndarray:
        """Slice ``index`` in Hounsfield units: stored value * RescaleSlope + RescaleIntercept."""
        ds = pydicom.dcmread(self.files[index])
        return (ds.pixel_array.astype(np.float32) * float(ds.get("RescaleSlope", 1.0))
                + float(ds.get("RescaleIntercept", 0.0)))

    @property
    def hu(self) -> np.ndarray:
        return np.stack([self.slice_hu(k) for k in range(self.shape[0])])

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row_direction, self.col_direction)

    def voxel_to_patient(self, slice_, row, col) -> np.ndarray:
        """(slice, row, col) -> patient coordinates (x, y, z) in mm; arrays broadcast."""
        slice_, row, col = (np.asarray(v, dtype=float)[..., None] for v in (slice_, row, col))
        return (self.positions[0] + row * self.pixel_spacing[0] * self.col_direction
                + col * self.pixel_spacing[1] * self.row_direction
                + slice_ * self.slice_spacing * self.normal)

    def patient_to_voxel(self, xyz) -> np.ndarray:
        """Patient coordinates (..., 3) -> (..., 3) fractional (slice, row, col)."""
        d = np.asarray(xyz, dtype=float) - self.positions[0]
        return np.stack([d @ self.normal / self.slice_spacing,
                         d @ self.col_direction / self.pixel_spacing[0],
                         d @ self.row_direction / self.pixel_spacing[1]], axis=-1)

    def slice_at_z(self, z) -> np.ndarray:
        """Fractional slice index at patient z (mm), for axial series."""
        zs = self.positions[:, 2]
        order = np.argsort(zs)
        return np.interp(np.asarray(z, dtype=float), zs[order], np.arange(len(zs))[order])


def _ds_tuple(ds, name: str, path: Path) -> tuple[float, ...]:
    if name not in ds:
        raise CTInputError(f"{path}: DICOM attribute {name} is missing; a CT slice needs it.")
    return tuple(float(v) for v in ds[name].value)


def read_series(files: Sequence[str | Path], spacing_tolerance: float = 0.1) -> Volume:
    """Read one series; sort slices by ImagePositionPatient along the slice normal.

    Raises on mixed series, different slice geometry, duplicate positions, missing slices
    (a gap of about a multiple of the usual spacing) or otherwise inconsistent spacing
    (any step off the median by more than ``spacing_tolerance`` of it).
    """
    files = [Path(f) for f in files]
    if len(files) < 2:
        raise CTInputError(f"a CT series needs at least 2 slices; got {len(files)}: {files}.")
    slices = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    where = files[0].parent
    first = slices[0]
    uids = {str(ds.get("SeriesInstanceUID", "")) for ds in slices}
    if len(uids) > 1:
        raise CTInputError(f"{where}: files of {len(uids)} series mixed: {sorted(uids)}.")
    orientation = _ds_tuple(first, "ImageOrientationPatient", files[0])
    if "PixelSpacing" not in first:
        raise CTInputError(
            f"series {next(iter(uids))} ({where}): DICOM attribute PixelSpacing is missing from "
            f"{files[0].name}. The nodule box (roi_mm) and the dose noise (ct_noise) need the "
            "pixel size in mm: download the series again, or leave the series out (patients=)."
        )
    spacing = _ds_tuple(first, "PixelSpacing", files[0])
    shape = (int(first.Rows), int(first.Columns))
    for ds, path in zip(slices, files):
        if (_ds_tuple(ds, "ImageOrientationPatient", path) != orientation
                or _ds_tuple(ds, "PixelSpacing", path) != spacing
                or (int(ds.Rows), int(ds.Columns)) != shape):
            raise CTInputError(
                f"{path}: orientation, pixel spacing or size differs from {files[0].name} in "
                f"the same series ({where}). Remove stray files or download the series again."
            )
    row_dir, col_dir = np.array(orientation[:3]), np.array(orientation[3:])
    normal = np.cross(row_dir, col_dir)
    positions = np.array([_ds_tuple(ds, "ImagePositionPatient", p) for ds, p in zip(slices, files)])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    along = along[order]
    steps = np.diff(along)
    usual = float(np.median(steps))
    if np.any(steps <= 1e-6):
        k = int(np.argmin(steps))
        raise CTInputError(
            f"series in {where}: two slices share position {along[k]:.2f} mm "
            f"({files[order[k]].name}, {files[order[k + 1]].name}). Remove the duplicate file."
        )
    off = np.flatnonzero(np.abs(steps - usual) > spacing_tolerance * usual)
    if len(off):
        k = int(off[0])
        gap = steps[k]
        kind = ("missing slice(s)" if gap > 1.5 * usual and abs(gap / usual - round(gap / usual))
                < spacing_tolerance else "inconsistent slice spacing")
        raise CTInputError(
            f"series in {where}: {kind}: step of {gap:.2f} mm between slices at {along[k]:.2f} "
            f"and {along[k + 1]:.2f} mm where the usual step is {usual:.2f} mm "
            f"({len(off)} irregular step(s) in {len(files)} slices). Download the series "
            "again (all files), or raise spacing_tolerance= if the spacing truly varies."
        )
    return Volume(files=[files[i] for i in order], shape=(len(files), *shape),
                  positions=positions[order], row_direction=row_dir, col_direction=col_dir,
                  pixel_spacing=(spacing[0], spacing[1]), slice_spacing=usual,
                  patient_id=str(first.get("PatientID", "")), series_uid=next(iter(uids)))


def find_series(root: str | Path, patients: Sequence[str] | None = None) -> dict[str, list[Path]]:
    """Series UID -> DICOM files under ``root`` (only the patients' folders when given and
    present, as in the provider's ``LIDC-IDRI-NNNN/<study>/<series>/*.dcm`` layout)."""
    root = Path(root)
    if not root.is_dir():
        raise CTInputError(
            f"LIDC root {root} is not a directory. Pass root= the folder holding the "
            "LIDC-IDRI-NNNN patient folders as downloaded from TCIA."
        )
    folders = [root / p for p in (patients or []) if (root / p).is_dir()] or [root]
    by_directory: dict[Path, list[Path]] = {}
    with progress_bar(None, "finding DICOM files", "file") as bar:
        for folder in folders:
            for path in sorted(_counted(folder.rglob("*.dcm"), bar)):
                by_directory.setdefault(path.parent, []).append(path)
    series: dict[str, list[Path]] = {}
    for files in progress_bar(by_directory.values(), "reading DICOM series headers", "folder"):
        # TCIA puts one series per folder: read two headers, and all only if they differ
        first, last = _series_header(files[0]), _series_header(files[-1])
        headers = [first] * len(files) if first == last else [_series_header(f) for f in files]
        for path, (uid, modality) in zip(files, headers):
            if modality == "CT":
                series.setdefault(uid, []).append(path)
    if not series:
        raise CTInputError(
            f"no CT DICOM files (*.dcm) under {root}. Pass root= the folder holding the "
            "LIDC-IDRI-NNNN patient folders as downloaded from TCIA."
        )
    return series


def _counted(items, bar):
    """``items`` unchanged, counted on ``bar`` as they pass (a scan whose total is unknown)."""
    for item in items:
        bar.update(1)
        yield item


def _series_header(path: Path) -> tuple[str, str]:
    ds = pydicom.dcmread(path, stop_before_pixels=True,
                         specific_tags=["SeriesInstanceUID", "Modality"])
    return str(ds.get("SeriesInstanceUID", "")), str(ds.get("Modality", "CT"))


