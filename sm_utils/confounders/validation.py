"""Checks shared by the confounder modules: the error type, parameter types, resolutions,
input images, seeds and stable per-image hashes."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

MIN_IMAGE_SIDE = 8
# Where a synthetic confounder acts (its ``resolution`` parameter): on the model-input image,
# on the stored image at its own resolution, or on the stored image resized to N x N pixels
# (an integer; e.g. 512 for the paper's X-ray dose noise).
RESOLUTIONS = ("input", "native")


class ConfounderError(ValueError):
    """A confounder, its parameters or its input cannot be used as given."""


def check_param_type(name: str, key: str, value: Any, default: Any) -> Any:
    """Coerce ``value`` to the type of ``default`` or raise (bool, int, float, str, sequence)."""
    if default is None or value is None:
        return value
    ok = True
    if isinstance(default, bool):
        ok = isinstance(value, (bool, np.bool_))
        value = bool(value) if ok else value
    elif isinstance(default, (int, float)):
        ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
        if ok:
            value = int(value) if isinstance(default, int) and float(value).is_integer() else float(value)
    elif isinstance(default, str):
        ok = isinstance(value, str)
    elif isinstance(default, (tuple, list)):
        ok = isinstance(value, (tuple, list, np.ndarray))
        value = tuple(value) if ok else value
    if not ok:
        raise ConfounderError(
            f"confounder {name!r}: parameter {key!r} must be like {default!r} "
            f"({type(default).__name__}); got {value!r} ({type(value).__name__})."
        )
    return value


def check_resolution(name: str, value: Any) -> str | int:
    """``"input"``, ``"native"`` or a side in pixels (an integer >= 8, or its digits)."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if value in RESOLUTIONS or (isinstance(value, (int, np.integer)) and not isinstance(value, bool)
                                and value >= MIN_IMAGE_SIDE):
        return value if isinstance(value, str) else int(value)
    raise ConfounderError(
        f"confounder {name!r}: resolution must be 'input' (the model-input image), 'native' "
        f"(the stored image) or a side in pixels >= {MIN_IMAGE_SIDE} (e.g. 512); got {value!r}."
    )


def check_image(image: Any, who: str = "confounder") -> np.ndarray:
    """Raise unless ``image`` is a 2-D uint8 array of at least 8 x 8 pixels."""
    if not isinstance(image, np.ndarray):
        raise ConfounderError(
            f"{who}: expected a numpy uint8 array of shape (H, W); got {type(image).__name__}. "
            "Convert with numpy.asarray(PIL.Image.open(path).convert('L'))."
        )
    if image.dtype != np.uint8 or image.ndim != 2 or min(image.shape) < MIN_IMAGE_SIDE:
        raise ConfounderError(
            f"{who}: expected a 2-D uint8 greyscale image (H, W) with sides >= {MIN_IMAGE_SIDE}; "
            f"got dtype {image.dtype} and shape {image.shape}. Convert colour images to grey "
            "(e.g. PIL .convert('L')) and scale floats to 0..255 uint8 first."
        )
    return image


def check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfounderError(f"seed must be a non-negative integer; got {seed!r}.")
    return int(seed)


def hash_words(*parts: Any, n_words: int = 4) -> list[int]:
    """``n_words`` 32-bit integers from the SHA-256 of the parts (stable across machines)."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode("utf-8")).digest()
    return [int.from_bytes(digest[4 * i: 4 * i + 4], "little") for i in range(n_words)]
