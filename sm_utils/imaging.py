"""Reading and resizing 8-bit grey images, with the resampling each step of the paper used.

The paper's pipeline resamples twice, with different methods, and the method changes what a
confounder looks like at the model input:

- ``"cv2_linear"``: OpenCV's ``cv2.resize`` default (INTER_LINEAR, no anti-aliasing), which the
  paper used to bring a radiograph to 512 px before adding X-ray dose noise. Computed with
  scikit-image (``resize(order=1, anti_aliasing=False)``, pixel-centre aligned like OpenCV)
  and rounded half up like OpenCV: 1024 -> 512 px (NIH's size to the paper's) equals
  ``cv2.resize`` exactly (the mean of each 2x2 block); at other ratios OpenCV's fixed-point
  weights make about one pixel in eight differ by one grey level (measured).
- ``"nearest"``: Keras ``flow_from_dataframe(target_size=...)``, which loads with Pillow and
  resizes with nearest-neighbour: every model-input pixel is one stored pixel, so per-pixel
  noise and fine texture survive the downsizing (the paper's resize to the model input).
- ``"bilinear"``: Pillow's anti-aliased bilinear reduction (averages every covered pixel):
  smoother inputs, and the default of this compendium's offline demo.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

RESIZE_METHODS = ("bilinear", "nearest", "cv2_linear")


class ImageError(ValueError):
    """An image that cannot be read or resized as asked."""


def check_resize_method(method: str) -> str:
    if method not in RESIZE_METHODS:
        raise ImageError(
            f"resize method must be one of {list(RESIZE_METHODS)}; got {method!r}. Use "
            "'nearest' for the paper's Keras pipeline, 'bilinear' for anti-aliased resizing."
        )
    return method


def _shape(size: int | tuple[int, int]) -> tuple[int, int]:
    """(height, width) from a side or a (height, width) pair."""
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    h, w = size
    return int(h), int(w)


def resize_grey(image: np.ndarray, size: int | tuple[int, int], method: str) -> np.ndarray:
    """A 2-D uint8 image resized to ``size`` (a side or (height, width)) with ``method``."""
    check_resize_method(method)
    h, w = _shape(size)
    if image.shape == (h, w):
        return image
    if method == "cv2_linear":
        from skimage.transform import resize

        out = resize(image.astype(np.float64), (h, w), order=1, anti_aliasing=False,
                     preserve_range=True, mode="edge")
        return np.clip(np.floor(out + 0.5), 0, 255).astype(np.uint8)
    resample = Image.Resampling.NEAREST if method == "nearest" else Image.Resampling.BILINEAR
    resized = Image.fromarray(image).resize((w, h), resample, reducing_gap=None)
    return np.array(resized, dtype=np.uint8)  # a writable copy (asarray of an image is read-only)


def load_grey(path: str | Path) -> np.ndarray:
    """The image file as 8-bit grey (H, W), at its stored resolution."""
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("L"), dtype=np.uint8).copy()
    except (OSError, ValueError) as err:
        raise ImageError(
            f"cannot read image {path}: {err}. Check that the file is a valid image, or "
            "rebuild the dataset."
        ) from err
