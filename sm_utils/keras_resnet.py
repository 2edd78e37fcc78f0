"""Keras ResNet50 ("v1") in PyTorch, and conversion of Keras .h5 weight files without TensorFlow.

RadImageNet and Keras' own ImageNet weights are Keras ResNet50 files. Keras' ResNet50 differs
from torchvision/timm's ("v1.5"): the stride of a stage sits in the first 1x1 conv of its first
block, every conv has a bias, and batch norm uses eps 1.001e-5 (momentum 0.99 in Keras, i.e.
0.01 in PyTorch). :class:`KerasResNet50` reproduces that layout so the weights load exactly.

Module names follow the Keras layer names so the mapping can be read off directly::

    conv1_conv                -> conv1.conv          conv1_bn               -> conv1.bn
    conv{s}_block{b}_{i}_conv -> conv{s}.block{b}.conv{i}    (i = 0 is the shortcut conv)
    conv{s}_block{b}_{i}_bn   -> conv{s}.block{b}.bn{i}
    predictions (top only)    -> fc  (ImageNet's 1000-way classifier; replaced by a new head
                                     unless create_model(keep_pretrained_head=True))

h5 layout read here (``model.save_weights`` / ``*_notop.h5`` files, optionally under a
``model_weights`` group as in full-model files): a root attribute ``layer_names``; one group per
layer, with an attribute ``weight_names`` such as ``conv1_conv/kernel:0``; the datasets at
``/<layer>/<weight name>``. Conv kernels are (kh, kw, in, out) and become (out, in, kh, kw),
i.e. transposed (3, 2, 0, 1); Dense kernels (in, out) are transposed.
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .io import sha256_file
from .weights import (
    SourceError,
    WeightsError,
    mismatch_lines,
    read_state_dict,
    save_state_dict,
)

BN_EPS = 1.001e-5
BN_MOMENTUM = 0.01  # Keras momentum 0.99
# Stage name, bottleneck width, number of blocks, stride of the first block.
STAGES = (("conv2", 64, 3, 1), ("conv3", 128, 4, 2), ("conv4", 256, 6, 2), ("conv5", 512, 3, 2))
NUM_FEATURES = 2048
# Keras refuses ResNet50 inputs under 32 px: the 5 stride-2 steps need at least 1x1 at the end.
MIN_INPUT_SIZE = 32


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class KerasBottleneck(nn.Module):
    """Keras ``block1``: 1x1 (stride) -> 3x3 -> 1x1, biases on every conv, optional conv shortcut."""

    def __init__(self, in_channels: int, width: int, stride: int, conv_shortcut: bool):
        super().__init__()
        out_channels = 4 * width
        if conv_shortcut:
            self.conv0 = nn.Conv2d(in_channels, out_channels, 1, stride=stride)
            self.bn0 = _bn(out_channels)
        self.conv1 = nn.Conv2d(in_channels, width, 1, stride=stride)
        self.bn1 = _bn(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)  # Keras padding="same", stride 1
        self.bn2 = _bn(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1)
        self.bn3 = _bn(out_channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.bn0(self.conv0(x)) if hasattr(self, "conv0") else x
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + shortcut)


class KerasStem(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 64, 7, stride=2, padding=3)  # ZeroPadding2D(3) + valid conv
        self.bn = _bn(64)
        self.relu = nn.ReLU(inplace=True)
        # Keras pads with zeros before max-pooling; after the ReLU every value is >= 0, so
        # PyTorch's -inf padding gives the same maximum.
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.relu(self.bn(self.conv(x))))


class KerasResNet50(nn.Module):
    """Keras-layout ResNet50 with global average pooling and a dropout + linear head.

    ``forward`` returns logits (N, num_classes); ``forward_features`` the pooled 2048-d
    features. ``num_classes=0`` leaves the head out (features only).
    """

    arch_name = "keras_resnet50"

    def __init__(self, num_classes: int = 2, drop_rate: float = 0.5):
        super().__init__()
        self.num_features = NUM_FEATURES
        self.conv1 = KerasStem()
        in_channels = 64
        for stage, width, blocks, stride in STAGES:
            layers = OrderedDict()
            for b in range(1, blocks + 1):
                first = b == 1
                layers[f"block{b}"] = KerasBottleneck(
                    in_channels, width, stride if first else 1, conv_shortcut=first
                )
                in_channels = 4 * width
            self.add_module(stage, nn.Sequential(layers))
        self.head_drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(NUM_FEATURES, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        check_input_size(x.shape[-2:])
        x = self.conv1(x)
        for stage, *_ in STAGES:
            x = getattr(self, stage)(x)
        return x.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.head_drop(self.forward_features(x)))


def keras_initialise_(model: nn.Module) -> nn.Module:
    """Re-initialise ``model`` in place as Keras initialises a freshly built layer; return it.

    Keras' defaults (those of ``keras.applications.ResNet50(weights=None)`` and of a new
    ``Dense`` head): Conv2D and Dense kernels glorot_uniform, biases zeros; BatchNormalization
    gamma ones, beta zeros, moving mean 0, moving variance 1. Every ``nn.Conv2d`` and
    ``nn.Linear`` (kernels and biases) and every batch norm of ``model`` is reset; other
    modules are left alone. Draws from torch's global RNG (seed it first).
    """
    # Glorot uniform draws from U(-l, l), l = sqrt(6 / (fan_in + fan_out)). Keras takes the
    # fans of a (kh, kw, in, out) conv kernel as in*kh*kw and out*kh*kw, and of a Dense
    # (in, out) kernel as in and out; torch's xavier_uniform_ (gain 1: bound
    # sqrt(3) * sqrt(2 / (fan_in + fan_out)), the same l) reads the same fans off the
    # transposed (out, in, kh, kw) and (out, in) weights: size(1) * kh * kw and
    # size(0) * kh * kw. So the two draw from the same distribution (checked in
    # tests/test_keras_resnet.py against the Keras formula written out there).
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()  # mean 0, variance 1 (and the step counter 0)
            if module.affine:
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
    return model


def check_input_size(size) -> None:
    """Raise a clear error for an image too small for the Keras ResNet50 stem and stages."""
    h, w = (int(size), int(size)) if np.isscalar(size) else (int(size[0]), int(size[1]))
    if min(h, w) < MIN_INPUT_SIZE:
        raise SourceError(
            f"Image size {h}x{w} is too small for keras_resnet50: it needs at least "
            f"{MIN_INPUT_SIZE}x{MIN_INPUT_SIZE} (five stride-2 steps). Use image_size >= "
            f"{MIN_INPUT_SIZE}, or a smaller-stride architecture."
        )


# ------------------------------------------------------------------ h5 -> state dict

_BLOCK_LAYER = re.compile(r"^(conv[2-5])_block(\d+)_([0-3])_(conv|bn)$")
_CONV_PARAMS = {"kernel": "weight", "bias": "bias"}
_BN_PARAMS = {
    "gamma": "weight",
    "beta": "bias",
    "moving_mean": "running_mean",
    "moving_variance": "running_var",
}


def keras_layer_to_module(layer: str) -> str | None:
    """Module path of a Keras ResNet50 layer name, or None if it is not one."""
    if layer == "conv1_conv":
        return "conv1.conv"
    if layer == "conv1_bn":
        return "conv1.bn"
    if layer == "predictions":
        return "fc"
    match = _BLOCK_LAYER.match(layer)
    if match:
        stage, block, index, kind = match.groups()
        return f"{stage}.block{int(block)}.{kind}{index}"
    return None


_MODULE = re.compile(r"^(conv[2-5])\.block(\d+)\.(conv|bn)([0-3])$")
_TO_KERAS_PARAM = {
    "conv": {"weight": "kernel", "bias": "bias"},
    "bn": {v: k for k, v in _BN_PARAMS.items()},
    "fc": {"weight": "kernel", "bias": "bias"},
}


def module_key_to_keras(key: str) -> str:
    """Keras ``<layer>/<weight>`` name of a :class:`KerasResNet50` state-dict key.

    ``conv4.block2.bn2.running_mean`` -> ``conv4_block2_2_bn/moving_mean``; the inverse of
    :func:`keras_layer_to_module` plus the parameter names, for messages. Unknown keys are
    returned unchanged.
    """
    module, _, param = key.rpartition(".")
    if module in ("conv1.conv", "conv1.bn"):
        layer, kind = module.replace(".", "_"), module.split(".")[1]
    elif module == "fc":
        layer, kind = "predictions", "fc"
    else:
        match = _MODULE.match(module)
        if not match:
            return key
        stage, block, kind, index = match.groups()
        layer = f"{stage}_block{block}_{index}_{kind}"
    name = _TO_KERAS_PARAM[kind].get(param)
    return f"{layer}/{name}" if name else key


def _decode(values) -> list[str]:
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]


def read_keras_h5(path: str | os.PathLike) -> tuple[list[str], dict[tuple[str, str], np.ndarray]]:
    """Read every weight of a Keras h5 weights file with h5py.

    Returns (all layer names in file order, {(layer, parameter): array}) where parameter is
    e.g. "kernel" (the ":0" suffix dropped).
    """
    import h5py

    path = Path(path)
    try:
        fh = h5py.File(path, "r")
    except OSError as exc:
        raise WeightsError(
            f"{path} cannot be opened as an HDF5 (Keras .h5) file ({exc}); it is probably "
            "truncated or corrupt. Copy or download it again and compare its sha256."
        ) from exc
    with fh:
        root = fh.get("model_weights", fh)
        if "layer_names" not in root.attrs:
            raise WeightsError(
                f"{path} is an HDF5 file but not a Keras weights file: no 'layer_names' "
                "attribute at its root (or under 'model_weights'). Keras 3 '.weights.h5' files "
                "are not supported; use the published '_notop.h5' file."
            )
        layers = _decode(root.attrs["layer_names"])
        arrays: dict[tuple[str, str], np.ndarray] = {}
        try:
            for layer in layers:
                group = root[layer]
                for weight_name in _decode(group.attrs.get("weight_names", [])):
                    # A nested model keeps its weights under its own group, named
                    # "<inner layer>/<param>:0"; the inner layer name is what identifies it.
                    parts = weight_name.split("/")
                    inner_layer = parts[-2] if len(parts) > 1 else layer
                    param = parts[-1].split(":")[0]
                    key = (inner_layer, param)
                    if key in arrays:
                        raise WeightsError(f"{path}: weight {weight_name} appears twice.")
                    arrays[key] = np.asarray(group[weight_name], dtype=np.float32)
        except (KeyError, OSError) as exc:
            raise WeightsError(
                f"{path}: a dataset listed in the file's layer/weight names cannot be read "
                f"({exc}); the file is truncated or corrupt. Copy or download it again."
            ) from exc
    return layers, arrays


def identify_keras_model(layer_names) -> str:
    """Best guess of which Keras application a list of layer names belongs to."""
    names = set(layer_names)
    joined = " ".join(sorted(names))
    if any(n.startswith(("block35", "block17", "block8_")) for n in names) or "conv_7b" in names:
        return "InceptionResNetV2"
    if (
        "pool2_conv" in names
        or "conv1/conv" in names
        or re.search(r"conv\d_block\d+_concat", joined)
    ):
        return "DenseNet"
    if any(n.startswith("mixed") for n in names):
        return "InceptionV3"
    if any("preact" in n for n in names) or "post_bn" in names:
        return "ResNetV2"
    if any(n.startswith("res2a_branch") for n in names):
        return "ResNet50 (old keras-applications naming: res2a_branch2a, bn2a_branch2a, ...)"
    if any(n.startswith("conv4_block36_") for n in names):
        return "ResNet152"
    if any(n.startswith("conv4_block23_") for n in names):
        return "ResNet101"
    if "conv5_block3_3_conv" in names and "conv1_conv" in names:
        return "ResNet50"
    return "unknown"


SUPPORTED_H5 = (
    "Keras ResNet50 weights (tf.keras.applications naming: conv1_conv, conv2_block1_1_conv, ...), "
    "e.g. RadImageNet-ResNet50_notop.h5 or resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
)


def convert_keras_arrays(
    layers: list[str], arrays: dict[tuple[str, str], np.ndarray], origin: str = "h5 file"
) -> dict[str, torch.Tensor]:
    """Map Keras ResNet50 arrays onto :class:`KerasResNet50` state-dict keys.

    Every array must be consumed and every expected tensor found, else a WeightsError names
    the model the file seems to hold and what is supported.
    """
    weight_layers = sorted({layer for layer, _ in arrays})
    kind = identify_keras_model(set(layers) | set(weight_layers))
    if kind.startswith("ResNet50 (old"):
        raise WeightsError(
            f"{origin} holds a Keras {kind}. Those early files also used batch-norm eps 1e-3, "
            "so they are not loaded here. Supported: "
            f"{SUPPORTED_H5}; re-save the weights with a current tf.keras "
            "(keras.applications.ResNet50(weights=<this file>).save_weights(...)) or use the "
            "current Keras file."
        )
    resnet_like = any(keras_layer_to_module(layer) for layer in weight_layers)
    if kind == "unknown" and not resnet_like:
        raise WeightsError(
            f"{origin} holds a Keras model this loader does not recognise; its layers with "
            f"weights are: {', '.join(weight_layers[:12])}"
            + (f", ... ({len(weight_layers)} in all)" if len(weight_layers) > 12 else "")
            + f". Supported: {SUPPORTED_H5}."
        )
    # A ResNet50 file with layers missing is "unknown" to identify_keras_model; the layout
    # check below names what is missing.
    if kind not in ("ResNet50", "unknown"):
        raise WeightsError(
            f"{origin} holds a Keras {kind} model, which cannot be loaded here. Supported: "
            f"{SUPPORTED_H5}. RadImageNet's DenseNet121, InceptionV3 and InceptionResNetV2 "
            "files are not supported; use RadImageNet-ResNet50_notop.h5."
        )
    state: dict[str, torch.Tensor] = {}
    unused = []
    for (layer, param), array in arrays.items():
        module = keras_layer_to_module(layer)
        if module is None:
            unused.append(f"{layer}/{param}")
            continue
        if layer == "predictions":
            names = {"kernel": "weight", "bias": "bias"}
        elif layer.endswith("_bn"):
            names = _BN_PARAMS
        else:
            names = _CONV_PARAMS
        if param not in names:
            unused.append(f"{layer}/{param}")
            continue
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        if param == "kernel":
            tensor = tensor.permute(3, 2, 0, 1) if tensor.ndim == 4 else tensor.t()
        state[f"{module}.{names[param]}"] = tensor.contiguous()
    reference = KerasResNet50(num_classes=0).state_dict()
    wanted = {k: v for k, v in reference.items() if not k.endswith("num_batches_tracked")}
    missing = [k for k in wanted if k not in state]
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs expected {tuple(v.shape)}"
        for k, v in wanted.items()
        if k in state and state[k].shape != v.shape
    ]
    if unused or missing or mismatched:
        keras_layers = list(dict.fromkeys(module_key_to_keras(k).split("/")[0] for k in missing))
        details = mismatch_lines([
            ("Keras layers missing or incomplete", keras_layers, 12),
            ("missing", [f"{k} [{module_key_to_keras(k)}]" for k in missing], 12),
            ("not used", unused, 12),
            ("shape mismatches", mismatched, 6),
        ])
        raise WeightsError(
            f"{origin} does not match the Keras ResNet50 layout. "
            + "; ".join(details)
            + f". Supported: {SUPPORTED_H5}."
        )
    return state


def convert_keras_h5(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a Keras ResNet50 .h5 file and return the :class:`KerasResNet50` state dict."""
    layers, arrays = read_keras_h5(path)
    return convert_keras_arrays(layers, arrays, origin=str(path))


def default_cache_dir() -> Path:
    """Where converted weights are cached: $SM_CACHE_DIR, else ~/.cache/source_matters."""
    return Path(os.environ.get("SM_CACHE_DIR", Path.home() / ".cache" / "source_matters"))


def cached_conversion(
    h5_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None
) -> tuple[Path, str]:
    """Convert a Keras h5 file once into safetensors, keyed by the h5's sha256.

    Returns (safetensors path, h5 sha256). A second call with the same file reuses the
    cached conversion; a changed file (different hash) is converted again.
    """
    h5_path = Path(h5_path)
    if not h5_path.is_file():
        raise WeightsError(f"Keras weights file not found: {h5_path}. Give an existing .h5 path.")
    digest = sha256_file(h5_path)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache_dir / "keras_converted" / f"{h5_path.stem}-{digest[:16]}.safetensors"
    if not target.is_file():
        state = convert_keras_h5(h5_path)
        metadata = {"converted_from": h5_path.name, "h5_sha256": digest, "layout": "keras_resnet50"}
        save_state_dict(target, state, metadata)
    return target, digest


def load_keras_resnet50_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """State dict from a converted safetensors file (or any safe state dict in our layout)."""
    state, _ = read_state_dict(path)
    return state
