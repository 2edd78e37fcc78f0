"""Confounders on CT slices stored in Hounsfield units (:mod:`sm_utils.hounsfield`).

A confounder acting on the stored image (``resolution: native``) gets the whole slice: in HU
at the slice's own pixel spacing when it has an HU function (``ct_noise``: noise arises in the
sinogram of the whole slice), else the windowed 8-bit slice (the paper's X-ray dose model is
defined on grey levels). Only then is the row's box cut, the window applied and the result
resized to the model input, so a dose never depends on the size of the box or of the input.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..hounsfield import SliceView, window_to_uint8
from ..imaging import resize_grey
from .validation import ConfounderError


def prepare_slice(conf: Any, hu: np.ndarray, confounded: bool, seed: int, image_id: Any,
                  *, size: int, resize: str, view: SliceView) -> np.ndarray:
    """The model-input image (``size`` x ``size`` uint8) of a whole CT slice in HU."""
    if conf.resolution == "input":
        if view.box is not None and "dose_scaling" in conf.params:
            raise ConfounderError(
                f"confounder {conf.name!r} at resolution 'input' would add its dose to the cut "
                "and resized region of interest, so its photons per pixel would change with "
                "roi_mm and the input size. Use resolution 'native' (it then acts on the whole "
                "slice), or image: slice."
            )
        return conf.inject(resize_grey(view.grey(hu), size, resize), confounded, seed, image_id)
    if conf.resolution != "native":
        raise ConfounderError(
            f"confounder {conf.name!r}: on CT slices in HU a confounder acts on the stored slice "
            f"(resolution 'native') or on the model input ('input'); got {conf.resolution!r}."
        )
    if conf.acts_on_hu:
        hu = conf.inject_hu(hu, confounded, seed, image_id, pixel_mm=view.pixel_mm)
        return resize_grey(view.grey(hu), size, resize)
    grey = conf.inject(window_to_uint8(hu, *view.window), confounded, seed, image_id)
    return resize_grey(view.cut(grey), size, resize)
