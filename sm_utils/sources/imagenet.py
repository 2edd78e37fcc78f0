"""ImageNet weights of timm architectures, read from a local file (never downloaded)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..weights import (
    SourceError,
)
from .architectures import KERAS_ARCH, _check_arch, _timm_pretrained_cfg
from .preprocessing import timm_preprocessing
from .registry import Source, _load_file, _required_file, register_source


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _find_imagenet_weights(arch: str, weights: Path | None) -> Path:
    if weights is not None:
        return _required_file("imagenet", "a timm ImageNet weights file")(arch, weights)
    cfg = _timm_pretrained_cfg(arch)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise SourceError(
            f"timm has no pretrained ImageNet weights for {arch!r}; see timm.list_pretrained()."
        )
    from huggingface_hub import constants, try_to_load_from_cache

    repo = cfg.hf_hub_id.split("@")[0] if cfg.hf_hub_id else None
    if repo:
        for filename in ("model.safetensors", "pytorch_model.bin"):
            found = try_to_load_from_cache(repo, filename)
            if isinstance(found, str) and Path(found).is_file():
                return Path(found)
    if cfg.url:
        hub_file = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg.url)
        if hub_file.is_file():
            return hub_file
    where = (
        f"download https://huggingface.co/{repo}/resolve/main/model.safetensors and pass "
        f"weights='<path>/model.safetensors', or fill the Hugging Face cache "
        f"({constants.HF_HUB_CACHE}) with `huggingface-cli download {repo} model.safetensors` "
        "on a machine with internet"
        if repo
        else f"download {cfg.url} into {Path(torch.hub.get_dir()) / 'checkpoints'}"
    )
    if _offline() or not repo:
        raise SourceError(
            f"ImageNet weights for timm model {arch!r} are not on this machine and downloads "
            f"are off (HF_HUB_OFFLINE=1). To use them, {where}."
        )
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo, "model.safetensors"))
    except Exception as exc:  # network errors vary; the advice is the same
        raise SourceError(
            f"Could not download ImageNet weights for {arch!r} ({type(exc).__name__}). "
            f"To use them offline, {where}."
        ) from exc


def timm_pretrained_tag(arch: str) -> str:
    """``arch`` with its timm pretrained tag: a name without one gets timm's default tag.

    ``"resnet50"`` -> ``"resnet50.a1_in1k"`` (timm 1.0's default for resnet50, NOT
    ``resnet50.tv_in1k``); a tagged name is returned as it is. Reads timm's registry only
    (no network). Raises SourceError if timm has no pretrained weights for ``arch``.
    """
    _check_arch(arch)
    if arch == KERAS_ARCH:
        raise SourceError(f"{KERAS_ARCH!r} is not a timm model; it has no timm pretrained tag.")
    cfg = _timm_pretrained_cfg(arch)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise SourceError(
            f"timm has no pretrained weights for {arch!r}; timm.list_pretrained("
            f"'{arch.split('.')[0]}*') lists the tags that have them. For weights of your own, "
            f"use source='file' with arch={arch!r}."
        )
    if "." in arch or not cfg.tag:
        return arch
    return f"{cfg.architecture}.{cfg.tag}"


def _imagenet_arch(arch: str) -> str:
    if arch == KERAS_ARCH:
        raise SourceError(
            "Source 'imagenet' holds timm (PyTorch) ImageNet weights, which do not fit "
            f"{KERAS_ARCH!r}. For Keras' ImageNet weights in {KERAS_ARCH!r} (the paper's "
            "ImageNet arm) use source='imagenet_keras' with "
            "weights=<resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5>; or give 'imagenet' "
            "a timm name such as 'resnet50.tv_in1k'."
        )
    return timm_pretrained_tag(arch)


def _imagenet_provenance(arch: str) -> str:
    text = (
        f"ImageNet weights from timm, pretrained tag {arch!r}: a timm/PyTorch ImageNet variant, "
        "NOT the paper's Keras ImageNet ResNet50 weights (those are source 'imagenet_keras')."
    )
    if arch.split(".")[-1] == "tv_in1k":
        text += (
            " tv_in1k is torchvision's original recipe, the closest timm tag to the paper's "
            "Keras ImageNet weights (but torchvision's ResNet50 is 'v1.5', Keras' 'v1')."
        )
    return text + (
        " An arch given without a tag is recorded as timm's default pretrained tag for it. "
        "With weights=<file> the file is loaded into this architecture as it is."
    )


register_source(
    Source(
        name="imagenet",
        default_arch="resnet50.tv_in1k",
        provenance=_imagenet_provenance,
        find_weights=_find_imagenet_weights,
        load=_load_file,
        preprocessing=lambda arch, path: timm_preprocessing(arch),
        resolve_arch=_imagenet_arch,
    )
)
