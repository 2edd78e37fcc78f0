"""Pretraining sources: a name maps to an architecture, a weight loader and a preprocessing recipe.

Sources disagree on preprocessing (Keras "caffe" mode for the paper's ResNet50s, ImageNet
mean/std for timm, (x - 127) / 128 for EfficientNet-Lite), so each source carries its own
:class:`Preprocessing`; nothing about it is global.

    model, prep = create_model("imagenet_lite0", num_classes=2, drop_rate=0.5)
    logits = model(prep(uint8_batch))          # (N, H, W) or (N, 1, H, W) uint8 -> (N, 2)
    describe_source("imagenet_lite0")          # name, arch, weights path, sha256, provenance

A new source is one :class:`Source` (its default architecture, provenance text, a function
that finds its weights file, one that loads it into a model, and one that gives its
preprocessing) passed to :func:`register_source`.

:func:`check_source_arch` checks a (source, architecture) pair and returns the architecture a
run will use, without reading any weights file: a grid can check every pair up front.

Modules: ``preprocessing`` (the recipes), ``architectures`` (Keras ResNet50 or timm),
``registry`` (:class:`Source`, :func:`create_model`, :func:`describe_source`), and one module
per family of sources, each registering its own on import: ``imagenet`` (timm ImageNet from a
local file), ``keras`` (the paper's Keras .h5 weights: RadImageNet, Keras ImageNet; and
RadImageNet's PyTorch release), ``generic`` (random initialisation, a weights file),
``demo`` (the offline demo's sources), and the foundation models in their published formats,
built by the source itself (``Source.build``): ``timm_vit`` (DINOv2 and any timm ViT
checkpoint), ``transformers_folder`` (a transformers folder: RAD-DINO), ``openclip`` (an
open_clip vision tower: BiomedCLIP, OpenAI CLIP), with ``foundation`` (what they share) and
``rebuild`` (such a model rebuilt without its weights file, for a kept fine-tuned state dict).
"""

from __future__ import annotations

from ..weights import SourceError, WeightsError, load_checked, read_state_dict, strip_prefix
from . import generic, openclip, timm_vit, transformers_folder  # noqa: F401  (register)
from .architectures import KERAS_ARCH, check_image_size, make_architecture
from .demo import LITE0_ARCH, RADIOLOGY_PHANTOM_DEFAULT, REPO_ROOT, map_lite0_state_dict
from .imagenet import timm_pretrained_tag
from .keras import keras_resnet_is_h5
from .preprocessing import (
    CAFFE,
    CAFFE_RESCALED,
    LITE,
    Preprocessing,
    default_preprocessing,
    timm_preprocessing,
)
from .rebuild import rebuild_foundation
from .registry import (
    Source,
    check_source_arch,
    create_model,
    describe_source,
    get_source,
    list_sources,
    register_source,
)

__all__ = [
    "CAFFE",
    "CAFFE_RESCALED",
    "KERAS_ARCH",
    "LITE",
    "LITE0_ARCH",
    "RADIOLOGY_PHANTOM_DEFAULT",
    "REPO_ROOT",
    "Preprocessing",
    "Source",
    "SourceError",
    "WeightsError",
    "check_image_size",
    "check_source_arch",
    "create_model",
    "default_preprocessing",
    "describe_source",
    "get_source",
    "keras_resnet_is_h5",
    "list_sources",
    "load_checked",
    "make_architecture",
    "map_lite0_state_dict",
    "read_state_dict",
    "rebuild_foundation",
    "register_source",
    "strip_prefix",
    "timm_preprocessing",
    "timm_pretrained_tag",
]
