"""A timm vision transformer from a local checkpoint file: DINOv2 (ViT-S/14, ViT-B/14 ...) and
any timm ViT, as timm or the model's authors publish it.

The file is a plain state dict (safetensors, or a torch.save file read with
``weights_only=True``) in timm's layout (``timm/<name>`` on Hugging Face: model.safetensors)
or in the original DINOv2 layout (``dinov2_vits14_pretrain.pth``: timm's keys plus
``mask_token``), which timm's own ``checkpoint_filter_fn`` converts. The model is built at the
requested input size; timm's filter resamples the position embedding to that grid, as timm does
for its own pretrained weights. Before it, the file's width, depth and patch size are checked
against the architecture: timm would otherwise resample a patch embedding of another patch size
without a word.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..weights import SourceError, WeightsError, load_checked, read_state_dict
from .architectures import KERAS_ARCH, _check_arch, _timm_pretrained_cfg
from .foundation import (
    FoundationClassifier,
    check_patch_multiple,
    key_sample,
    refuse_head_keeping,
    square,
)
from .preprocessing import Preprocessing, timm_preprocessing
from .registry import Source, _required_file, register_source

# The file's own classifier (a ViT fine-tuned on ImageNet has one) is the only part of a
# checkpoint that may go unused: the model gets a fresh head.
ALLOWED_UNUSED = ("head",)
DINOV2_ARCHS = (
    "vit_small_patch14_dinov2",
    "vit_base_patch14_dinov2",
    "vit_large_patch14_dinov2",
    "vit_giant_patch14_dinov2",
    "vit_small_patch14_reg4_dinov2",
    "vit_base_patch14_reg4_dinov2",
    "vit_large_patch14_reg4_dinov2",
    "vit_giant_patch14_reg4_dinov2",
)
DINOV2_ARCHS += tuple(f"{arch}.lvd142m" for arch in DINOV2_ARCHS)  # timm's pretrained tag
# ViT widths by name, for the error that says which ViT a file holds.
_WIDTHS = {192: "ViT-Ti", 384: "ViT-S", 768: "ViT-B", 1024: "ViT-L", 1280: "ViT-H", 1536: "ViT-g"}


def timm_vit_arch(arch: str) -> str:
    """``arch`` if timm builds it as a VisionTransformer, else SourceError."""
    from timm.models import is_model_in_modules

    if arch == KERAS_ARCH:
        raise SourceError(f"{KERAS_ARCH!r} is a ResNet50, not a vision transformer.")
    _check_arch(arch)
    if not is_model_in_modules(arch.split(".")[0], ["vision_transformer"]):
        raise SourceError(
            f"{arch!r} is not a timm VisionTransformer (timm.models.vision_transformer), which "
            "the ViT sources load. Use a name from timm.list_models('vit_*'), e.g. "
            "'vit_small_patch14_dinov2', or source='file' for another architecture."
        )
    return arch


def _default_size(arch: str) -> tuple[int, int]:
    cfg = _timm_pretrained_cfg(arch)
    return square(tuple(cfg.input_size[1:])) if cfg is not None else (224, 224)


def _shape_of(model) -> dict:
    return {
        "width": int(model.embed_dim),
        "depth": len(model.blocks),
        "patch": tuple(model.patch_embed.proj.weight.shape[-2:]),
    }


def _file_shape(state: dict) -> dict | None:
    weight = state.get("patch_embed.proj.weight")
    if weight is None or weight.ndim != 4:
        return None
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    return {"width": int(weight.shape[0]), "depth": len(blocks),
            "patch": tuple(weight.shape[-2:])}


def _describe(shape: dict) -> str:
    name = _WIDTHS.get(shape["width"], "a ViT")
    return (f"{name} (width {shape['width']}, {shape['depth']} blocks, patch "
            f"{shape['patch'][0]}x{shape['patch'][1]})")


def check_vit_file(state: dict, model, arch: str, path: Path) -> None:
    """WeightsError unless the file holds a ViT of ``model``'s width, depth and patch size."""
    found = _file_shape(state)
    if found is None and "conv_proj.weight" in state:
        raise WeightsError(
            f"{path} is a torchvision ViT state dict (keys conv_proj.weight, "
            "encoder.layers.*), whose layout timm does not convert. Use timm's release of the "
            f"same weights (huggingface.co/timm/<name>, model.safetensors) for {arch}."
        )
    if found is None:
        raise WeightsError(
            f"{path} is not a timm or DINOv2 ViT checkpoint: it has no patch embedding "
            f"'patch_embed.proj.weight' (found keys: {key_sample(state)}). Expected the "
            f"state dict of {arch} (timm's model.safetensors from huggingface.co/timm, or the "
            "original DINOv2 .pth); for a transformers folder use source 'transformers_vit', "
            "for an open_clip checkpoint source 'open_clip'."
        )
    expected = _shape_of(model)
    if found != expected:
        raise WeightsError(
            f"{path} holds {_describe(found)}, but {arch} is {_describe(expected)}: the file is "
            "for another architecture. Set arch to the timm name of the file's model (e.g. "
            "'vit_base_patch14_dinov2' for a DINOv2 ViT-B/14 file) or point weights at the "
            f"file of {arch}."
        )


def build_timm_vit(source: str, arch: str, path: Path | None, *, num_classes: int,
                   drop_rate: float, image_size, keep_pretrained_head: bool,
                   allowed_unused: tuple[str, ...] = ALLOWED_UNUSED):
    """The ViT ``arch`` at ``image_size`` (default: its pretrained size) with the file's
    weights, every key checked, and a fresh head; its preprocessing says size and patch."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    refuse_head_keeping(source, keep_pretrained_head)
    size = square(image_size) if image_size is not None else _default_size(arch)
    spec = {"arch": arch, "image_size": list(size)}
    backbone = vit_backbone(spec)
    patch = tuple(backbone.patch_embed.patch_size)
    check_patch_multiple(size, patch, f"Source {source!r} ({arch})")
    unused: list[str] = []
    if path is not None:
        state, _ = read_state_dict(path)
        check_vit_file(state, backbone, arch, path)
        # timm's own conversion: the original DINOv2 layout, the position embedding resampled
        # to this grid; the file's classifier is dropped only by name (allowed_unused).
        state = checkpoint_filter_fn(dict(state), backbone)
        unused = load_checked(backbone, state, skip_prefixes=allowed_unused,
                              what=f"{source} weights ({path})").skipped
    prep = timm_preprocessing(arch)
    prep = Preprocessing(f"timm:{arch}", mean=prep.mean, std=prep.std, input_size=size,
                         patch_size=patch[0])
    model = FoundationClassifier(
        backbone, kind="timm", num_features=backbone.num_features, num_classes=num_classes,
        drop_rate=drop_rate, arch_name=arch,
        pretrained_cfg={"input_size": (3, *size), "patch_size": patch[0],
                        "mean": prep.mean, "std": prep.std},
        unused_keys=unused, backbone_spec=spec,
    )
    return model, prep


def vit_backbone(spec: dict):
    """The timm ViT ``spec["arch"]`` at ``spec["image_size"]``, randomly initialised, without
    a classifier."""
    import timm

    return timm.create_model(spec["arch"], pretrained=False, num_classes=0,
                             img_size=square(spec["image_size"]))


def _preprocessing(arch: str, path: Path | None) -> Preprocessing:
    import timm
    import torch

    with torch.device("meta"):  # the patch size without allocating the model
        patch = timm.create_model(arch, pretrained=False, num_classes=0).patch_embed.patch_size
    prep = timm_preprocessing(arch)
    return Preprocessing(f"timm:{arch}", mean=prep.mean, std=prep.std,
                         input_size=_default_size(arch), patch_size=int(patch[0]))


def register_timm_vit_source(name: str, *, default_arch: str | None, provenance: str,
                             archs: tuple[str, ...] | None = None,
                             allowed_unused: tuple[str, ...] = ALLOWED_UNUSED,
                             replace: bool = False) -> Source:
    """Register a source that loads a timm ViT checkpoint file (``weights=<file>``)."""

    def build(arch, path, **options):
        return build_timm_vit(name, arch, path, allowed_unused=allowed_unused, **options)

    return register_source(
        Source(
            name=name,
            default_arch=default_arch,
            provenance=provenance,
            find_weights=_required_file(
                name, "a timm ViT checkpoint: model.safetensors or a .pth state dict"),
            load=None,
            preprocessing=_preprocessing,
            archs=archs,
            resolve_arch=timm_vit_arch,
            build=build,
        ),
        replace=replace,
    )


register_timm_vit_source(
    "dinov2",
    default_arch="vit_small_patch14_dinov2",
    archs=DINOV2_ARCHS,
    provenance="DINOv2 (Meta, self-supervised on LVD-142M), a timm ViT checkpoint supplied by "
    "the user: timm's model.safetensors from huggingface.co/timm/<arch>.lvd142m or the original "
    "dinov2_vit*14_pretrain.pth. Built at the run's input size (pretrained at 518 px; the "
    "position embedding resampled by timm); features: the CLS token after the final norm; "
    "preprocessing ImageNet mean/std.",
)

register_timm_vit_source(
    "timm_vit",
    default_arch=None,
    provenance="A timm VisionTransformer checkpoint supplied by the user (a plain state dict in "
    "timm's layout: safetensors or a .pth read with weights_only=True); the file's own "
    "classifier 'head' is left out, every other key must fit; preprocessing from timm's "
    "pretrained config of the arch.",
)
