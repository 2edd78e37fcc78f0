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

from .. import plugins
from .validation import (  # noqa: F401  (importable from here as before)
    MIN_IMAGE_SIDE,
    RESOLUTIONS,
    ConfounderError,
    check_image,
    check_param_type,
    check_resolution,
    check_seed,
    hash_words,
)

KINDS = ("synthetic", "sampled")
# MICCAT (Medical Imaging Contextualized Confounder Taxonomy) groups used in this compendium.
CATEGORIES = (
    "patient/demographic",
    "patient/treatment",
    "environment/acquisition",
    "environment/processing",
    "environment/marker",
)

ImageFn = Callable[..., np.ndarray]


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
    mask_fn: ImageFn | None = None   # localised confounders: where they paint (see mask())
    hu_fn: ImageFn | None = None     # CT slices in HU: fn(hu, rng, *, pixel_mm, **params) -> hu
    hu_baseline_fn: ImageFn | None = None
    earlier: dict[str, Any] = field(default_factory=dict)  # see register_confounder
    choices: dict[str, tuple] = field(default_factory=dict)  # parameter -> its allowed values


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
    mask: ImageFn | None = None,
    hu: tuple[ImageFn, ImageFn | None] | None = None,
    replace: bool = False,
    earlier: dict[str, Any] | None = None,
    choices: dict[str, tuple] | None = None,
):
    """Register a confounder; use as a decorator for synthetic ones.

    ``fn(image, rng, *, strength, **defaults)`` gets a uint8 (H, W) array and must return one
    of the same shape; ``baseline`` (same signature) is what every *non*-confounded image gets
    (X-ray dose noise: the normal dose). ``description`` is one sentence on the real-world
    effect the confounder models. Sampled confounders pass ``kind="sampled"`` and no function.
    ``memoise=True`` marks a confounder too slow to recompute every epoch: fine-tuning runs
    then keep its output on disk (:meth:`Confounder.with_cache`). Every synthetic confounder
    takes a ``resolution`` parameter (default from ``defaults``, else ``"input"``): where in
    the pipeline it acts (see :meth:`Confounder.prepare`); ``fn`` never receives it.
    ``mask`` (localised confounders: tag, marker, support device; same signature as ``fn``)
    returns the coverage (0..1, float (H, W)) of what ``fn`` paints with the same ``rng``
    draws: the pixels attribution methods are scored against (:meth:`Confounder.mask`).
    ``hu``: (function, baseline) acting on a whole CT slice in Hounsfield units (float (H, W)
    in and out, with ``pixel_mm`` the slice's pixel spacing), used instead of ``fn`` and
    ``baseline`` on CT manifests that store HU (:mod:`sm_utils.hounsfield`).
    A name registered before (by the package or a plugin) is refused, naming both, unless
    ``replace=True``; who registered each name is recorded (:mod:`sm_utils.plugins`).
    ``earlier``: parameters added after runs were made, with the value those runs used (a
    run's identity names only the parameters a grid sets, so a new default would otherwise
    pass for the old computation): :func:`identity_params` records them wherever they differ.
    ``choices``: the values a parameter may take (e.g. ``{"backend": ("nufft", "skimage",
    "torch")}``), checked when the confounder is built, so a grid with another is refused
    before it starts.
    """
    if kind not in KINDS:
        raise ConfounderError(f"kind must be one of {list(KINDS)}; got {kind!r}.")
    if category not in CATEGORIES:
        raise ConfounderError(
            f"confounder {name!r}: category must be one of {list(CATEGORIES)}; got {category!r}."
        )
    values = dict(defaults or {})
    if kind == "synthetic":
        values["resolution"] = check_resolution(name, values.get("resolution", "input"))

    def add(function: ImageFn | None) -> ImageFn | None:
        if name in _REGISTRY and not replace:
            raise ConfounderError(plugins.duplicate_message("confounder", name, function or baseline))
        plugins.record("confounder", name, function or baseline)
        _REGISTRY[name] = ConfounderSpec(
            name=name, category=category, kind=kind, description=description,
            defaults=values, fn=function, baseline_fn=baseline,
            strength_range=tuple(strength_range), memoise=bool(memoise), mask_fn=mask,
            hu_fn=None if hu is None else hu[0], hu_baseline_fn=None if hu is None else hu[1],
            earlier=dict(earlier or {}),
            choices={k: tuple(v) for k, v in (choices or {}).items()},
        )
        return function

    if kind == "sampled":
        if fn is not None or mask is not None:
            raise ConfounderError(f"sampled confounder {name!r} takes no image or mask function.")
        add(None)
        return None
    return add if fn is None else add(fn)


def identity_params(name: str, params: dict[str, Any]) -> dict[str, Any]:
    """A run's ``confounder_params`` as its identity needs them: a parameter of ``earlier``
    (see :func:`register_confounder`) is written out wherever its value, set or default,
    differs from the one runs used before it existed, and left out where it is that value (so
    those runs keep their ids); every other parameter as given."""
    out = dict(params or {})
    spec = _REGISTRY.get(name)
    for key, before in ({} if spec is None else spec.earlier).items():
        if out.get(key, spec.defaults[key]) == before:
            out.pop(key, None)
        else:
            out[key] = out.get(key, spec.defaults[key])
    return out


def list_confounders(kind: str | None = None) -> list[str]:
    """Registered names (of one kind if given), sorted."""
    plugins.ensure_loaded()
    return sorted(n for n, s in _REGISTRY.items() if kind is None or s.kind == kind)


def masked_confounders() -> list[str]:
    """Names of the localised confounders (those reporting a pixel mask), sorted."""
    plugins.ensure_loaded()
    return sorted(n for n, s in _REGISTRY.items() if s.mask_fn is not None)


def confounder_table():
    """One row per registered confounder: name, kind, category, description, parameters."""
    import pandas as pd

    plugins.ensure_loaded()
    return pd.DataFrame([
        {"name": s.name, "kind": s.kind, "category": s.category,
         "description": s.description, "parameters": dict(s.defaults)}
        for s in sorted(_REGISTRY.values(), key=lambda s: (s.kind, s.name))
    ])


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
    def resolution(self) -> str | int:
        """Where it acts: "input", "native" or a side in pixels (sampled ones: "input")."""
        return self.params.get("resolution", "input")

    @property
    def image_params(self) -> dict[str, Any]:
        """The parameters the image function takes (all but ``resolution``)."""
        return {k: v for k, v in self.params.items() if k != "resolution"}

    @property
    def memoise(self) -> bool:
        """True when the confounder is slow enough that runs should cache it on disk."""
        return self._spec is not None and self._spec.memoise

    @property
    def has_mask(self) -> bool:
        """True for localised confounders, which report the pixels they paint (:meth:`mask`)."""
        return self._spec is not None and self._spec.mask_fn is not None

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
        out = self._spec.fn(image, rng, **self.image_params)
        return _check_output(out, image, self.name)

    def baseline(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """What a *non*-confounded image gets: identity, except for dose noise (normal dose)."""
        self._require_synthetic("baseline")
        check_image(image, f"confounder {self.name!r}")
        if not self.has_baseline:
            return image
        out = self._spec.baseline_fn(image, rng, **self.image_params)
        return _check_output(out, image, self.name)

    def mask(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Boolean (H, W): the pixels :meth:`apply` paints on ``image`` with an ``rng`` in the
        same state (for ``inject``: ``image_rng(seed, image_id)``), at any strength.

        Only localised confounders (``has_mask``) have one; for the others (a filter, noise,
        an attribute) there is no region to score an attribution against.
        """
        self._require_synthetic("pixel mask")
        if not self.has_mask:
            raise ConfounderError(
                f"confounder {self.name!r} is not localised: it reports no pixel mask, so "
                "attribution inside a mask cannot be measured for it. Use one that has a mask: "
                f"{', '.join(masked_confounders()) or 'none registered'}."
            )
        check_image(image, f"confounder {self.name!r}")
        coverage = np.asarray(self._spec.mask_fn(image, rng, **self.image_params))
        if coverage.shape != image.shape:
            raise ConfounderError(
                f"confounder {self.name!r}: its mask function returned shape {coverage.shape}; "
                f"it must return the image's shape {image.shape}."
            )
        return coverage > 0

    def input_mask(self, original: np.ndarray, seed: int, image_id: Any, *, size: int,
                   resize: str, view: Any = None) -> np.ndarray:
        """Boolean ``size`` x ``size`` mask of the model-input pixels that :meth:`prepare`
        changes for a confounded image: the mask is made where the confounder acts
        (``resolution``) and brought to the input as the image is (any pixel it reaches).
        ``view``: ``original`` is a whole CT slice in HU (as for :meth:`prepare`).
        """
        from ..hounsfield import window_to_uint8
        from ..imaging import resize_grey

        if view is not None:
            if self.resolution == "input":
                original = view.grey(original)
            else:  # made on the whole windowed slice, then cut as the image is
                whole = self.mask(window_to_uint8(original, *view.window),
                                  self.image_rng(seed, image_id))
                return resize_grey(view.cut(whole).astype(np.uint8) * 255, size, resize) > 0
        image = check_image(original, f"confounder {self.name!r}")
        if self.resolution == "input":
            image = resize_grey(image, size, resize)
        elif self.resolution != "native":
            image = resize_grey(image, self.resolution, "cv2_linear")
        mask = self.mask(image, self.image_rng(seed, image_id))
        if mask.shape == (size, size):
            return mask
        return resize_grey(mask.astype(np.uint8) * 255, size, resize) > 0

    def inject(self, image: np.ndarray, confounded: bool, seed: int, image_id: Any) -> np.ndarray:
        """``apply`` when the row is confounded, ``baseline`` otherwise, with the image's own rng.

        A pure function of (parameters, seed, image id, image), on the image as given:
        :meth:`prepare` decides at which resolution that image is.
        """
        rng = self.image_rng(seed, image_id)
        return self.apply(image, rng) if confounded else self.baseline(image, rng)

    @property
    def acts_on_hu(self) -> bool:
        """True when it acts on CT slices in Hounsfield units (e.g. ``ct_noise``)."""
        return self._spec is not None and self._spec.hu_fn is not None

    def inject_hu(self, hu: np.ndarray, confounded: bool, seed: int, image_id: Any, *,
                  pixel_mm: tuple[float, float]) -> np.ndarray:
        """:meth:`inject` for a whole CT slice in HU with its pixel spacing (mm)."""
        rng = self.image_rng(seed, image_id)
        fn = self._spec.hu_fn if confounded else self._spec.hu_baseline_fn
        if fn is None:
            return hu
        out = np.asarray(fn(np.asarray(hu, dtype=np.float64), rng, pixel_mm=tuple(pixel_mm),
                            **self.image_params))
        if out.shape != hu.shape:
            raise ConfounderError(f"confounder {self.name!r} returned shape {out.shape} for a "
                                  f"CT slice of shape {hu.shape}; it must keep the shape.")
        return out

    def prepare(self, original: np.ndarray | Callable[[], np.ndarray], confounded: bool,
                seed: int, image_id: Any, *, size: int, resize: str,
                original_key: str | None = None, view: Any = None) -> np.ndarray:
        """The model-input image (``size`` x ``size`` uint8) of a stored image, confounded or not.

        ``resolution`` decides where the confounder acts: ``"input"``: the image is resized to
        the model input with ``resize`` first (a confounder with parameters for
        ``reference_size`` is scaled to it); ``"native"``: on the stored image, then resized;
        an integer N: the stored image is first brought to N x N px as the paper did (OpenCV's
        bilinear, :mod:`sm_utils.imaging`), confounded there, then resized to the input.
        ``original`` may be a function that loads the image, so that with a cache
        (:meth:`with_cache`) and an ``original_key`` (a digest of the stored file) a cached
        result is returned without decoding the original. ``view``: ``original`` is a whole CT
        slice in HU and the :class:`~sm_utils.hounsfield.SliceView` of its row says how it
        becomes 8-bit (the confounder acts before the box and the window).
        """
        from ..imaging import resize_grey

        if self.cache_dir is not None:
            return self._cached_prepare(original, confounded, seed, image_id, size, resize,
                                        original_key, view)
        if view is not None:
            hu = original() if callable(original) else original
            from .slices import prepare_slice

            return prepare_slice(self, hu, confounded, seed, image_id, size=size, resize=resize,
                                 view=view)
        image = check_image(original() if callable(original) else original,
                            f"confounder {self.name!r}")
        if self.resolution == "input":
            return self.inject(resize_grey(image, size, resize), confounded, seed, image_id)
        if self.resolution != "native":
            image = resize_grey(image, self.resolution, "cv2_linear")
        return resize_grey(self.inject(image, confounded, seed, image_id), size, resize)

    def with_cache(self, cache_dir: str | os.PathLike | None) -> Confounder:
        """The same confounder, memoising :meth:`prepare` as PNG files under ``cache_dir``.

        Worth it for slow confounders (``ct_noise`` takes seconds per 512 px image) and for
        those acting on the stored full-resolution image (decoding and filtering 1024 px).
        """
        return replace(self, cache_dir=None if cache_dir is None else str(cache_dir))

    def memoised_under(self, cache_dir: str | os.PathLike) -> Confounder:
        """This confounder memoised under ``cache_dir`` where that pays (a slow one, or one
        acting on the stored image rather than the model input: the same output in every fold
        and p, so each image is computed once); otherwise, or when already memoised, itself."""
        if (self.kind == "synthetic" and self.cache_dir is None
                and (self.memoise or self.resolution != "input")):
            return self.with_cache(cache_dir)
        return self

    def memo_path(self, confounded: bool, seed: int, image_id: Any, size: int, resize: str,
                  original_key: str, view: Any = None) -> Path:
        """Where :meth:`prepare` keeps (under ``cache_dir``) its output for these arguments;
        ``original_key``: the stored file's digest (or the image's, see :meth:`prepare`)."""
        code = plugins.code_digest("confounder", self.name)  # a plugin's: edited, recomputed
        key = hashlib.sha256(json.dumps(
            [identity_params(self.name, self.spec()), check_seed(seed), str(image_id),
             bool(confounded), int(size), resize, original_key]
            + ([] if view is None else [view.key()]) + ([code] if code else []),
            sort_keys=True, default=str).encode()).hexdigest()
        return Path(self.cache_dir) / self.name / key[:2] / f"{key}.png"

    def write_memo(self, path: Path, out: np.ndarray) -> None:
        """Keep ``out`` at ``path`` (:meth:`memo_path`), atomically, as :meth:`prepare` does."""
        from PIL import Image

        from ..io import atomic_path

        with atomic_path(path) as tmp:
            Image.fromarray(out).save(tmp, format="PNG")

    def _cached_prepare(self, original, confounded, seed, image_id, size, resize,
                        original_key, view=None) -> np.ndarray:
        from PIL import Image

        image = None
        if original_key is None:
            image = original() if callable(original) else original
            if view is None:
                check_image(image, f"confounder {self.name!r}")
            original_key = hashlib.sha256(repr(image.shape).encode() + image.tobytes()).hexdigest()
        path = self.memo_path(confounded, seed, image_id, size, resize, original_key, view)
        if path.is_file():
            with Image.open(path) as cached:
                return np.asarray(cached).copy()
        if image is None:
            image = original() if callable(original) else original
        out = replace(self, cache_dir=None).prepare(image, confounded, seed, image_id,
                                                    size=size, resize=resize, view=view)
        self.write_memo(path, out)
        return out

    def image_rng(self, seed: int, image_id: Any) -> np.random.Generator:
        """Per-image generator from (seed, image id, confounder name): same on every machine."""
        return np.random.default_rng(np.random.SeedSequence(
            [check_seed(seed), *hash_words(self.name, str(image_id))]))

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


def get_confounder(name: str, strength: float = 1.0, **params: Any) -> Confounder:
    """Build confounder ``name`` with ``strength`` and parameters overriding its defaults."""
    plugins.ensure_loaded()
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
    values = {k: check_resolution(name, params.get(k, v)) if k == "resolution"
              else check_param_type(name, k, params.get(k, v), v) for k, v in spec.defaults.items()}
    for key, allowed in spec.choices.items():
        if values[key] not in allowed:
            raise ConfounderError(f"confounder {name!r}: {key} must be one of {list(allowed)}; "
                                  f"got {values[key]!r}.")
    values["strength"] = float(strength)
    return Confounder(name=spec.name, category=spec.category, kind=spec.kind,
                      description=spec.description, params=values, _spec=spec)
