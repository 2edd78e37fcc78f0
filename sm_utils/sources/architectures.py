"""Architectures by name: the Keras ResNet50 layout of the paper, or any timm model."""

from __future__ import annotations

import difflib

from torch import nn

from .. import keras_resnet
from ..keras_resnet import KerasResNet50
from ..weights import (
    SourceError,
)

KERAS_ARCH = "keras_resnet50"


def _timm_pretrained_cfg(arch: str):
    import timm.models

    try:
        return timm.models.get_pretrained_cfg(arch)
    except RuntimeError:
        return None


def _check_arch(arch: str) -> None:
    import timm

    if arch == KERAS_ARCH or (
        timm.is_model(arch) and ("." not in arch or _timm_pretrained_cfg(arch) is not None)
    ):
        return
    candidates = [KERAS_ARCH, *timm.list_models(), *timm.list_pretrained()]
    close = difflib.get_close_matches(arch, candidates, n=8, cutoff=0.6)
    raise SourceError(
        f"Unknown architecture {arch!r}. Expected {KERAS_ARCH!r} or a timm model name "
        f"(timm.list_models() lists {len(timm.list_models())}). "
        f"Close names: {', '.join(close) if close else 'none'}."
    )


def make_architecture(arch: str, num_classes: int = 2, drop_rate: float = 0.5) -> nn.Module:
    """Randomly initialised model (torch's global RNG): features -> avg pool -> dropout -> linear."""
    _check_arch(arch)
    if arch == KERAS_ARCH:
        return KerasResNet50(num_classes=num_classes, drop_rate=drop_rate)
    import timm

    return timm.create_model(arch, pretrained=False, num_classes=num_classes, drop_rate=drop_rate)


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    if isinstance(model, KerasResNet50):
        return ("fc",)
    name = getattr(model, "pretrained_cfg", {}).get("classifier", "fc")
    return tuple(name) if isinstance(name, (tuple, list)) else (name,)


def check_image_size(arch: str, image_size: int | tuple[int, int]) -> None:
    """Raise SourceError if ``arch`` cannot take images of ``image_size``."""
    h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if arch == KERAS_ARCH:
        keras_resnet.check_input_size((h, w))
        return
    cfg = _timm_pretrained_cfg(arch)
    if cfg is not None and cfg.fixed_input_size and tuple(cfg.input_size[1:]) != (h, w):
        raise SourceError(
            f"{arch} takes only {cfg.input_size[1]}x{cfg.input_size[2]} images, got {h}x{w}. "
            f"Use image_size={cfg.input_size[1]} or another architecture."
        )
    # Most CNNs reduce by 32; below that the last feature map is degenerate.
    minimum = 32
    if min(h, w) < minimum:
        raise SourceError(
            f"Image size {h}x{w} is too small for {arch}: it needs at least {minimum}x{minimum} "
            f"(its stride-32 feature map would be empty). Use image_size >= {minimum}."
        )
