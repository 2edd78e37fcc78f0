"""Attribution: the share of a class activation map (HiResCAM or Grad-CAM, captum)
inside a confounder's pixel mask, beside the mask's share of the image; for a CNN on a
feature map, for a vision transformer on its patch tokens laid out on the patch grid."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from .features import MechanismError, _arch_name, _device, _layer_module, feature_layers
from .probe_sets import _pick
from .tokens import TokenLayout, token_layout

AUTO = "auto"
# method -> the captum class that computes it
ATTRIBUTION_METHODS = {"hirescam": "captum.attr.LayerGradientXActivation (channel sum, ReLU)",
                       "gradcam": "captum.attr.LayerGradCam (ReLU)"}
# A map coarser than this cannot localise a small marker; "auto" looks for one as fine.
MIN_CAM_SIDE = 16


def cam_layer(model: nn.Module, image_size: int, *, min_side: int = MIN_CAM_SIDE) -> str:
    """The deepest of :func:`feature_layers` whose feature map has at least ``min_side`` cells
    a side for ``image_size`` px inputs (found by one forward pass of a blank image).

    A vision transformer: the block before its last one, whose output tokens the last block
    reads (its patch grid is the only map a ViT has, whatever its size). Not the last block's
    own output: a head that reads the CLS token after the final norm (per token) gets nothing
    from the patch tokens there, so their gradient, and the map, is 0.
    """
    layout = token_layout(model)
    if layout is not None:
        if layout.before_last is None:
            raise MechanismError(
                f"{_arch_name(model)} has one transformer block: the tokens it reads are not "
                "a block's output. Pass layer=<module> (feature_layers(model) lists them)."
            )
        return layout.before_last
    shapes: dict[str, tuple[int, ...]] = {}
    modules = dict(model.named_modules())

    def record(name: str):
        def hook(module, args, output) -> None:  # must return None: a value replaces the output
            shapes.setdefault(name, tuple(output.shape) if isinstance(output, torch.Tensor) else ())
        return hook

    hooks = [modules[name].register_forward_hook(record(name))
             for name in feature_layers(model)[1:]]
    device = next(model.parameters()).device
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, image_size, image_size, device=device))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    fine = [n for n, s in shapes.items() if len(s) == 4 and min(s[2:]) >= min_side]
    if not fine:
        raise MechanismError(
            f"{_arch_name(model)} has no feature map of at least {min_side} x {min_side} cells at "
            f"{image_size} px; pass layer=<module> (feature_layers(model) lists them) or a larger "
            "image_size."
        )
    return fine[-1]


class _Contrast(nn.Module):
    """Logits minus the mean of the other classes' logits: for two classes, column 1 is
    logit_1 - logit_0, what the softmax decision depends on."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)
        k = logits.shape[1]
        return logits * (k / (k - 1)) - logits.sum(dim=1, keepdim=True) / (k - 1)


def activation_maps(model: nn.Module, prep, images: np.ndarray, *, method: str = "hirescam",
                    layer: str = AUTO, target: int = 1, contrast: bool = True,
                    batch_size: int = 32,
                    device: str | torch.device = "cpu") -> tuple[np.ndarray, str]:
    """Class activation maps of class ``target`` for uint8 images (N, H, W) at ``layer``,
    upsampled bilinearly to (H, W): ``method="hirescam"`` (ReLU of the channel sum of
    gradient x activation) or ``"gradcam"`` (ReLU of the activations weighted by their
    spatially averaged gradients). ``contrast=True`` explains the target's logit minus the
    other logits' mean (two classes: logit_1 - logit_0, the evidence for the target over the
    other class) rather than the target logit alone. Returns (maps float (N, H, W) >= 0, the
    layer used)."""
    from captum.attr import LayerAttribution, LayerGradCam, LayerGradientXActivation

    if method not in ATTRIBUTION_METHODS:
        raise MechanismError(f"method must be one of {list(ATTRIBUTION_METHODS)}; got {method!r}.")
    device = _device(device)
    images = np.asarray(images)
    if images.ndim != 3 or images.dtype != np.uint8 or not len(images):
        raise MechanismError(f"expected uint8 images (N, H, W) with N >= 1; got {images.dtype} "
                             f"{images.shape}.")
    model.eval().to(device)
    if layer == AUTO:
        layer = cam_layer(model, images.shape[1])
    module = _layer_module(model, layer)
    forward = _Contrast(model) if contrast else model
    layout = token_layout(model)  # None for a CNN
    explainer = (LayerGradCam if method == "gradcam" else LayerGradientXActivation)(forward, module)
    maps = []
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size]))
        x = prep(batch.to(device)).requires_grad_(True)
        if layout is not None:
            cam = _token_cam(forward, module, x, method, int(target), layout, layer)
        elif method == "gradcam":
            cam = explainer.attribute(x, target=int(target), relu_attributions=True)
        else:
            cam = explainer.attribute(x, target=int(target))
        if not isinstance(cam, torch.Tensor) or cam.ndim != 4:
            shape = tuple(cam.shape) if isinstance(cam, torch.Tensor) else type(cam).__name__
            raise MechanismError(
                f"{method} needs a layer with a spatial feature map (N, C, H, W); {layer!r} of "
                f"{_arch_name(model)} gives {shape}. Use layer='auto' or a block "
                "(feature_layers(model) lists them).")
        if method == "hirescam":
            cam = cam.sum(dim=1, keepdim=True).clamp_min(0)
        up = LayerAttribution.interpolate(cam, tuple(images.shape[1:]), interpolate_mode="bilinear")
        maps.append(up.detach()[:, 0].clamp_min(0).float().cpu())
    model.zero_grad(set_to_none=True)
    return torch.cat(maps).numpy(), layer


def _token_cam(forward: nn.Module, module: nn.Module, x: torch.Tensor, method: str,
               target: int, layout: TokenLayout, layer: str) -> torch.Tensor:
    """A ViT layer's map (N, C, gh, gw) before the channel sum (HiResCAM: gradient x
    activation) or (N, 1, gh, gw) (Grad-CAM), its patch tokens on the patch grid: CLS and
    register tokens dropped. Grad-CAM averages the gradients over the patches."""
    from captum.attr import LayerActivation, LayerGradientXActivation

    size = x.shape[-2:]
    hirescam = method == "hirescam"
    gradients = LayerGradientXActivation(forward, module, multiply_by_inputs=hirescam)
    cam = layout.patch_grid(gradients.attribute(x, target=target), *size)
    if not cam.any():
        raise MechanismError(
            f"the patch tokens of {layer!r} do not reach the classifier (their gradient is 0): "
            "a head that reads the CLS token after the final norm gets nothing from the last "
            "block's patch tokens. Use layer='auto' (the tokens the last block reads).")
    if hirescam:
        return cam
    activations = layout.patch_grid(LayerActivation(forward, module).attribute(x), *size)
    return (cam.mean(dim=(2, 3), keepdim=True) * activations).sum(dim=1, keepdim=True).clamp_min(0)


def mask_shares(maps: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Per image: attribution mass inside the mask / total mass (NaN where the map is all 0)."""
    maps = np.asarray(maps, dtype=np.float64)
    masks = np.asarray(masks, dtype=bool)
    total = maps.sum(axis=(1, 2))
    inside = (maps * masks).sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, inside / total, np.nan)


@dataclass
class AttributionMaps:
    """What :func:`attribution_maps` computed: images, masks, activation maps, per-image shares."""

    images: np.ndarray
    masks: np.ndarray
    maps: np.ndarray
    shares: np.ndarray
    image_ids: list[str]
    layer: str
    target: int
    method: str = "hirescam"
    contrast: bool = True
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, int))


def _require_mask(confounder) -> None:
    from ..confounders.registry import masked_confounders

    if confounder is None or getattr(confounder, "kind", None) != "synthetic" or not confounder.has_mask:
        name = "none" if confounder is None else confounder.name
        why = ("a sampled confounder (an attribute) has no pixels"
               if getattr(confounder, "kind", None) == "sampled" else "it reports no pixel mask")
        raise MechanismError(
            f"attribution inside the confounder's mask was asked for confounder {name!r}, but "
            f"{why}. Attribution shares need a localised confounder: "
            f"{', '.join(masked_confounders())}. Set attribution off for {name!r} (grid: "
            "attribution: false, or leave it to mechanisms_for_run, which skips it)."
        )


def attribution_maps(model: nn.Module, prep, rows: pd.DataFrame, cache, confounder, *, seed: int,
                     root: str | os.PathLike | None = None, resize: str = "bilinear",
                     method: str = "hirescam", layer: str = AUTO, target: int = 1,
                     contrast: bool = True, max_images: int | None = None,
                     batch_size: int = 32, device: str | torch.device = "cpu") -> AttributionMaps:
    """Activation maps (:func:`activation_maps`) and pixel masks of the confounded ``rows`` (the run's o.o.d. rows, with a
    ``confounded`` column: for a synthetic confounder, its negatives), images made exactly as
    the run made them (``seed``, ``root``, ``resize`` of the run)."""
    from ..data import ConfoundedImageDataset, row_views
    from ..hounsfield import read_hu_png
    from ..imaging import load_grey

    _require_mask(confounder)
    if "confounded" not in rows.columns:
        raise MechanismError("rows need a 'confounded' column (apply_prevalence / split_rows "
                             "give one); pass the run's o.o.d. rows (splits['ood']).")
    chosen = rows[rows["confounded"].astype(bool)].reset_index(drop=True)
    if chosen.empty:
        raise MechanismError(f"none of the {len(rows)} rows carries {confounder.name!r}: pass the "
                             "run's o.o.d. rows (splits['ood']), where every negative carries it.")
    if max_images is not None and len(chosen) > max_images:
        chosen = chosen.iloc[_pick(chosen["image_id"], max_images, seed, "attribution")]
        chosen = chosen.reset_index(drop=True)
    dataset = ConfoundedImageDataset(chosen, cache, confounder=confounder, seed=seed, root=root,
                                     resize=resize)
    images = np.stack([dataset.image(i) for i in range(len(chosen))])
    masks = []
    views = row_views(chosen)
    for i, image_id in enumerate(chosen["image_id"]):
        if views[i] is not None:  # a CT slice in HU: the mask is made as prepare makes the image
            original = read_hu_png(Path(root) / chosen.at[i, "path"])
        elif confounder.resolution == "input":
            original = np.asarray(cache.array[dataset.positions[i]])
        else:
            if root is None or "path" not in chosen.columns:
                raise MechanismError(
                    f"{confounder.name!r} acts on the stored images (resolution "
                    f"{confounder.resolution!r}): pass root= (the manifest's root) and rows with "
                    "a 'path' column.")
            original = load_grey(Path(root) / chosen.at[i, "path"])
        masks.append(confounder.input_mask(original, seed, image_id, size=cache.size,
                                           resize=resize, view=views[i]))
    masks = np.stack(masks)
    maps, layer = activation_maps(model, prep, images, method=method, layer=layer, target=target,
                                  contrast=contrast, batch_size=batch_size, device=device)
    return AttributionMaps(images=images, masks=masks, maps=maps, shares=mask_shares(maps, masks),
                           image_ids=chosen["image_id"].astype(str).tolist(), layer=layer,
                           target=int(target), method=method, contrast=contrast,
                           labels=chosen["label"].to_numpy(int))


def attribution_for_run(model: nn.Module, prep, rows: pd.DataFrame, cache, confounder, *,
                        seed: int, root: str | os.PathLike | None = None,
                        resize: str = "bilinear", method: str = "hirescam", layer: str = AUTO,
                        target: int = 1, contrast: bool = True, max_images: int | None = None,
                        n_boot: int = 1000, batch_size: int = 32,
                        device: str | torch.device = "cpu") -> dict[str, Any]:
    """Share of attribution mass inside the confounder's mask on the run's confounded o.o.d.
    images (``method``: "hirescam", the default, or "gradcam"; see the module's docstring).

    Call at the end of ``execute_run`` with the fine-tuned model, its ``prep``, the o.o.d.
    rows (``splits["ood"]``), the run's image cache and confounder, ``seed=config.seed``,
    ``root=manifest.root``, ``resize=config.resize``. ``target=1``: attribution of the positive
    class, the class the confounder went with in training (on an o.o.d. negative carrying it,
    a shortcut model finds its "positive" evidence in the marker). Returns:

    - ``attribution_share``: mean over images of (mass inside the mask / total mass), with a
      bootstrap interval over images (``_ci_low``/``_ci_high``) and the median;
    - ``mask_share``: mean share of the image area the mask covers (the chance level);
    - ``attribution_ratio``: attribution_share / mask_share (1: no more than chance);
    - ``attribution_n`` images used, ``attribution_n_empty`` of them with an all-zero map
      (left out of the means), the layer, target and method.

    Raises MechanismError for a confounder without a pixel mask (low-pass, noise, sex).
    """
    result = attribution_maps(model, prep, rows, cache, confounder, seed=seed, root=root,
                              resize=resize, method=method, layer=layer, target=target,
                              contrast=contrast, max_images=max_images, batch_size=batch_size,
                              device=device)
    return summarise_attribution(result, n_boot=n_boot, seed=seed)


def summarise_attribution(result: AttributionMaps, *, n_boot: int = 1000, seed: int = 0) -> dict:
    """The flat, JSON-ready summary of :func:`attribution_maps` (see :func:`attribution_for_run`)."""
    shares = result.shares
    ok = np.isfinite(shares)
    area = result.masks.reshape(len(result.masks), -1).mean(axis=1)
    mean_share = float(shares[ok].mean()) if ok.any() else float("nan")
    low = high = float("nan")
    if ok.sum() >= 2:
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), 3131]))
        draws = rng.integers(0, ok.sum(), size=(n_boot, ok.sum()))
        low, high = (float(v) for v in np.percentile(shares[ok][draws].mean(axis=1), [2.5, 97.5]))
    mask_share = float(area[ok].mean()) if ok.any() else float(area.mean())
    return {
        "attribution_share": mean_share,
        "attribution_share_ci_low": low,
        "attribution_share_ci_high": high,
        "attribution_share_median": float(np.median(shares[ok])) if ok.any() else float("nan"),
        "mask_share": mask_share,
        "attribution_ratio": mean_share / mask_share if mask_share > 0 else float("nan"),
        "attribution_n": int(ok.sum()),
        "attribution_n_empty": int((~ok).sum()),
        "attribution_layer": result.layer,
        "attribution_target": int(result.target),
        "attribution_method": result.method,
        "attribution_contrast": bool(result.contrast),
    }
