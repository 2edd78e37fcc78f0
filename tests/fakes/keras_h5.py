"""Fake Keras ResNet50 weight files (.h5) in the layout of the published ``*_notop.h5`` files.

Keras 2 / tf.keras ``save_weights`` files, as published for ResNet50 by Keras
(``resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5``) and by RadImageNet
(``RadImageNet-ResNet50_notop.h5``): a root attribute ``layer_names`` listing every layer in
creation order (with or without weights), plus ``backend`` and ``keras_version``; per layer a
group whose attribute ``weight_names`` lists its weights, e.g. ``conv2_block1_1_conv/kernel:0``;
the dataset at ``/<layer>/<weight name>``, i.e. ``/conv2_block1_1_conv/conv2_block1_1_conv/
kernel:0``. Conv kernels are (kh, kw, in, out). A full-model file (``model.save``) holds the
same under a ``model_weights`` group.

The values are seeded random numbers, scaled to keep activations in a sane range through the
50 layers; the shapes are Keras ResNet50's (23,587,712 values without the top).

    write_keras_resnet50_h5(tmp_path / "RadImageNet-ResNet50_notop.h5", seed=1)
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np

# (stage, bottleneck width, blocks, stride of block 1) of Keras ResNet50, written out here
# rather than imported from sm_utils, so that a wrong table in the module would be caught.
RESNET50 = [("conv2", 64, 3, 1), ("conv3", 128, 4, 2), ("conv4", 256, 6, 2), ("conv5", 512, 3, 2)]

IMAGENET_NOTOP_NAME = "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
RADIMAGENET_NOTOP_NAME = "RadImageNet-ResNet50_notop.h5"


def keras_resnet50_layers(top: bool = False) -> list[tuple[str, dict[str, tuple[int, ...]]]]:
    """Keras ResNet50 layers in creation order, each with its weights' shapes ({} if none)."""

    def conv(name, k, cin, cout):
        return [(name, {"kernel": (k, k, cin, cout), "bias": (cout,)})]

    def bn(name, c):
        shapes = {p: (c,) for p in ("gamma", "beta", "moving_mean", "moving_variance")}
        return [(name, shapes)]

    layers = [("input_1", {}), ("conv1_pad", {})]
    layers += conv("conv1_conv", 7, 3, 64) + bn("conv1_bn", 64)
    layers += [("conv1_relu", {}), ("pool1_pad", {}), ("pool1_pool", {})]
    cin = 64
    for stage, width, blocks, _ in RESNET50:
        for b in range(1, blocks + 1):
            name = f"{stage}_block{b}"
            if b == 1:  # Keras builds the shortcut conv first
                layers += conv(f"{name}_0_conv", 1, cin, 4 * width) + bn(f"{name}_0_bn", 4 * width)
            layers += conv(f"{name}_1_conv", 1, cin, width) + bn(f"{name}_1_bn", width)
            layers += [(f"{name}_1_relu", {})]
            layers += conv(f"{name}_2_conv", 3, width, width) + bn(f"{name}_2_bn", width)
            layers += [(f"{name}_2_relu", {})]
            layers += conv(f"{name}_3_conv", 1, width, 4 * width) + bn(f"{name}_3_bn", 4 * width)
            layers += [(f"{name}_add", {}), (f"{name}_out", {})]
            cin = 4 * width
    if top:
        layers += [("avg_pool", {}), ("predictions", {"kernel": (2048, 1000), "bias": (1000,)})]
    return layers


def random_weights(layers, seed: int) -> dict[tuple[str, str], np.ndarray]:
    """Seeded values that keep activations in a sane range through 50 layers."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for layer, shapes in layers:
        for param, shape in shapes.items():
            if param == "kernel":
                fan_in = int(np.prod(shape[:-1]))
                value = (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)
            elif param in ("gamma", "moving_variance"):
                value = rng.uniform(0.5, 1.5, shape).astype(np.float32)
            else:  # bias, beta, moving_mean
                value = (0.1 * rng.standard_normal(shape)).astype(np.float32)
            arrays[(layer, param)] = value
    return arrays


def write_keras_h5(path, layers, arrays, *, nested_under_model_weights=False, skip=()):
    """Write ``arrays`` as Keras does; ``skip`` names (layer, param) pairs to leave out."""
    with h5py.File(path, "w") as fh:
        root = fh.create_group("model_weights") if nested_under_model_weights else fh
        root.attrs["layer_names"] = np.array([n.encode() for n, _ in layers])
        root.attrs["backend"] = b"tensorflow"
        root.attrs["keras_version"] = b"2.6.0"
        for layer, shapes in layers:
            group = root.create_group(layer)
            names = [f"{layer}/{p}:0" for p in shapes if (layer, p) not in skip]
            group.attrs["weight_names"] = np.array([n.encode() for n in names])
            for param in shapes:
                if (layer, param) not in skip:
                    group.create_dataset(f"{layer}/{param}:0", data=arrays[(layer, param)])
    return path


def write_keras_resnet50_h5(
    path: str | os.PathLike,
    seed: int = 0,
    top: bool = False,
    nested_under_model_weights: bool = False,
) -> Path:
    """Write a seeded random-weight Keras ResNet50 .h5 (``*_notop.h5`` layout unless ``top``).

    ``top=True`` adds ``avg_pool`` and the 1000-way ``predictions`` Dense layer;
    ``nested_under_model_weights=True`` puts everything under ``model_weights`` as a
    full-model ``model.save`` file does. Name the file after the file it stands for
    (:data:`IMAGENET_NOTOP_NAME`, :data:`RADIMAGENET_NOTOP_NAME`): the sources refuse a file
    whose name says it belongs to the other source. Returns the path.
    """
    path = Path(path)
    layers = keras_resnet50_layers(top=top)
    write_keras_h5(
        path,
        layers,
        random_weights(layers, seed),
        nested_under_model_weights=nested_under_model_weights,
    )
    return path
