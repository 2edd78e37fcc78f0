"""The confounder registry: names, MICCAT categories, typed parameters, per-image seeds.

A *synthetic* confounder is a pure function ``fn(image, rng, *, strength, **params) -> image``
on a 2-D uint8 array; a *sampled* confounder has no function, it selects rows by an attribute
(see :mod:`sm_utils.confounders.prevalence`). Both are registered with
:func:`register_confounder` and built with :func:`get_confounder`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

KINDS = ("synthetic", "sampled")
# MICCAT (Medical Imaging Contextualized Confounder Taxonomy) groups used in this compendium.
CATEGORIES = (
    "patient/demographic",
    "patient/treatment",
    "environment/acquisition",
    "environment/processing",
    "environment/marker",
)
MIN_IMAGE_SIDE = 8

ImageFn = Callable[..., np.ndarray]


class ConfounderError(ValueError):
    """A confounder, its parameters or its input cannot be used as given."""


@dataclass(frozen=True)
class ConfounderSpec:
    """What :func:`register_confounder` stores: everything except the chosen parameter values."""

    name: str
    category: str
    kind: str
    description: str
    defaults: dict[str, Any]
    fn: ImageFn | None = None
    baseline_fn: ImageFn | None = None
    strength_range: tuple[float, float] = (0.0, 1.0)
    memoise: bool = False   # slow (seconds per image): runs keep its output on disk


_REGISTRY: dict[str, ConfounderSpec] = {}


def register_confounder(
    name: str,
    fn: ImageFn | None = None,
    *,
    category: str,
    description: str,
    defaults: dict[str, Any] | None = None,
    kind: str = "synthetic",
    baseline: ImageFn | None = None,
    strength_range: tuple[float, float] = (0.0, 1.0),
    memoise: bool = False,
):
    """Register a confounder; use as a decorator for synthetic ones.

    ``fn(image, rng, *, strength, **defaults)`` gets a uint8 (H, W) array and must return one
    of the same shape; ``baseline`` (same signature) is what every *non*-confounded image gets
    (X-ray dose noise: the normal dose). ``description`` is one sentence on the real-world
    effect the confounder models. Sampled confounders pass ``kind="sampled"`` and no function.
    ``memoise=True`` marks a confounder too slow to recompute every epoch: fine-tuning runs
    then keep its output on disk (:meth:`Confounder.with_cache`).
    """
    if kind not in KINDS:
        raise ConfounderError(f"kind must be one of {list(KINDS)}; got {kind!r}.")
    if category not in CATEGORIES:
        raise ConfounderError(
            f"confounder {name!r}: category must be one of {list(CATEGORIES)}; got {category!r}."
        )
    if name in _REGISTRY:
        raise ConfounderError(f"confounder {name!r} is already registered; choose another name.")

    def add(function: ImageFn | None) -> ImageFn | None:
        _REGISTRY[name] = ConfounderSpec(
            name=name, category=category, kind=kind, description=description,
            defaults=dict(defaults or {}), fn=function, baseline_fn=baseline,
            strength_range=tuple(strength_range), memoise=bool(memoise),
        )
        return function

    if kind == "sampled":
        if fn is not None:
            raise ConfounderError(f"sampled confounder {name!r} takes no image function.")
        add(None)
        return None
    return add if fn is None else add(fn)


def list_confounders(kind: str | None = None) -> list[str]:
    """Registered names (of one kind if given), sorted."""
    return sorted(n for n, s in _REGISTRY.items() if kind is None or s.kind == kind)


def confounder_table():
    """One row per registered confounder: name, kind, category, description, parameters."""
    import pandas as pd

    return pd.DataFrame([
        {"name": s.name, "kind": s.kind, "category": s.category,
         "description": s.description, "parameters": dict(s.defaults)}
        for s in sorted(_REGISTRY.values(), key=lambda s: (s.kind, s.name))
    ])


def _check_type(name: str, key: str, value: Any, default: Any) -> Any:
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


@dataclass(frozen=True)
class Confounder:
    """A registered confounder with chosen parameters (``params`` includes ``strength``)."""

    name: str
    category: str
    kind: str
    description: str
    params: dict[str, Any] = field(default_factory=dict)
    _spec: ConfounderSpec | None = field(default=None, repr=False, compare=False)
    cache_dir: str | None = field(default=None, compare=False)

    @property
    def strength(self) -> float:
        return float(self.params["strength"])

    @property
    def has_baseline(self) -> bool:
        """True when non-confounded images may be changed too (X-ray dose noise; CT noise with
        ``fbp_baseline``); call :meth:`inject` for every image and this needs no checking."""
        return self._spec is not None and self._spec.baseline_fn is not None

    @property
    def memoise(self) -> bool:
        """True when the confounder is slow enough that runs should cache it on disk."""
        return self._spec is not None and self._spec.memoise

    def _require_synthetic(self, what: str) -> None:
        if self.kind != "synthetic":
            raise ConfounderError(
                f"confounder {self.name!r} is sampled (it selects rows by "
                f"{self.params.get('attribute')!r}); it has no {what}. Use apply_prevalence()."
            )

    def apply(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The confounded version of ``image`` (uint8 (H, W) in, same shape out)."""
        self._require_synthetic("pixel function")
        check_image(image, f"confounder {self.name!r}")
        out = self._spec.fn(image, rng, **self.params)
        return _check_output(out, image, self.name)

    def baseline(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """What a *non*-confounded image gets: identity, except for dose noise (normal dose)."""
        self._require_synthetic("baseline")
        check_image(image, f"confounder {self.name!r}")
        if not self.has_baseline:
            return image
        out = self._spec.baseline_fn(image, rng, **self.params)
        return _check_output(out, image, self.name)

    def inject(self, image: np.ndarray, confounded: bool, seed: int, image_id: Any) -> np.ndarray:
        """What the data pipeline should call for every image of every split.

        ``apply`` when the row is confounded, ``baseline`` otherwise, with the image's own rng.
        The result is a pure function of (parameters, seed, image id, image), so with a
        :meth:`with_cache` folder it is computed once and read back in later epochs and runs.
        """
        if self.cache_dir is None:
            rng = self.image_rng(seed, image_id)
            return self.apply(image, rng) if confounded else self.baseline(image, rng)
        return self._cached_inject(image, bool(confounded), seed, image_id)

    def with_cache(self, cache_dir: str | os.PathLike | None) -> Confounder:
        """The same confounder, memoising :meth:`inject` as PNG files under ``cache_dir``.

        Worth it for slow confounders (``ct_noise`` takes seconds per 512 px image).
        """
        return replace(self, cache_dir=None if cache_dir is None else str(cache_dir))

    def _cached_inject(self, image, confounded, seed, image_id) -> np.ndarray:
        from PIL import Image

        from ..io import atomic_path

        check_image(image, f"confounder {self.name!r}")
        key = hashlib.sha256(json.dumps(
            [self.spec(), _check_seed(seed), str(image_id), confounded, list(image.shape)],
            sort_keys=True, default=str).encode() + image.tobytes()).hexdigest()
        path = Path(self.cache_dir) / self.name / key[:2] / f"{key}.png"
        if path.is_file():
            with Image.open(path) as cached:
                return np.asarray(cached).copy()
        out = replace(self, cache_dir=None).inject(image, confounded, seed, image_id)
        with atomic_path(path) as tmp:
            Image.fromarray(out).save(tmp, format="PNG")
        return out

    def image_rng(self, seed: int, image_id: Any) -> np.random.Generator:
        """Per-image generator from (seed, image id, confounder name): same on every machine."""
        return np.random.default_rng(np.random.SeedSequence(
            [_check_seed(seed), *hash_words(self.name, str(image_id))]))

    def spec(self) -> dict[str, Any]:
        """JSON-ready record of this confounder (for run specs and manifests)."""
        return {"name": self.name, "kind": self.kind, "category": self.category, **self.params}


def _check_output(out: Any, image: np.ndarray, name: str) -> np.ndarray:
    if not isinstance(out, np.ndarray) or out.dtype != np.uint8 or out.shape != image.shape:
        raise ConfounderError(
            f"confounder {name!r} returned {getattr(out, 'dtype', type(out))} "
            f"{getattr(out, 'shape', '')}; it must return uint8 of shape {image.shape}."
        )
    return out


def _check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfounderError(f"seed must be a non-negative integer; got {seed!r}.")
    return int(seed)


def hash_words(*parts: Any, n_words: int = 4) -> list[int]:
    """``n_words`` 32-bit integers from the SHA-256 of the parts (stable across machines)."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode("utf-8")).digest()
    return [int.from_bytes(digest[4 * i: 4 * i + 4], "little") for i in range(n_words)]


def get_confounder(name: str, strength: float = 1.0, **params: Any) -> Confounder:
    """Build confounder ``name`` with ``strength`` and parameters overriding its defaults."""
    if name not in _REGISTRY:
        raise ConfounderError(
            f"unknown confounder {name!r}; valid names: {', '.join(list_confounders())}."
        )
    spec = _REGISTRY[name]
    unknown = sorted(set(params) - set(spec.defaults))
    if unknown:
        raise ConfounderError(
            f"confounder {name!r} does not take parameter(s) {unknown}; it takes "
            f"{sorted(spec.defaults) + ['strength']}."
        )
    lo, hi = spec.strength_range
    if (isinstance(strength, bool) or not isinstance(strength, (int, float, np.number))
            or not math.isfinite(strength) or not lo <= strength <= hi):
        raise ConfounderError(
            f"confounder {name!r}: strength must be a number in [{lo}, {hi}] (1 = the paper's "
            f"setting, 0 = no effect); got {strength!r}."
        )
    values = {k: _check_type(name, k, params.get(k, v), v) for k, v in spec.defaults.items()}
    values["strength"] = float(strength)
    return Confounder(name=spec.name, category=spec.category, kind=spec.kind,
                      description=spec.description, params=values, _spec=spec)
