"""An open_clip model's vision tower, as BiomedCLIP and OpenAI CLIP are published: an open_clip
model config and a checkpoint holding the whole CLIP state dict, of which only ``visual.*`` is
loaded.

``arch`` names the config: an open_clip model name (``open_clip.list_models()``, e.g.
``ViT-B-16-quickgelu`` for OpenAI's CLIP ViT-B/16, which was trained with QuickGELU), or
``hf-hub:<repo>`` for a model whose config is the ``open_clip_config.json`` published beside
its checkpoint (BiomedCLIP); that file must then be in the weights' folder. Only the vision
tower is built (open_clip's own builder), so a text tower that would need a download (
BiomedCLIP's PubMedBERT) is never built. The checkpoint (``open_clip_model.safetensors``, or
``open_clip_pytorch_model.bin`` read with ``weights_only=True``) must hold every key of the
tower; its text tower and ``logit_scale`` are the named set left unused.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..weights import SourceError, WeightsError, load_checked, read_state_dict
from .foundation import (
    FoundationClassifier,
    check_patch_multiple,
    key_sample,
    refuse_head_keeping,
    square,
)
from .preprocessing import Preprocessing
from .registry import Source, register_source

CONFIG = "open_clip_config.json"
# open_clip's own names for them, in its order of preference (safetensors first)
CHECKPOINTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
               "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth")
HF_HUB = "hf-hub:"
VISUAL = "visual."


def _open_clip():
    import open_clip

    return open_clip


def open_clip_arch(arch: str) -> str:
    """``arch`` if it names an open_clip config (or ``hf-hub:<repo>``), else SourceError."""
    if arch.startswith(HF_HUB) and len(arch) > len(HF_HUB):
        return arch
    names = _open_clip().list_models()
    if arch not in names:
        import difflib

        close = difflib.get_close_matches(arch, names, n=6, cutoff=0.6)
        raise SourceError(
            f"Unknown open_clip model {arch!r}. Expected a name from open_clip.list_models() "
            f"(close: {', '.join(close) or 'none'}) or 'hf-hub:<repo>' with the repo's {CONFIG} "
            "in the weights folder."
        )
    return arch


def find_checkpoint(source: str):
    """``weights``: the checkpoint file, or its folder (open_clip's file names)."""

    def find(arch: str, weights: Path | None) -> Path:
        if weights is None:
            raise SourceError(
                f"Source {source!r} needs weights=<an open_clip checkpoint "
                f"({' or '.join(CHECKPOINTS)}) or its folder>."
            )
        if weights.is_dir():
            found = [weights / name for name in CHECKPOINTS if (weights / name).is_file()]
            if not found:
                raise SourceError(
                    f"Source {source!r}: {weights} has no open_clip checkpoint (expected "
                    f"{' or '.join(CHECKPOINTS)}); point weights at the checkpoint file."
                )
            weights = found[0]
        if not weights.is_file():
            raise SourceError(f"Source {source!r}: weights file not found: {weights}.")
        if arch.startswith(HF_HUB) and not (weights.parent / CONFIG).is_file():
            raise SourceError(
                f"Source {source!r} with arch {arch!r} reads the model config from {CONFIG} "
                f"beside the checkpoint, but {weights.parent} has none. Download it from "
                f"huggingface.co/{arch[len(HF_HUB):]} into that folder, or set arch to an "
                "open_clip model name."
            )
        return weights

    return find


def _read_config(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SourceError(f"{path} cannot be read as JSON ({exc}); download it again.") from exc
    if not isinstance(data.get("model_cfg"), dict) or "vision_cfg" not in data["model_cfg"]:
        raise SourceError(f"{path} has no model_cfg.vision_cfg: not an open_clip config file.")
    return data


def _vision_part(cfg: dict) -> dict:
    """What decides the vision tower, with open_clip's defaults filled in."""
    from open_clip.model import CLIPVisionCfg

    try:
        vision = CLIPVisionCfg(**cfg.get("vision_cfg", {}))
    except TypeError as exc:
        raise SourceError(f"open_clip cannot read this vision_cfg ({exc}).") from exc
    return {"embed_dim": cfg.get("embed_dim"), "quick_gelu": bool(cfg.get("quick_gelu", False)),
            "vision_cfg": vision}


def model_config(arch: str, path: Path | None) -> tuple[dict, dict]:
    """(model_cfg, preprocess_cfg) of ``arch``; a published config beside the checkpoint must
    agree with a named one (a GELU tower given QuickGELU weights loads, but computes wrong)."""
    beside = path.parent / CONFIG if path is not None else None
    published = _read_config(beside) if beside is not None and beside.is_file() else None
    if arch.startswith(HF_HUB):
        if published is None:
            raise SourceError(f"arch {arch!r} needs {CONFIG} beside the checkpoint.")
        return published["model_cfg"], published.get("preprocess_cfg", {})
    named = _open_clip().get_model_config(arch)
    if published is not None and _vision_part(published["model_cfg"]) != _vision_part(named):
        differ = {k: (v, _vision_part(named)[k]) for k, v in
                  _vision_part(published["model_cfg"]).items() if v != _vision_part(named)[k]}
        raise SourceError(
            f"{beside} describes another vision tower than open_clip's {arch!r}: "
            + "; ".join(f"{k} {a!r} there, {b!r} in {arch!r}" for k, (a, b) in differ.items())
            + ". Set arch to the "
            f"open_clip name of this checkpoint (e.g. 'ViT-B-16-quickgelu' for OpenAI's CLIP) or "
            f"'{HF_HUB}<repo>' to use {CONFIG}."
        )
    return named, (published or {}).get("preprocess_cfg", named.get("preprocess_cfg", {}))


def _preprocessing_of(source: str, model_cfg: dict, preprocess_cfg: dict,
                      patch: int | None) -> Preprocessing:
    oc = _open_clip()
    mean = preprocess_cfg.get("mean") or oc.OPENAI_DATASET_MEAN
    std = preprocess_cfg.get("std") or oc.OPENAI_DATASET_STD
    return Preprocessing(
        f"{source}:open_clip",
        mean=tuple(float(m) * 255 for m in mean),
        std=tuple(float(s) * 255 for s in std),
        input_size=square(model_cfg["vision_cfg"].get("image_size", 224)),
        patch_size=patch,
    )


def _tower_patch(visual) -> int | None:
    """The tower's patch size; None for a tower without patches (a CLIP ResNet)."""
    trunk = getattr(visual, "trunk", None)
    if trunk is not None and hasattr(getattr(trunk, "patch_embed", None), "patch_size"):
        return int(square(trunk.patch_embed.patch_size)[0])
    if hasattr(visual, "patch_size"):
        return int(square(visual.patch_size)[0])
    return None


def _build_tower(model_cfg: dict):
    from open_clip.model import CLIPVisionCfg, _build_vision_tower

    vision = dict(model_cfg["vision_cfg"])
    vision["timm_model_pretrained"] = False  # weights come from the checkpoint, never a download
    return _build_vision_tower(int(model_cfg["embed_dim"]), CLIPVisionCfg(**vision),
                               quick_gelu=bool(model_cfg.get("quick_gelu", False)))


def visual_state(state: dict, path: Path, arch: str) -> dict:
    """The ``visual.*`` tensors of a CLIP state dict, prefix removed; WeightsError if none."""
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    visual = {k[len(VISUAL):]: v for k, v in state.items() if k.startswith(VISUAL)}
    if not visual:
        raise WeightsError(
            f"{path} holds no vision tower: expected the keys 'visual.*' of an open_clip CLIP "
            f"state dict ({arch}), found {len(state)} keys without it ({key_sample(state)}). "
            "The file holds text weights only, or is not an open_clip checkpoint: point weights "
            "at the model's open_clip_model.safetensors / open_clip_pytorch_model.bin."
        )
    return visual


def build_open_clip(source: str, arch: str, path: Path | None, *, num_classes: int,
                    drop_rate: float, image_size, keep_pretrained_head: bool):
    refuse_head_keeping(source, keep_pretrained_head)
    model_cfg, preprocess_cfg = model_config(arch, path)
    tower = _build_tower(model_cfg)
    patch = _tower_patch(tower)
    size = square(model_cfg["vision_cfg"].get("image_size", 224))
    what = f"Source {source!r} ({arch})"
    if image_size is not None and square(image_size) != size:
        if patch is not None:
            check_patch_multiple(image_size, patch, what)
        raise SourceError(
            f"{what} takes {size[0]}x{size[1]} images (its config's image_size), got "
            f"{square(image_size)[0]}x{square(image_size)[1]}; its position embedding is not "
            f"resampled here. Use image_size={size[0]}."
        )
    if patch is not None:
        check_patch_multiple(size, patch, what)
    unused: list[str] = []
    if path is not None:
        state, _ = read_state_dict(path)
        visual = visual_state(state, path, arch)
        load_checked(tower, visual,
                     what=f"{source} vision tower weights ({path}, keys 'visual.*')")
        unused = [k for k in state if not k.removeprefix("module.").startswith(VISUAL)]
    prep = _preprocessing_of(source, model_cfg, preprocess_cfg, patch)
    model = FoundationClassifier(
        tower, kind="open_clip", num_features=int(model_cfg["embed_dim"]),
        num_classes=num_classes, drop_rate=drop_rate, arch_name=f"open_clip:{arch}",
        pretrained_cfg={"input_size": (3, *size), "patch_size": patch,
                        "mean": prep.mean, "std": prep.std},
        unused_keys=unused, backbone_spec={"model_cfg": model_cfg},
    )
    return model, prep


def tower_from_config(spec: dict):
    """The vision tower of ``spec["model_cfg"]`` (an open_clip model config), randomly
    initialised."""
    return _build_tower(spec["model_cfg"])


def _preprocessing(source: str):
    def preprocessing(arch: str, path: Path | None) -> Preprocessing:
        import torch

        model_cfg, preprocess_cfg = model_config(arch, path)
        with torch.device("meta"):  # the patch size without allocating the tower
            patch = _tower_patch(_build_tower(model_cfg))
        return _preprocessing_of(source, model_cfg, preprocess_cfg, patch)

    return preprocessing


def register_open_clip_source(name: str, *, default_arch: str | None, provenance: str,
                              archs: tuple[str, ...] | None = None,
                              replace: bool = False) -> Source:
    """Register a source that loads an open_clip checkpoint's vision tower."""

    def build(arch, path, **options):
        return build_open_clip(name, arch, path, **options)

    return register_source(
        Source(
            name=name,
            default_arch=default_arch,
            provenance=provenance,
            find_weights=find_checkpoint(name),
            load=None,
            preprocessing=_preprocessing(name),
            archs=archs,
            resolve_arch=open_clip_arch,
            build=build,
        ),
        replace=replace,
    )


BIOMEDCLIP = "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"

register_open_clip_source(
    "biomedclip",
    default_arch=BIOMEDCLIP,
    archs=(BIOMEDCLIP,),
    provenance="BiomedCLIP (Microsoft, CLIP trained on PMC-15M figure-caption pairs): the vision "
    "tower (a timm ViT-B/16 with a linear projection) of open_clip_pytorch_model.bin from "
    "huggingface.co/microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224, with "
    "open_clip_config.json beside it, supplied by the user; the PubMedBERT text tower is not "
    "built. Features: the image embedding (encode_image, not normalised); normalisation from "
    "the config's preprocess_cfg.",
)

register_open_clip_source(
    "clip_openai",
    default_arch="ViT-B-16-quickgelu",
    provenance="OpenAI CLIP (WIT-400M image-text pairs), the vision tower of open_clip's "
    "release of its weights (open_clip_model.safetensors from "
    "huggingface.co/timm/vit_base_patch16_clip_224.openai), supplied by the user; built by "
    "open_clip with QuickGELU as trained. Features: the image embedding (encode_image, not "
    "normalised); normalisation OpenAI CLIP's mean/std.",
)

register_open_clip_source(
    "open_clip",
    default_arch=None,
    provenance="The vision tower of an open_clip checkpoint supplied by the user, for the "
    "open_clip config named by arch (or hf-hub:<repo> with open_clip_config.json beside the "
    "checkpoint); text tower weights left unused. Features: the image embedding (encode_image, "
    "not normalised).",
)
