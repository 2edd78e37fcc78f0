"""Keras ResNet50 .h5 -> PyTorch conversion, checked against an independent numpy reference.

The .h5 files are written by tests/fakes/keras_h5.py with h5py in the layout Keras uses for
weight files (root attribute ``layer_names``; per layer a group with attribute ``weight_names``
such as ``conv2_block1_1_conv/kernel:0``; the dataset at ``/<layer>/<layer>/kernel:0``), with
the real ResNet50 shapes and seeded random values. The reference forward pass is plain numpy in
Keras' own conventions (NHWC activations, HWIO kernels, ZeroPadding2D + valid conv, zero-padded
max pool), so it shares no code with the converter or the PyTorch module. Where TensorFlow is
available (here, or in a separate environment named by $SM_TF_PYTHON), real tf.keras ResNet50
files and outputs are compared too; otherwise that test is skipped.
"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
from fakes.keras_h5 import (
    RESNET50,
    keras_resnet50_layers,
    random_weights,
    write_keras_h5,
    write_keras_resnet50_h5,
)

from sm_utils import keras_resnet
from sm_utils.keras_resnet import KerasResNet50, cached_conversion, convert_keras_h5
from sm_utils.sources import SourceError, create_model, describe_source
from sm_utils.weights import WeightsError

torch.set_num_threads(1)

EPS = 1.001e-5
# Keras' model.summary() of ResNet50(include_top=False): 23,587,712 parameters in all.
KERAS_RESNET50_NOTOP_PARAMS = 23_587_712


@pytest.fixture(scope="module")
def notop(tmp_path_factory):
    """A RadImageNet-like ResNet50 notop file with real shapes and seeded random values."""
    layers = keras_resnet50_layers()
    arrays = random_weights(layers, seed=2024)
    path = tmp_path_factory.mktemp("h5") / "RadImageNet-ResNet50_notop.h5"
    write_keras_h5(path, layers, arrays)
    return path, layers, arrays


@pytest.fixture(scope="module")
def converted(notop):
    path, _, _ = notop
    return convert_keras_h5(path)


def test_h5_fixture_uses_keras_nesting(notop):
    path, _, arrays = notop
    with h5py.File(path, "r") as fh:
        assert fh["conv2_block1_1_conv"]["conv2_block1_1_conv"]["kernel:0"].shape == (1, 1, 64, 64)
        assert fh["conv1_bn/conv1_bn/moving_variance:0"].shape == (64,)
        assert b"conv1_pad" in list(fh.attrs["layer_names"])
    assert sum(a.size for a in arrays.values()) == KERAS_RESNET50_NOTOP_PARAMS


def test_public_fake_writer_matches_the_published_notop_layout(tmp_path):
    path = write_keras_resnet50_h5(tmp_path / "RadImageNet-ResNet50_notop.h5", seed=4)
    with h5py.File(path, "r") as fh:
        names = [n.decode() for n in fh.attrs["layer_names"]]
        assert names[:3] == ["input_1", "conv1_pad", "conv1_conv"]
        assert names[-1] == "conv5_block3_out"
        assert list(fh["conv2_block1_1_conv"].attrs["weight_names"]) == [
            b"conv2_block1_1_conv/kernel:0",
            b"conv2_block1_1_conv/bias:0",
        ]
        assert len(fh["conv1_relu"].attrs["weight_names"]) == 0
        kernel = fh["conv2_block1_1_conv/conv2_block1_1_conv/kernel:0"][()]
    state = convert_keras_h5(path)
    expected = torch.from_numpy(kernel).permute(3, 2, 0, 1)
    assert torch.equal(state["conv2.block1.conv1.weight"], expected)
    again = write_keras_resnet50_h5(tmp_path / "again.h5", seed=4)
    assert torch.equal(convert_keras_h5(again)["conv1.conv.weight"], state["conv1.conv.weight"])
    full = write_keras_resnet50_h5(tmp_path / "full.h5", top=True, nested_under_model_weights=True)
    assert convert_keras_h5(full)["fc.weight"].shape == (1000, 2048)


# ------------------------------------------------------------------ Keras' random initialisers


def keras_compute_fans(shape):
    """Keras' fans (keras.initializers: _compute_fans) of a Keras kernel shape."""
    if len(shape) == 2:  # Dense (in, out)
        return shape[0], shape[1]
    receptive_field = math.prod(shape[:-2])  # Conv (kh, kw, in, out)
    return shape[-2] * receptive_field, shape[-1] * receptive_field


@pytest.mark.parametrize(
    "keras_shape", [(7, 7, 3, 64), (1, 1, 256, 64), (3, 3, 512, 512), (1, 1, 1024, 2048), (2048, 2)]
)
def test_torch_xavier_uniform_draws_keras_glorot_uniform(keras_shape):
    torch.manual_seed(0)
    # The same kernel in PyTorch's layout: (out, in, kh, kw) or (out, in).
    torch_shape = (*keras_shape[-1:-3:-1], *keras_shape[:-2])
    weight = torch.nn.init.xavier_uniform_(torch.empty(torch_shape, dtype=torch.float64))
    fan_in, fan_out = keras_compute_fans(keras_shape)
    limit = math.sqrt(6 / (fan_in + fan_out))  # Keras GlorotUniform: U(-limit, limit)
    assert weight.abs().max() <= limit
    assert weight.abs().max() > 0.99 * limit  # the full range is used, not a narrower one
    assert abs(weight.var().item() / (limit**2 / 3) - 1) < 0.10


def test_keras_initialise_resets_convs_dense_and_batch_norm_of_any_module():
    torch.manual_seed(1)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 5),
        torch.nn.BatchNorm2d(32),
        torch.nn.Flatten(),
        torch.nn.Linear(32, 300),
        torch.nn.BatchNorm1d(300),
    )
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.fill_(5)
    assert keras_resnet.keras_initialise_(model) is model
    conv, bn2, _, dense, bn1 = model
    for layer, fans in ((conv, (3 * 25, 32 * 25)), (dense, (32, 300))):
        limit = math.sqrt(6 / sum(fans))
        assert 0.9 * limit < layer.weight.abs().max() <= limit * (1 + 1e-6)  # float32 bound
        assert torch.count_nonzero(layer.bias) == 0
    for bn in (bn2, bn1):
        assert torch.equal(bn.weight.detach(), torch.ones_like(bn.weight))
        assert torch.count_nonzero(bn.bias) == 0 and torch.count_nonzero(bn.running_mean) == 0
        assert torch.equal(bn.running_var, torch.ones_like(bn.running_var))
        assert bn.num_batches_tracked.item() == 0
    torch.manual_seed(2)
    first = keras_resnet.keras_initialise_(KerasResNet50()).state_dict()
    torch.manual_seed(2)
    second = keras_resnet.keras_initialise_(KerasResNet50()).state_dict()
    assert all(torch.equal(v, second[k]) for k, v in first.items())


# ------------------------------------------------------------------ layout and transposes


def test_every_h5_tensor_is_consumed_once_and_fills_the_module(notop, converted):
    _, _, arrays = notop
    model_keys = {
        k
        for k in KerasResNet50(num_classes=0).state_dict()
        if not k.endswith("num_batches_tracked")
    }
    assert set(converted) == model_keys
    # One output tensor per h5 dataset, and the same number of values: nothing dropped or reused.
    assert len(converted) == len(arrays) == 53 * (2 + 4)  # 53 convs (kernel, bias), 53 BNs
    assert sum(t.numel() for t in converted.values()) == KERAS_RESNET50_NOTOP_PARAMS


def test_kernels_are_transposed_hwio_to_oihw(notop, converted):
    _, _, arrays = notop
    rng = np.random.default_rng(0)
    for layer, key in [
        ("conv1_conv", "conv1.conv.weight"),
        ("conv3_block1_0_conv", "conv3.block1.conv0.weight"),
        ("conv4_block5_2_conv", "conv4.block5.conv2.weight"),
        ("conv5_block3_3_conv", "conv5.block3.conv3.weight"),
    ]:
        kernel = arrays[(layer, "kernel")]  # (kh, kw, in, out)
        weight = converted[key].numpy()  # (out, in, kh, kw)
        assert weight.shape == (kernel.shape[3], kernel.shape[2], kernel.shape[0], kernel.shape[1])
        for _ in range(20):
            y, x, i, o = (int(rng.integers(n)) for n in kernel.shape)
            assert weight[o, i, y, x] == kernel[y, x, i, o]
    assert converted["conv1.conv.weight"].shape == (64, 3, 7, 7)
    assert converted["conv5.block1.conv0.weight"].shape == (2048, 1024, 1, 1)


def test_batch_norm_parameters_map_by_role(notop, converted):
    _, _, arrays = notop
    for param, suffix in [
        ("gamma", "weight"),
        ("beta", "bias"),
        ("moving_mean", "running_mean"),
        ("moving_variance", "running_var"),
    ]:
        np.testing.assert_array_equal(
            converted[f"conv4.block6.bn3.{suffix}"].numpy(), arrays[("conv4_block6_3_bn", param)]
        )
    np.testing.assert_array_equal(
        converted["conv2.block2.conv1.bias"].numpy(), arrays[("conv2_block2_1_conv", "bias")]
    )


def test_module_has_keras_v1_hyperparameters():
    model = KerasResNet50()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(bns) == len(convs) == 53
    assert all(m.eps == pytest.approx(1.001e-5) and m.momentum == pytest.approx(0.01) for m in bns)
    assert all(m.bias is not None for m in convs)
    for stage in ("conv3", "conv4", "conv5"):
        block = getattr(model, stage).block1
        assert block.conv1.stride == (2, 2) and block.conv0.stride == (2, 2)
        assert block.conv2.stride == (1, 1)  # v1: not in the 3x3 conv as in torchvision v1.5
    assert model.conv2.block1.conv1.stride == (1, 1)


# ------------------------------------------------------------------ numpy reference (NHWC)


def np_conv(x, kernel, bias, stride=1, pad=0):
    """Keras Conv2D on NHWC input: ZeroPadding2D(pad) then a 'valid' convolution."""
    x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    kh, kw, cin, cout = kernel.shape
    windows = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(1, 2))
    windows = windows[:, ::stride, ::stride]  # (N, Ho, Wo, C, kh, kw)
    n, ho, wo = windows.shape[:3]
    patches = windows.transpose(0, 1, 2, 4, 5, 3).reshape(n * ho * wo, kh * kw * cin)
    out = patches.astype(np.float64) @ kernel.reshape(kh * kw * cin, cout).astype(np.float64)
    return (out + bias).reshape(n, ho, wo, cout)


def np_bn(x, w, layer):
    return (x - w[(layer, "moving_mean")]) / np.sqrt(w[(layer, "moving_variance")] + EPS) * w[
        (layer, "gamma")
    ] + w[(layer, "beta")]


def np_conv_bn(x, w, name, stride=1, pad=0):
    y = np_conv(x, w[(f"{name}_conv", "kernel")], w[(f"{name}_conv", "bias")], stride, pad)
    return np_bn(y, w, f"{name}_bn")


def np_stem(x, w):
    y = np.maximum(np_conv_bn(x, w, "conv1", stride=2, pad=3), 0)
    y = np.pad(y, ((0, 0), (1, 1), (1, 1), (0, 0)))  # Keras pool1_pad: zeros
    windows = np.lib.stride_tricks.sliding_window_view(y, (3, 3), axis=(1, 2))[:, ::2, ::2]
    return windows.max(axis=(-1, -2))


def np_block(x, w, name, stride, conv_shortcut):
    shortcut = np_conv_bn(x, w, f"{name}_0", stride) if conv_shortcut else x
    y = np.maximum(np_conv_bn(x, w, f"{name}_1", stride), 0)
    y = np.maximum(np_conv_bn(y, w, f"{name}_2", pad=1), 0)
    y = np_conv_bn(y, w, f"{name}_3")
    return np.maximum(y + shortcut, 0)


def np_resnet50_features(x_nhwc, w):
    y = np_stem(x_nhwc, w)
    for stage, _, blocks, stride in RESNET50:
        for b in range(1, blocks + 1):
            y = np_block(y, w, f"{stage}_block{b}", stride if b == 1 else 1, b == 1)
    return y.mean(axis=(1, 2))


def to_nchw(a):
    return torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2))).float()


def assert_close_relative(actual, expected, tol=1e-4):
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape
    scale = np.abs(expected).max()
    assert scale > 1e-3  # the comparison is not between two near-zero tensors
    assert np.abs(actual - expected).max() <= tol * scale


@pytest.fixture(scope="module")
def loaded_model(converted):
    model = KerasResNet50(num_classes=0)
    model.load_state_dict(converted, strict=False)
    return model.eval()


@pytest.fixture(scope="module")
def image_nhwc():
    return np.random.default_rng(7).uniform(-1, 1, size=(2, 64, 64, 3)).astype(np.float32)


@pytest.mark.numerics
def test_stem_matches_numpy_reference(notop, loaded_model, image_nhwc):
    _, _, arrays = notop
    with torch.no_grad():
        out = loaded_model.conv1(to_nchw(image_nhwc)).numpy()
    expected = np_stem(image_nhwc, arrays).transpose(0, 3, 1, 2)
    assert out.shape == (2, 64, 16, 16)
    assert_close_relative(out, expected)


@pytest.mark.numerics
def test_first_bottleneck_of_a_strided_stage_matches_numpy_reference(notop, loaded_model):
    _, _, arrays = notop
    x = np.random.default_rng(8).uniform(0, 1, size=(1, 16, 16, 256)).astype(np.float32)
    with torch.no_grad():
        out = loaded_model.conv3.block1(to_nchw(x)).numpy()
    expected = np_block(x, arrays, "conv3_block1", stride=2, conv_shortcut=True)
    assert out.shape == (1, 512, 8, 8)
    assert_close_relative(out, expected.transpose(0, 3, 1, 2))


@pytest.mark.numerics
def test_full_forward_matches_numpy_reference(notop, loaded_model, image_nhwc):
    _, _, arrays = notop
    with torch.no_grad():
        features = loaded_model.forward_features(to_nchw(image_nhwc)).numpy()
    expected = np_resnet50_features(image_nhwc, arrays)
    assert features.shape == (2, 2048)
    assert_close_relative(features, expected)
    # The two images give different features: the check is not passing on a constant.
    assert np.abs(expected[0] - expected[1]).max() > 1e-3 * np.abs(expected).max()


# Run by a Python that has TensorFlow (this environment's, or $SM_TF_PYTHON, e.g. a separate
# venv): tf.keras' own ResNet50 with seeded random weights writes its outputs and two real Keras
# files, a weights-only .h5 and a full-model .h5 (weights under "model_weights").
TF_SCRIPT = """
import sys, h5py, numpy as np
try:
    import keras
except ImportError:
    from tensorflow import keras
out = sys.argv[1]
model = keras.applications.ResNet50(
    weights=None, include_top=False, pooling="avg", input_shape=(64, 64, 3))
rng = np.random.default_rng(11)
values = []
for w in model.weights:
    name, shape = getattr(w, "path", w.name), tuple(w.shape)
    if "moving_variance" in name or "gamma" in name:
        v = rng.uniform(0.5, 1.5, shape)
    elif "kernel" in name:
        v = rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))
    else:
        v = 0.1 * rng.standard_normal(shape)
    values.append(v.astype("float32"))
model.set_weights(values)
x = np.random.default_rng(12).uniform(-1, 1, (2, 64, 64, 3)).astype("float32")
np.save(out + "/x.npy", x)
np.save(out + "/y.npy", model.predict(x, verbose=0))
try:  # Keras 3 writes the legacy .h5 weights format only through this function
    from keras.src.legacy.saving import legacy_h5_format
    with h5py.File(out + "/weights_only.h5", "w") as fh:
        legacy_h5_format.save_weights_to_hdf5_group(fh, model)
except ImportError:
    model.save_weights(out + "/weights_only.h5")
model.save(out + "/full_model.h5")
"""


def _python_with_tensorflow() -> str | None:
    if os.environ.get("SM_TF_PYTHON"):
        return os.environ["SM_TF_PYTHON"]
    return sys.executable if importlib.util.find_spec("tensorflow") else None


def test_tensorflow_keras_equivalence(tmp_path):
    python = _python_with_tensorflow()
    if python is None:
        pytest.skip("TensorFlow is not importable; set SM_TF_PYTHON=<python with tensorflow>")
    subprocess.run([python, "-c", TF_SCRIPT, str(tmp_path)], check=True, timeout=600)
    x, y = np.load(tmp_path / "x.npy"), np.load(tmp_path / "y.npy")
    for name in ("weights_only.h5", "full_model.h5"):
        model = KerasResNet50(num_classes=0)
        model.load_state_dict(convert_keras_h5(tmp_path / name), strict=False)
        with torch.no_grad():
            features = model.eval().forward_features(to_nchw(x)).numpy()
        assert np.abs(y).max() > 1.0
        assert np.abs(features - y).max() < 1e-4, name


# ------------------------------------------------------------------ file variants and refusals


def test_weights_under_model_weights_group_and_with_top(tmp_path, notop):
    _, _, arrays = notop
    top_layers = keras_resnet50_layers(top=True)
    top_arrays = {**arrays, **random_weights(top_layers[-1:], seed=3)}
    path = write_keras_h5(
        tmp_path / "full_model.h5", top_layers, top_arrays, nested_under_model_weights=True
    )
    state = convert_keras_h5(path)
    np.testing.assert_array_equal(
        state["fc.weight"].numpy(), top_arrays[("predictions", "kernel")].T
    )
    assert state["fc.weight"].shape == (1000, 2048)
    np.testing.assert_array_equal(state["conv1.conv.bias"].numpy(), arrays[("conv1_conv", "bias")])


def test_missing_dataset_is_named(tmp_path, notop):
    _, layers, arrays = notop
    path = write_keras_h5(
        tmp_path / "partial.h5", layers, arrays, skip={("conv4_block2_2_bn", "moving_mean")}
    )
    with pytest.raises(WeightsError, match=r"missing \(1\): conv4\.block2\.bn2\.running_mean"):
        convert_keras_h5(path)


@pytest.mark.parametrize(
    ("dropped", "named"),
    [
        ("conv5_block3_", ["conv5_block3_1_conv", "conv5_block3_3_bn", "conv5.block3.conv1.weight"]),
        ("conv3_block2_2_conv", ["conv3_block2_2_conv", "conv3.block2.conv2.bias"]),
    ],
)
def test_missing_layers_are_named_in_keras_and_module_terms(tmp_path, notop, dropped, named):
    _, layers, arrays = notop
    kept = [(n, shapes) for n, shapes in layers if not n.startswith(dropped)]
    path = write_keras_h5(tmp_path / "cut.h5", kept, arrays)
    with pytest.raises(WeightsError, match="Keras layers missing or incomplete") as info:
        convert_keras_h5(path)
    message = str(info.value)
    assert all(name in message for name in named), message
    assert "does not match the Keras ResNet50 layout" in message


def test_unrecognised_keras_model_lists_its_layers(tmp_path):
    path = _tiny_h5(tmp_path / "vgg16_notop.h5", ["input_1"], ["block1_conv1", "block5_conv3"])
    with pytest.raises(WeightsError, match="does not recognise.*block1_conv1, block5_conv3"):
        convert_keras_h5(path)


def test_unknown_extra_tensor_is_reported_not_dropped(tmp_path, notop):
    _, layers, arrays = notop
    extra = [("my_custom_dense", {"kernel": (2048, 7), "bias": (7,)})]
    path = write_keras_h5(
        tmp_path / "extra.h5", layers + extra, {**arrays, **random_weights(extra, 1)}
    )
    with pytest.raises(WeightsError, match=r"not used \(2\): my_custom_dense/kernel"):
        convert_keras_h5(path)


def _tiny_h5(path, layer_names, weight_layers):
    layers = [(n, {}) for n in layer_names] + [
        (n, {"kernel": (1, 1, 3, 4), "bias": (4,)}) for n in weight_layers
    ]
    return write_keras_h5(path, layers, random_weights(layers, 0))


@pytest.mark.parametrize(
    ("filename", "layer_names", "weight_layers", "kind"),
    [
        (
            "RadImageNet-DenseNet121_notop.h5",
            ["input_1", "zero_padding2d", "conv2_block1_concat", "pool2_relu"],
            ["conv1/conv", "conv2_block1_1_conv", "pool2_conv"],
            "DenseNet",
        ),
        (
            "RadImageNet-InceptionV3_notop.h5",
            ["input_1", "mixed0", "mixed1"],
            ["conv2d", "conv2d_1"],
            "InceptionV3",
        ),
        (
            "RadImageNet-IRV2_notop.h5",
            ["input_1", "mixed_5b", "block35_1_mixed"],
            ["conv2d", "block35_1_conv", "conv_7b"],
            "InceptionResNetV2",
        ),
        (
            "ResNet101_notop.h5",
            ["input_1", "conv4_block23_out"],
            ["conv1_conv", "conv4_block23_3_conv", "conv5_block3_3_conv"],
            "ResNet101",
        ),
    ],
)
def test_other_radimagenet_architectures_are_refused_by_name(
    tmp_path, filename, layer_names, weight_layers, kind
):
    path = _tiny_h5(tmp_path / filename, layer_names, weight_layers)
    with pytest.raises(WeightsError) as info:
        create_model("radimagenet", weights=path, cache_dir=tmp_path / "cache")
    message = str(info.value)
    assert f"Keras {kind} model" in message
    assert "RadImageNet-ResNet50_notop.h5" in message  # what is supported


def test_old_keras_applications_naming_is_refused_with_a_fix(tmp_path):
    path = _tiny_h5(tmp_path / "old.h5", ["input_1", "max_pooling2d"], ["conv1", "res2a_branch2a"])
    with pytest.raises(WeightsError, match="old keras-applications naming.*eps 1e-3.*re-save"):
        convert_keras_h5(path)


def test_truncated_h5_is_reported(tmp_path, notop):
    path, _, _ = notop
    data = path.read_bytes()
    cut = tmp_path / "RadImageNet-ResNet50_notop.h5"
    cut.write_bytes(data[: len(data) // 3])
    with pytest.raises(WeightsError, match="truncated or corrupt"):
        convert_keras_h5(cut)


def test_non_keras_hdf5_is_reported(tmp_path):
    path = tmp_path / "data.h5"
    with h5py.File(path, "w") as fh:
        fh["x"] = np.zeros(3)
    with pytest.raises(WeightsError, match="not a Keras weights file"):
        convert_keras_h5(path)


# ------------------------------------------------------------------ sources built on the module


def test_radimagenet_source_converts_once_and_reuses_the_cache(tmp_path, notop, converted):
    path, _, _ = notop
    cache = tmp_path / "cache"
    torch.manual_seed(0)
    model, prep = create_model("radimagenet", weights=path, cache_dir=cache, num_classes=2)
    assert isinstance(model, KerasResNet50)
    torch.testing.assert_close(
        model.conv5.block3.bn3.running_var, converted["conv5.block3.bn3.running_var"]
    )
    assert model.fc.out_features == 2
    files = list((cache / "keras_converted").glob("*.safetensors"))
    assert len(files) == 1
    stamp = files[0].stat().st_mtime_ns
    again, digest = cached_conversion(path, cache)
    assert again == files[0] and again.stat().st_mtime_ns == stamp
    assert digest[:16] in again.name
    assert prep.scale == pytest.approx(1 / 255) and prep.channel_order == "BGR"
    info = describe_source("radimagenet", weights=path)
    assert info["weights_sha256"] == digest and info["arch"] == "keras_resnet50"
    assert "caffe" in info["preprocessing"]["name"]


def test_imagenet_keras_source_uses_same_module_and_caffe_without_rescale(tmp_path, notop):
    path, _, _ = notop
    keras_named = tmp_path / "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
    keras_named.write_bytes(path.read_bytes())
    model, prep = create_model("imagenet_keras", weights=keras_named, cache_dir=tmp_path)
    assert isinstance(model, KerasResNet50)
    assert prep.scale == 1.0 and prep.mean == (103.939, 116.779, 123.68)
    # The Keras ImageNet file given to the RadImageNet source would be mislabelled: refused.
    with pytest.raises(SourceError, match="use source='imagenet_keras'"):
        create_model("radimagenet", weights=keras_named, cache_dir=tmp_path)


def test_image_too_small_for_keras_stem_is_refused():
    with pytest.raises(SourceError, match="at least 32x32"):
        create_model("random", arch="keras_resnet50", image_size=16)
    with pytest.raises(SourceError, match="too small for keras_resnet50"):
        KerasResNet50()(torch.zeros(1, 3, 24, 24))
    assert keras_resnet.check_input_size(32) is None
