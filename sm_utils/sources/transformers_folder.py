"""A Hugging Face ``transformers`` model folder, as RAD-DINO is published: ``config.json`` +
``model.safetensors`` (+ ``preprocessor_config.json``), a DINOv2 ``Dinov2Model``.

``transformers`` loads it from the local folder only (``local_files_only=True``: nothing is
downloaded, no remote code runs) and reports every missing, unexpected and mismatched key;
any of them is refused, except the classifier of a model saved with one (``classifier``).
The normalisation and input size come from ``preprocessor_config.json`` where the folder has
one (RAD-DINO's own mean and std), the patch size from ``config.json``. A Dinov2Model
interpolates its position embedding to the input size itself.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch

from ..weights import SourceError, WeightsError
from .foundation import (
    FoundationClassifier,
    check_patch_multiple,
    refuse_head_keeping,
    refuse_mismatch,
    square,
)
from .preprocessing import Preprocessing
from .registry import Source, register_source

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
PREPROCESSOR = "preprocessor_config.json"
# transformers model types whose last_hidden_state[:, 0] is the CLS token after the final norm
MODEL_TYPES = ("dinov2", "dinov2_with_registers")
ALLOWED_UNUSED = ("classifier",)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _files(folder: Path) -> str:
    names = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    return ", ".join(names[:12]) + (" ..." if len(names) > 12 else "") if names else "nothing"


def find_folder(source: str):
    """``weights`` may be the folder or a file in it; returns the folder's model.safetensors."""

    def find(arch: str, weights: Path | None) -> Path:
        if weights is None:
            raise SourceError(
                f"Source {source!r} needs weights=<a transformers model folder: {CONFIG} + "
                f"{WEIGHTS}>."
            )
        if not weights.exists():
            raise SourceError(f"Source {source!r}: weights folder not found: {weights}.")
        folder = weights if weights.is_dir() else weights.parent
        missing = [name for name in (CONFIG, WEIGHTS) if not (folder / name).is_file()]
        if missing:
            raise SourceError(
                f"Source {source!r}: {folder} is not a complete transformers model folder: "
                f"expected {CONFIG} and {WEIGHTS}, missing {' and '.join(missing)} (found: "
                f"{_files(folder)}). Download every file of the model's page (e.g. "
                "`huggingface-cli download microsoft/rad-dino --local-dir <folder>` on a machine "
                f"with internet) and point weights at that folder."
                + (f" A pytorch_model.bin is not read: convert it to {WEIGHTS}."
                   if (folder / "pytorch_model.bin").is_file() else "")
            )
        return folder / WEIGHTS

    return find


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SourceError(f"{path} cannot be read as JSON ({exc}); download it again.") from exc


def _published(folder: Path) -> tuple[dict, dict]:
    config = _read_json(folder / CONFIG)
    processor = _read_json(folder / PREPROCESSOR) if (folder / PREPROCESSOR).is_file() else {}
    return config, processor


def _input_size(config: dict, processor: dict) -> tuple[int, int]:
    crop = processor.get("crop_size") if processor.get("do_center_crop", True) else None
    if isinstance(crop, dict) and "height" in crop:
        return (int(crop["height"]), int(crop["width"]))
    if isinstance(crop, int):
        return (crop, crop)
    return square(config.get("image_size", 224))


def _preprocessing_of(source: str, config: dict, processor: dict,
                      size: tuple[int, int] | None = None) -> Preprocessing:
    rescale = float(processor.get("rescale_factor", 1 / 255)) if processor.get(
        "do_rescale", True) else 1.0
    if processor.get("do_normalize", True):
        mean = processor.get("image_mean", IMAGENET_MEAN)
        std = processor.get("image_std", IMAGENET_STD)
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    mean = [float(m) for m in (mean if isinstance(mean, (list, tuple)) else [mean] * 3)]
    std = [float(s) for s in (std if isinstance(std, (list, tuple)) else [std] * 3)]
    name = f"{source}:{PREPROCESSOR}" if processor else f"{source}:imagenet (no {PREPROCESSOR})"
    return Preprocessing(
        name,
        mean=tuple(m / rescale for m in mean),
        std=tuple(s / rescale for s in std),
        input_size=size or _input_size(config, processor),
        patch_size=int(config.get("patch_size", 14)),
    )


def _mismatch(entry) -> str:
    if isinstance(entry, (tuple, list)) and len(entry) == 3:  # (key, file shape, model shape)
        key, found, expected = entry
        return f"{key}: file {tuple(found)} vs model {tuple(expected)}"
    return str(entry)


def _check_model_type(config: dict, arch: str, folder: Path) -> None:
    found = config.get("model_type")
    if found != arch:
        raise SourceError(
            f"{folder / CONFIG} says model_type {found!r}, but the source expects {arch!r}. Set "
            f"arch={found!r} if it is one of {MODEL_TYPES}, or point weights at a {arch} folder."
        )


@contextlib.contextmanager
def no_progress_bars() -> Iterator[None]:
    """transformers' own progress bars off (loading and saving shards), as they were after:
    no bar fragments in notebooks and grid logs."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def build_transformers(source: str, arch: str, path: Path | None, *, num_classes: int,
                       drop_rate: float, image_size, keep_pretrained_head: bool,
                       allowed_unused: tuple[str, ...] = ALLOWED_UNUSED):
    """The folder's model loaded by ``transformers`` (local files only), every key checked."""
    from transformers import AutoConfig, AutoModel

    refuse_head_keeping(source, keep_pretrained_head)
    if path is None:
        raise SourceError(f"Source {source!r} needs weights=<a transformers model folder>.")
    folder = path.parent
    config_dict, processor = _published(folder)
    _check_model_type(config_dict, arch, folder)
    patch = int(config_dict.get("patch_size", 14))
    size = square(image_size) if image_size is not None else _input_size(config_dict, processor)
    check_patch_multiple(size, patch, f"Source {source!r} ({folder})")
    try:
        with no_progress_bars():
            config = AutoConfig.from_pretrained(folder, local_files_only=True)
            backbone, info = AutoModel.from_pretrained(
                folder, config=config, local_files_only=True, use_safetensors=True,
                output_loading_info=True, ignore_mismatched_sizes=True,  # refused below
            )
    except (OSError, ValueError, RuntimeError) as exc:
        raise WeightsError(
            f"{folder}: transformers could not load the model from {CONFIG} and {WEIGHTS} "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). Check "
            "that both files come from the same model page and are complete."
        ) from exc

    def allowed(key: str) -> bool:
        return any(key == p or key.startswith(p + ".") for p in allowed_unused)

    unexpected = list(info.get("unexpected_keys", ()))
    refuse_mismatch(
        path, f"{type(backbone).__name__} of {folder / CONFIG}",
        missing=list(info.get("missing_keys", ())),
        unexpected=[k for k in unexpected if not allowed(k)],
        mismatched=sorted(_mismatch(m) for m in info.get("mismatched_keys", ())),
        fix=f"{CONFIG} and {WEIGHTS} must be of the same model: download both from its page.",
    )
    backbone = backbone.to(torch.float32)
    prep = _preprocessing_of(source, config_dict, processor, size)
    model = FoundationClassifier(
        backbone, kind="transformers", num_features=int(config.hidden_size),
        num_classes=num_classes, drop_rate=drop_rate, arch_name=f"transformers:{arch}",
        pretrained_cfg={"input_size": (3, *size), "patch_size": patch,
                        "mean": prep.mean, "std": prep.std},
        unused_keys=unexpected, backbone_spec={"config": backbone.config.to_dict()},
    )
    return model, prep


def backbone_from_config(spec: dict):
    """A randomly initialised transformers model of ``spec["config"]`` (a config.json's
    contents), float32."""
    from transformers import AutoConfig, AutoModel

    values = dict(spec["config"])
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    return AutoModel.from_config(config).to(torch.float32)


def _preprocessing(source: str):
    def preprocessing(arch: str, path: Path | None) -> Preprocessing:
        if path is None:
            return _preprocessing_of(source, {}, {})
        config, processor = _published(path.parent)
        return _preprocessing_of(source, config, processor)

    return preprocessing


def _model_type(arch: str) -> str:
    if arch not in MODEL_TYPES:
        raise SourceError(
            f"Transformers model type {arch!r} is not supported; expected one of "
            f"{', '.join(MODEL_TYPES)} (the model_type in the folder's {CONFIG})."
        )
    return arch


def register_transformers_source(name: str, *, provenance: str, default_arch: str = "dinov2",
                                 archs: tuple[str, ...] | None = MODEL_TYPES,
                                 allowed_unused: tuple[str, ...] = ALLOWED_UNUSED,
                                 replace: bool = False) -> Source:
    """Register a source that loads a transformers model folder (``weights=<folder>``)."""

    def build(arch, path, **options):
        return build_transformers(name, arch, path, allowed_unused=allowed_unused, **options)

    return register_source(
        Source(
            name=name,
            default_arch=default_arch,
            provenance=provenance,
            find_weights=find_folder(name),
            load=None,
            preprocessing=_preprocessing(name),
            archs=archs,
            resolve_arch=_model_type,
            build=build,
        ),
        replace=replace,
    )


register_transformers_source(
    "rad_dino",
    archs=("dinov2",),
    provenance="RAD-DINO (Microsoft, a DINOv2 ViT-B/14 trained on chest X-rays), the "
    "transformers folder of huggingface.co/microsoft/rad-dino supplied by the user (config.json, "
    "model.safetensors, preprocessor_config.json), loaded by transformers from local files only; "
    "features: the CLS token after the final layer norm (pooler_output); normalisation and "
    "input size from preprocessor_config.json.",
)

register_transformers_source(
    "transformers_vit",
    provenance="A transformers DINOv2 model folder supplied by the user (config.json + "
    "model.safetensors), loaded by transformers from local files only; features: the CLS token "
    "after the final layer norm; normalisation from preprocessor_config.json where present, "
    "else ImageNet mean/std.",
)
