"""CT slices in Hounsfield units: how a CT manifest stores them, windows them and cuts a box.

The LIDC-IDRI builder stores every slice whole, in HU, as a 16-bit PNG (value = HU + 1024, so
air at -1000 HU is 24; the scanner's padding below -1024 HU becomes -1024). Each row says how
its slice becomes an 8-bit image with columns of its own (so every part of the pipeline that
gets rows gets this too):

- ``window_centre``, ``window_width``: the display window (HU), applied last;
- ``pixel_spacing_row_mm``, ``pixel_spacing_col_mm``: the slice's true pixel size (DICOM);
- ``roi_row0, roi_col0, roi_row1, roi_col1`` (``image: roi``): the box, in slice pixels, of a
  fixed physical size around the row's nodule; absent or empty: the whole slice.

A row's model input is made in this order (:class:`SliceView`): the stored slice in HU, then a
confounder acting on the stored image (``ct_noise`` in HU at the slice's own pixel spacing),
then the box, then the window to 8 bits, then the resize to the model input. Windowing last
keeps dose noise on the HU values that a lung window would otherwise clip.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

HU_OFFSET = 1024  # stored 16-bit value = HU + HU_OFFSET
HU_MIN, HU_MAX = -HU_OFFSET, 65535 - HU_OFFSET
WINDOW_COLUMNS = ("window_centre", "window_width")
SPACING_COLUMNS = ("pixel_spacing_row_mm", "pixel_spacing_col_mm")
ROI_COLUMNS = ("roi_row0", "roi_col0", "roi_row1", "roi_col1")


class HounsfieldError(ValueError):
    """A CT slice, window or region of interest that cannot be used as given."""


def write_hu_png(path: str | Path, hu: np.ndarray) -> None:
    """Write a slice in HU as a 16-bit grey PNG (rounded to whole HU, clipped to the range)."""
    stored = np.clip(np.rint(np.asarray(hu, dtype=np.float64)) + HU_OFFSET, 0, 65535)
    Image.fromarray(stored.astype(np.uint16)).save(path, format="PNG")


def read_hu_png(path: str | Path) -> np.ndarray:
    """A slice written by :func:`write_hu_png`, in HU (float32)."""
    try:
        with Image.open(path) as img:
            if img.mode not in ("I;16", "I"):
                raise HounsfieldError(
                    f"{path}: expected a 16-bit grey PNG of HU + {HU_OFFSET}; found mode "
                    f"{img.mode!r}. Rebuild the CT dataset (it stores slices in HU)."
                )
            stored = np.asarray(img, dtype=np.float32)
    except OSError as err:
        raise HounsfieldError(f"cannot read CT slice {path}: {err}. Rebuild the dataset.") from err
    return stored - np.float32(HU_OFFSET)


def window_to_uint8(hu: np.ndarray, centre: float, width: float) -> np.ndarray:
    """Linear window [centre - width/2, centre + width/2] -> 0..255 (rounded, clipped)."""
    low = centre - width / 2.0
    scaled = (np.asarray(hu, dtype=np.float64) - low) / width * 255.0
    return np.clip(np.round(scaled), 0, 255).astype(np.uint8)


def roi_box(centre_row: float, centre_col: float, pixel_mm: tuple[float, float], size_mm: float,
            shape: tuple[int, int], where: str = "") -> tuple[int, int, int, int]:
    """(row0, col0, row1, col1), half-open, of a ``size_mm`` square centred on the point.

    Its side in pixels is ``size_mm`` over the pixel spacing, rounded (64 mm at 0.7 mm is 91
    px). A box that reaches outside the slice raises: padding would invent tissue.
    """
    sides = [max(1, round(size_mm / float(s))) for s in pixel_mm]
    starts = [int(np.floor(c - n / 2 + 0.5)) for c, n in zip((centre_row, centre_col), sides)]
    row0, col0 = starts
    row1, col1 = row0 + sides[0], col0 + sides[1]
    if row0 < 0 or col0 < 0 or row1 > shape[0] or col1 > shape[1]:
        raise HounsfieldError(
            f"{where}: a region of interest of {size_mm:g} mm ({sides[0]} x {sides[1]} px at "
            f"{pixel_mm[0]:.3g} x {pixel_mm[1]:.3g} mm) around row {centre_row:.1f}, column "
            f"{centre_col:.1f} reaches outside the slice of {shape[0]} x {shape[1]} px (box rows "
            f"{row0}..{row1}, columns {col0}..{col1}). Use a smaller roi_mm, or image: slice."
        )
    return row0, col0, row1, col1


@dataclass(frozen=True)
class SliceView:
    """How one row's stored slice (HU) becomes its 8-bit image: a box (or the whole slice),
    then the window. ``pixel_mm`` is the slice's pixel spacing, for confounders acting in HU."""

    window: tuple[float, float]
    pixel_mm: tuple[float, float]
    box: tuple[int, int, int, int] | None = None

    def cut(self, image: np.ndarray) -> np.ndarray:
        """The box of an image of the whole slice (any dtype), or the image itself."""
        if self.box is None:
            return image
        row0, col0, row1, col1 = self.box
        if row1 > image.shape[0] or col1 > image.shape[1]:
            raise HounsfieldError(
                f"the region of interest rows {row0}..{row1}, columns {col0}..{col1} reaches "
                f"outside the stored slice of {image.shape[0]} x {image.shape[1]} px: the "
                "manifest and its images disagree. Rebuild the dataset."
            )
        return image[row0:row1, col0:col1]

    def grey(self, hu: np.ndarray) -> np.ndarray:
        """The row's 8-bit image from its whole slice in HU: cut, then windowed."""
        return window_to_uint8(self.cut(hu), *self.window)

    def key(self) -> list:
        """What of the view changes the image (for cache keys)."""
        return [list(self.window), list(self.pixel_mm), None if self.box is None else list(self.box)]


def _present(row: Mapping, column: str) -> bool:
    value = row.get(column)
    return value is not None and not (isinstance(value, float) and np.isnan(value))


def slice_view(row: Mapping) -> SliceView | None:
    """The :class:`SliceView` a manifest row describes; None for a row of an 8-bit image."""
    if not all(_present(row, c) for c in WINDOW_COLUMNS):
        return None
    missing = [c for c in SPACING_COLUMNS if not _present(row, c)]
    if missing:
        raise HounsfieldError(
            f"row {row.get('image_id')!r} is a CT slice in HU (it has a window) but lacks "
            f"{missing}: dose noise and regions of interest need the pixel spacing in mm. "
            "Rebuild the dataset with the CT builder."
        )
    box = None
    given = [_present(row, c) for c in ROI_COLUMNS]
    if any(given):
        if not all(given):
            raise HounsfieldError(
                f"row {row.get('image_id')!r} gives only part of its region of interest "
                f"{dict(zip(ROI_COLUMNS, given))}; give all of {list(ROI_COLUMNS)} or none."
            )
        box = tuple(int(row[c]) for c in ROI_COLUMNS)
    return SliceView(window=(float(row["window_centre"]), float(row["window_width"])),
                     pixel_mm=tuple(float(row[c]) for c in SPACING_COLUMNS), box=box)
