"""The registry: a source name maps to its default architecture, a weights finder, a
loader and a preprocessing recipe; models are created and described through it."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .. import plugins
from ..io import sha256_file
from ..weights import (
    SourceError,
    load_checked,
    read_state_dict,
)
from .architectures import (
    KERAS_ARCH,
    _check_arch,
    _classifier_prefixes,
    check_image_size,
    make_architecture,
)
from .preprocessing import Preprocessing, default_preprocessing


@dataclass(frozen=True)
class Source:
    """One pretraining source.

    ``find_weights(arch, weights) -> Path | None``: the file to load (None: random init);
    ``load(model, path, cache_dir) -> state dict``: read the weights file into the key names
    of ``model`` (built by :func:`make_architecture`); :func:`create_model` then loads it with
    every key and shape checked (the source's classifier is dropped for a fresh head);
    ``preprocessing(arch, path) -> Preprocessing``.
    ``provenance``: text, or ``provenance(arch) -> text`` where it depends on the arch.
    ``archs``: the architectures it supports (None: any).
    ``init(model)``: re-initialises the freshly built model in place (torch's global RNG) when
    the source loads no weights (``random``); None keeps the architecture's own init.
    ``resolve_arch(arch) -> arch``: makes a checked arch name explicit (``imagenet`` turns a
    timm name without a pretrained tag into timm's default tag) or raises SourceError.
    ``build(arch, path, *, num_classes, drop_rate, image_size, keep_pretrained_head) ->
    (model, preprocessing)``: a source whose models are not built by
    :func:`make_architecture` (a transformers folder, an open_clip vision tower, a ViT built
    at its input size) builds, loads and checks them itself; its ``resolve_arch`` then checks
    the arch, which need not be a timm name (``sources.foundation``).
    """

    name: str
    default_arch: str | None
    provenance: str | Callable[[str], str]
    find_weights: Callable[[str, Path | None], Path | None]
    load: Callable[[nn.Module, Path, Path | None], dict[str, torch.Tensor]] | None
    preprocessing: Callable[[str, Path | None], Preprocessing]
    archs: tuple[str, ...] | None = None
    init: Callable[[nn.Module], object] | None = None
    resolve_arch: Callable[[str], str] | None = None
    build: Callable[..., tuple[nn.Module, Preprocessing]] | None = None

    def provenance_for(self, arch: str) -> str:
        return self.provenance(arch) if callable(self.provenance) else self.provenance


_SOURCES: dict[str, Source] = {}


def register_source(source: Source, *, replace: bool = False) -> Source:
    """Add ``source`` under its name. A name registered before (by the package or a plugin) is
    refused, naming both, unless ``replace=True``; who registered it is recorded
    (:mod:`sm_utils.plugins`)."""
    if source.name in _SOURCES and not replace:
        raise SourceError(plugins.duplicate_message("source", source.name, source))
    plugins.record("source", source.name, source)
    _SOURCES[source.name] = source
    return source


def list_sources() -> list[str]:
    plugins.ensure_loaded()
    return sorted(_SOURCES)


def get_source(name: str) -> Source:
    plugins.ensure_loaded()
    if name not in _SOURCES:
        raise SourceError(f"Unknown source {name!r}. Valid sources: {', '.join(list_sources())}.")
    return _SOURCES[name]


def check_source_arch(source: str, arch: str | None = None) -> str:
    """Check that ``source`` exists and can fill ``arch``; return the arch a run will use.

    ``arch=None`` (or "") takes the source's default. No weights file is looked for or read,
    so a grid can check every (source, arch) pair before it starts. Raises SourceError saying
    which architectures the source accepts and how to fix the pair. The returned name is
    explicit: ``imagenet`` with a timm name without a pretrained tag (``"resnet50"``) returns
    timm's default tag (``"resnet50.a1_in1k"`` in timm 1.0), so a run records exactly which
    weights; see :func:`timm_pretrained_tag`.
    """
    spec = get_source(source)
    arch = arch or spec.default_arch
    if arch is None:
        raise SourceError(
            f"Source {source!r} needs an architecture: pass arch=... "
            f"({KERAS_ARCH!r} or a timm model name)."
        )
    if spec.archs is not None and arch not in spec.archs:
        accepted = ", ".join(repr(a) for a in spec.archs)
        why = ""
        if KERAS_ARCH in spec.archs:
            why = (
                f" Its weights are Keras ResNet50 (\"v1\") files, which only the Keras-layout "
                f"{KERAS_ARCH!r} can hold (torchvision/timm resnet50 is \"v1.5\", a different "
                "layout)."
            )
        elif arch == KERAS_ARCH:
            why = f" {KERAS_ARCH!r} is the Keras layout; this source's weights are not."
        raise SourceError(
            f"Source {source!r} supports only the architecture(s) {accepted}, not {arch!r}."
            f"{why} Fix: set arch to {spec.archs[0]!r} or leave it empty (None) for the "
            f"source's default {spec.default_arch!r}."
        )
    if spec.build is None:  # a source that builds its own models checks its arch names
        _check_arch(arch)
    return spec.resolve_arch(arch) if spec.resolve_arch is not None else arch


def _resolve(source: str, arch: str | None, weights) -> tuple[Source, str, Path | None]:
    arch = check_source_arch(source, arch)
    spec = get_source(source)
    path = spec.find_weights(arch, Path(weights).expanduser() if weights is not None else None)
    return spec, arch, path


def create_model(
    source: str = "imagenet_lite0",
    arch: str | None = None,
    weights: str | os.PathLike | None = None,
    num_classes: int = 2,
    drop_rate: float = 0.5,
    cache_dir: str | os.PathLike | None = None,
    image_size: int | tuple[int, int] | None = None,
    keep_pretrained_head: bool = False,
) -> tuple[nn.Module, Preprocessing]:
    """Build ``arch`` with the weights of ``source`` and a fresh dropout + linear head.

    The head (and the whole model for ``random``) is initialised from torch's global RNG,
    so seed torch before calling; a source that loads no weights applies its ``init``
    (``random``: Keras' initialisers for keras_resnet50, timm's own for timm archs).
    ``image_size``, if given, is checked against the arch.
    ``keep_pretrained_head=True`` loads the source's own classifier too (``num_classes`` must
    then match it, e.g. 1000 for ImageNet): for checking a source, not for fine-tuning.
    """
    spec, arch, path = _resolve(source, arch, weights)
    if spec.build is not None:
        return spec.build(arch, path, num_classes=num_classes, drop_rate=drop_rate,
                          image_size=image_size, keep_pretrained_head=keep_pretrained_head)
    if image_size is not None:
        check_image_size(arch, image_size)
    model = make_architecture(arch, num_classes=num_classes, drop_rate=drop_rate)
    if (spec.load is None or path is None) and spec.init is not None:
        spec.init(model)
    if spec.load is not None and path is not None:
        state = spec.load(model, path, Path(cache_dir) if cache_dir is not None else None)
        heads = () if keep_pretrained_head else _classifier_prefixes(model)
        load_checked(
            model,
            state,
            skip_prefixes=heads,
            init_prefixes=heads,
            what=f"{source} weights ({path})",
        )
    return model, spec.preprocessing(arch, path)


def describe_source(
    source: str, arch: str | None = None, weights: str | os.PathLike | None = None
) -> dict:
    """What a run records about its source: name, arch, weights file and sha256, provenance."""
    spec, arch, path = _resolve(source, arch, weights)
    provenance = spec.provenance_for(arch)
    if path is not None and path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as fh:
                stored = (fh.metadata() or {}).get("provenance")
        except Exception:  # noqa: BLE001 - an unreadable file is reported when it is loaded
            stored = None
        if stored:
            provenance = f"{provenance} File metadata: {stored}"
    return {
        "source": spec.name,
        "arch": arch,
        "weights": str(path) if path is not None else None,
        "weights_sha256": sha256_file(path) if path is not None else None,
        "provenance": provenance,
        "preprocessing": spec.preprocessing(arch, path).describe(),
    }


def _no_weights(source: str) -> Callable[[str, Path | None], None]:
    def find(arch: str, weights: Path | None) -> None:
        if weights is not None:
            raise SourceError(
                f"Source {source!r} takes no weights file (got {weights}). "
                "Use source='file' with arch=... to load a weights file."
            )

    return find


def _required_file(source: str, what: str) -> Callable[[str, Path | None], Path]:
    def find(arch: str, weights: Path | None) -> Path:
        if weights is None:
            raise SourceError(f"Source {source!r} needs weights=<path to {what}>.")
        if not weights.is_file():
            raise SourceError(f"Source {source!r}: weights file not found: {weights} ({what}).")
        return weights

    return find


def _load_file(model: nn.Module, path: Path, cache_dir: Path | None) -> dict:
    state, _ = read_state_dict(path)
    return state


def _preprocessing_from_file(
    arch: str, path: Path | None, fallback: Preprocessing | None = None
) -> Preprocessing:
    """Preprocessing stored in a safetensors file's metadata, else ``fallback``/the arch's."""
    if path is not None and path.is_file() and path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as fh:
                stored = (fh.metadata() or {}).get("preprocessing")
            if stored:
                return Preprocessing.from_dict(json.loads(stored))
        except Exception:  # noqa: BLE001, S110 - loading the file reports what is wrong with it
            pass
    return fallback or default_preprocessing(arch)
