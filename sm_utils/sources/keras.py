"""The paper's Keras ResNet50 weights (.h5: RadImageNet, Keras ImageNet) and RadImageNet's
official PyTorch release."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from .. import keras_resnet
from ..weights import (
    SourceError,
    read_state_dict,
    strip_prefix,
)
from .architectures import KERAS_ARCH
from .preprocessing import CAFFE, CAFFE_RESCALED, timm_preprocessing
from .registry import Source, _required_file, register_source


def _find_keras_h5(source: str, wrong_hint: str, wrong_source: str, what: str):
    base = _required_file(source, what)

    def find(arch: str, weights: Path | None) -> Path:
        path = base(arch, weights)
        if wrong_hint.lower() in path.name.lower():
            raise SourceError(
                f"{path.name} looks like the weights of source {wrong_source!r}, not "
                f"{source!r}; use source={wrong_source!r} so that the run is labelled and "
                "preprocessed correctly (or rename the file if this is deliberate)."
            )
        return path

    return find


def _load_keras(model: nn.Module, path: Path, cache_dir: Path | None) -> dict:
    if path.suffix.lower() in (".h5", ".hdf5") or keras_resnet_is_h5(path):
        converted, _ = keras_resnet.cached_conversion(path, cache_dir)
    else:
        converted = path  # an already converted safetensors file in our layout
    state, _ = read_state_dict(converted)
    return state


def keras_resnet_is_h5(path: Path) -> bool:
    from ..weights import detect_format

    return detect_format(path) == "hdf5"


register_source(
    Source(
        name="radimagenet",
        default_arch=KERAS_ARCH,
        provenance="RadImageNet ResNet50 (Keras, RadImageNet-ResNet50_notop.h5, supplied by the "
        "user under RadImageNet's data-use terms), converted with h5py into the Keras-layout "
        "PyTorch ResNet50; preprocessing as in the paper: Keras caffe mode then x 1/255.",
        find_weights=_find_keras_h5(
            "radimagenet", "tf_dim_ordering", "imagenet_keras", "RadImageNet-ResNet50_notop.h5"
        ),
        load=_load_keras,
        preprocessing=lambda arch, path: CAFFE_RESCALED,
        archs=(KERAS_ARCH,),
    )
)


register_source(
    Source(
        name="imagenet_keras",
        default_arch=KERAS_ARCH,
        provenance="Keras' own ImageNet ResNet50 weights (.h5, supplied by the user) in the same "
        "Keras-layout PyTorch module as RadImageNet: the paper's two arms differ only in weights; "
        "preprocessing Keras caffe mode (no rescale).",
        find_weights=_find_keras_h5(
            "imagenet_keras",
            "radimagenet",
            "radimagenet",
            "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
        ),
        load=_load_keras,
        preprocessing=lambda arch, path: CAFFE,
        archs=(KERAS_ARCH,),
    )
)


# The release wraps torchvision's children [:9] in nn.Sequential named "backbone".
_TORCHVISION_CHILDREN = {
    "0": "conv1",
    "1": "bn1",
    "4": "layer1",
    "5": "layer2",
    "6": "layer3",
    "7": "layer4",
}


def _load_radimagenet_torch(model: nn.Module, path: Path, cache_dir: Path | None) -> dict:
    state, _ = read_state_dict(path)
    state = strip_prefix(state, "backbone.")
    renamed = {}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        renamed[
            f"{_TORCHVISION_CHILDREN[head]}.{rest}" if head in _TORCHVISION_CHILDREN else key
        ] = value
    return renamed


register_source(
    Source(
        name="radimagenet_torch",
        default_arch="resnet50",
        provenance="RadImageNet's separate official PyTorch release (resnet50_torch.pt, torchvision "
        "ResNet50 v1.5 layout, keys prefixed 'backbone.'), supplied by the user: a DIFFERENT model "
        "from the Keras RadImageNet-ResNet50 file. Preprocessing assumed ImageNet mean/std.",
        find_weights=_required_file("radimagenet_torch", "resnet50_torch.pt"),
        load=_load_radimagenet_torch,
        preprocessing=lambda arch, path: timm_preprocessing("resnet50.tv_in1k"),
        archs=("resnet50",),
    )
)
