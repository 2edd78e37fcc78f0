"""Sources without pretraining of their own: random initialisation (Keras' initialisers
for the paper's ResNet50) and a user's own weights file."""

from __future__ import annotations

from torch import nn

from .. import keras_resnet
from ..keras_resnet import KerasResNet50
from .architectures import KERAS_ARCH
from .preprocessing import default_preprocessing
from .registry import (
    Source,
    _load_file,
    _no_weights,
    _preprocessing_from_file,
    _required_file,
    register_source,
)


def _random_init(model: nn.Module) -> None:
    # timm models keep the init timm.create_model gave them.
    if isinstance(model, KerasResNet50):
        keras_resnet.keras_initialise_(model)


def _random_provenance(arch: str) -> str:
    if arch == KERAS_ARCH:
        init = (
            "Keras' initialisers, as the paper's random arm: conv and dense kernels "
            "glorot_uniform, biases zero, batch norm gamma 1, beta 0, moving mean 0, moving "
            "variance 1 (sm_utils.keras_resnet.keras_initialise_)"
        )
    else:
        init = (
            f"timm's own initialisation of {arch} (not Keras' glorot_uniform of the paper's "
            "random arm)"
        )
    return (
        f"Random initialisation (no pretraining) with {init}, drawn from torch's global RNG "
        "seeded by the caller."
    )


register_source(
    Source(
        name="random",
        default_arch=KERAS_ARCH,
        provenance=_random_provenance,
        find_weights=_no_weights("random"),
        load=None,
        preprocessing=lambda arch, path: default_preprocessing(arch),
        init=_random_init,
    )
)


register_source(
    Source(
        name="file",
        default_arch=None,
        provenance="User-supplied weights file (safetensors or a state dict read with "
        "weights_only=True) for the given architecture.",
        find_weights=_required_file("file", "a safetensors file or torch state dict"),
        load=_load_file,
        preprocessing=_preprocessing_from_file,
    )
)
