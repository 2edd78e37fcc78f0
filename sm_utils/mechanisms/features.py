"""Penultimate (or any layer's) pooled features of a model, for the probes; for a vision
transformer also the mean of its patch tokens (``patch_mean``)."""

from __future__ import annotations

import difflib
from typing import Any

import numpy as np
import torch
from torch import nn

from .tokens import PATCH_MEAN, token_layout

PENULTIMATE = "penultimate"


class MechanismError(ValueError):
    """A probe or attribution that cannot be computed as asked (the message says what to change)."""


def _arch_name(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return str(getattr(model, "arch_name", None) or cfg.get("architecture") or type(model).__name__)


def _classifier(model: nn.Module) -> nn.Linear | None:
    """The model's classification head as training finds it, or None without one."""
    from ..training import TrainingError, classifier

    try:
        return classifier(model)
    except TrainingError:
        return None


def feature_layers(model: nn.Module) -> list[str]:
    """Layer names a probe or Grad-CAM can use: ``penultimate``, for a vision transformer
    ``patch_mean``, and the modules at the top two levels of the model (timm: ``blocks.0`` ...
    ``conv_head``; Keras ResNet50: ``conv3.block4``)."""
    names = [n for n, _ in model.named_modules() if n and n.count(".") <= 1]
    return [PENULTIMATE, *([PATCH_MEAN] if token_layout(model) else []), *names]


def _layer_module(model: nn.Module, layer: str) -> nn.Module:
    modules = dict(model.named_modules())
    if layer and layer in modules:
        return modules[layer]
    options = feature_layers(model)
    close = difflib.get_close_matches(str(layer), options, n=5, cutoff=0.5)
    shown = ", ".join(options[:12]) + (", ..." if len(options) > 12 else "")
    raise MechanismError(
        f"{_arch_name(model)} has no layer {layer!r}"
        f"{' (close: ' + ', '.join(close) + ')' if close else ''}. Set layer to "
        f"{PENULTIMATE!r} (the pooled features its classifier reads) or a module name of this "
        f"model: {shown} (sm_utils.mechanisms.feature_layers(model) lists them all)."
    )


def _pool(output: Any, model: nn.Module, layer: str) -> torch.Tensor:
    if isinstance(output, (tuple, list)) and output:
        output = output[0]
    if not isinstance(output, torch.Tensor) or output.ndim not in (2, 3, 4):
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise MechanismError(
            f"layer {layer!r} of {_arch_name(model)} gives {shape}, not features (N, C), tokens "
            f"(N, T, C) or a feature map (N, C, H, W). Set layer to {PENULTIMATE!r} or a block "
            "that outputs a feature map (feature_layers(model) lists the candidates)."
        )
    if output.ndim == 4:
        return output.mean(dim=(2, 3))
    if output.ndim == 3:
        return output.mean(dim=1)
    return output


def _patch_mean_hook(model: nn.Module, size: tuple[int, int], captured: list):
    layout = token_layout(model)
    if layout is None:
        raise MechanismError(
            f"{PATCH_MEAN!r} is the mean of a vision transformer's patch tokens; "
            f"{_arch_name(model)} has none. Use {PENULTIMATE!r} or a module name "
            "(feature_layers(model) lists them)."
        )
    modules = dict(model.named_modules())
    norm = modules[layout.norm]

    def keep_patch_mean(module, args, output) -> None:
        captured.append(norm(layout.patch_tokens(output, *size)).mean(dim=1))

    return modules[layout.last].register_forward_hook(keep_patch_mean)


def _device(device: str | torch.device) -> torch.device:
    from ..training import resolve_device

    return device if isinstance(device, torch.device) else resolve_device(device)


@torch.no_grad()
def extract_features(model: nn.Module, prep, images: np.ndarray, *, layer: str = PENULTIMATE,
                     batch_size: int = 64, device: str | torch.device = "cpu") -> np.ndarray:
    """Features (N, D) float64 of uint8 images (N, H, W), the model in eval mode.

    ``layer="penultimate"``: the input of the classifier (after global pooling; dropout is off
    in eval mode; a ViT source: its CLS token after the final norm, or an open_clip tower's
    image embedding); ``"patch_mean"`` (a vision transformer): the mean of the patch tokens of
    its last block after its final norm (CLS and register tokens left out); a module name: its
    output, average-pooled over space (or tokens).
    """
    device = _device(device)
    images = np.asarray(images)
    if images.ndim != 3 or images.dtype != np.uint8 or not len(images):
        raise MechanismError(f"expected uint8 images (N, H, W) with N >= 1; got {images.dtype} "
                             f"{images.shape}.")
    captured: list[torch.Tensor] = []
    if layer == PENULTIMATE:
        head = _classifier(model)
        if head is None:
            raise MechanismError(
                f"{_arch_name(model)} has no linear classifier, so it has no penultimate "
                "features: set layer to one of its modules (feature_layers(model) lists them)."
            )

        def keep_input(module, args) -> None:
            captured.append(args[0])

        hook = head.register_forward_pre_hook(keep_input)
    elif layer == PATCH_MEAN:
        hook = _patch_mean_hook(model, images.shape[1:], captured)
    else:
        module = _layer_module(model, layer)

        def keep_output(module, args, output) -> None:
            captured.append(_pool(output, model, layer))

        hook = module.register_forward_hook(keep_output)
    model.eval().to(device)
    chunks = []
    try:
        for start in range(0, len(images), batch_size):
            captured.clear()
            batch = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size]))
            model(prep(batch.to(device)))
            if not captured:
                raise MechanismError(
                    f"layer {layer!r} of {_arch_name(model)} did not run in the forward pass "
                    f"(it is not used by this model's forward()); choose another layer."
                )
            chunks.append(_pool(captured[0], model, layer).float().cpu())
    finally:
        hook.remove()
    return torch.cat(chunks).numpy().astype(np.float64)
