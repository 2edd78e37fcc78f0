"""Foundation models as sources, in the formats they are published in (sm_utils.sources:
``timm_vit``, ``transformers_folder``, ``openclip``).

For each format a randomly initialised small model is saved exactly as its library publishes
it (timm state dict, ``save_pretrained``, open_clip's CLIP state dict), loaded through the
source, and must give the original model's features to 1e-5. The features are what the new
head reads: the CLS token after the final norm (timm pre-logits, a Dinov2Model's
pooler_output) or the open_clip image embedding (``encode_image``, not normalised). Then each
bad input: a clear error naming the file, what was expected and what was found.

Nothing touches the network: HF_HUB_OFFLINE=1, and the Hugging Face downloader fails.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from sm_utils.sources import (
    CAFFE,
    SourceError,
    WeightsError,
    check_source_arch,
    create_model,
    describe_source,
    list_sources,
)
from sm_utils.sources.foundation import FoundationClassifier
from sm_utils.sources.openclip import BIOMEDCLIP

torch.set_num_threads(1)
ATOL = 1e-5
FOUNDATION = {"dinov2", "timm_vit", "rad_dino", "transformers_vit", "biomedclip",
              "clip_openai", "open_clip"}
TINY_TEXT = {"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1}
TINY_VISION = {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16}


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))

    def no_download(*args, **kwargs):
        raise AssertionError("a test tried to download weights")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_download)


def images(size: int, n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(5))


def features(model: FoundationClassifier, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model.forward_features(x)


def assert_same(found: torch.Tensor, expected: torch.Tensor) -> None:
    assert found.shape == expected.shape
    assert expected.abs().max() > 1e-3  # features, not a degenerate zero
    torch.testing.assert_close(found, expected, rtol=0, atol=ATOL)


# ------------------------------------------------------------------ timm ViT checkpoints


def tiny_vit(img_size: int = 32):
    import timm

    torch.manual_seed(1)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=img_size).eval()


@pytest.mark.numerics
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_a_timm_vit_checkpoint_gives_the_original_features(tmp_path, suffix):
    original = tiny_vit(32)  # its ImageNet head (1000 classes) is in the file, as timm's are
    path = tmp_path / f"model{suffix}"
    if suffix == ".safetensors":
        save_file(original.state_dict(), path)
    else:
        torch.save(original.state_dict(), path)
    model, prep = create_model("timm_vit", arch="vit_tiny_patch16_224", weights=path,
                               image_size=32, num_classes=2)
    x = images(32)
    with torch.no_grad():
        expected = original.forward_head(original.forward_features(x), pre_logits=True)
    assert_same(features(model, x), expected)
    assert model(x).shape == (3, 2)  # a fresh 2-class head, not the file's 1000-class one
    assert model.unused_keys == ("head.bias", "head.weight")  # said, not silently dropped
    assert (prep.input_size, prep.patch_size) == ((32, 32), 16)
    assert prep.mean == pytest.approx((127.5,) * 3)  # timm's config for this ViT: 0.5, 0.5


@pytest.mark.numerics
def test_the_dinov2_source_loads_a_dinov2_checkpoint_in_the_original_release_layout(tmp_path):
    import timm

    torch.manual_seed(2)
    original = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=28,
                                 num_classes=0).eval()
    state = dict(original.state_dict())
    state["mask_token"] = torch.zeros(1, original.embed_dim)  # dinov2_vits14_pretrain.pth has one
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(state, path)
    model, prep = create_model("dinov2", weights=path, image_size=28)
    x = images(28, n=2)
    with torch.no_grad():
        expected = original(x)
    assert_same(features(model, x), expected)
    assert (prep.input_size, prep.patch_size) == ((28, 28), 14)
    assert describe_source("dinov2", weights=path)["preprocessing"]["input_size"] == [518, 518]


@pytest.mark.numerics
def test_a_checkpoint_at_another_input_size_is_resampled_as_timm_resamples_its_own(tmp_path):
    import timm

    original = tiny_vit(224)  # pretrained at 224 (14x14 patches), used at 48 (3x3)
    state = dict(original.state_dict())
    state["mask_token"] = torch.zeros(1, original.embed_dim)  # the original DINOv2 layout
    path = tmp_path / "vit_tiny.pth"
    torch.save(state, path)
    model, prep = create_model("timm_vit", arch="vit_tiny_patch16_224", weights=path,
                               image_size=48)
    timm_own = timm.create_model("vit_tiny_patch16_224", pretrained=True, num_classes=0,
                                 img_size=48, pretrained_cfg_overlay={"file": str(path)}).eval()
    x = images(48)
    with torch.no_grad():
        expected = timm_own(x)
    assert_same(features(model, x), expected)
    assert prep.input_size == (48, 48)


# ------------------------------------------------------------------ transformers folders


def tiny_dinov2_folder(folder, processor: bool = True):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(3)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=64, patch_size=8, image_size=32)
    original = Dinov2Model(config).eval()
    original.save_pretrained(folder)
    if processor:  # as RAD-DINO publishes it: its own mean and std, 1/255 rescale
        (folder / "preprocessor_config.json").write_text(json.dumps({
            "crop_size": {"height": 32, "width": 32}, "do_center_crop": True,
            "do_normalize": True, "do_rescale": True, "rescale_factor": 1 / 255,
            "image_mean": [0.5307, 0.5307, 0.5307], "image_std": [0.2583, 0.2583, 0.2583],
            "image_processor_type": "BitImageProcessor", "size": {"shortest_edge": 32},
        }))
    return original


@pytest.mark.numerics
def test_a_transformers_folder_gives_the_original_features(tmp_path):
    folder = tmp_path / "rad-dino"
    original = tiny_dinov2_folder(folder)
    assert {p.name for p in folder.iterdir()} >= {"config.json", "model.safetensors"}
    model, prep = create_model("rad_dino", weights=folder, num_classes=2)
    for size in (32, 48):  # the published size, and one a Dinov2Model interpolates itself to
        x = images(size)
        if size != 32:
            model, _ = create_model("rad_dino", weights=folder / "config.json", image_size=size)
        with torch.no_grad():
            expected = original(pixel_values=x).pooler_output
        assert_same(features(model, x), expected)
    assert (prep.input_size, prep.patch_size) == ((32, 32), 8)
    assert prep.mean == pytest.approx((0.5307 * 255,) * 3)
    assert prep.std == pytest.approx((0.2583 * 255,) * 3)
    record = describe_source("rad_dino", weights=folder)
    assert record["weights"] == str(folder / "model.safetensors") and record["weights_sha256"]


# ------------------------------------------------------------------ open_clip vision towers


def tiny_clip_folder(folder, *, name: str = "open_clip_model.safetensors"):
    import open_clip

    torch.manual_seed(4)
    vision = TINY_VISION
    original = open_clip.CLIP(embed_dim=24, vision_cfg=vision, text_cfg=TINY_TEXT,
                              quick_gelu=True).eval()
    folder.mkdir()
    save_file(original.state_dict(), folder / name)
    (folder / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": {"embed_dim": 24, "quick_gelu": True, "vision_cfg": vision,
                      "text_cfg": TINY_TEXT},
        "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073],
                           "std": [0.26862954, 0.26130258, 0.27577711]},
    }))
    return original


@pytest.mark.numerics
def test_an_open_clip_checkpoint_gives_the_original_image_embedding(tmp_path):
    original = tiny_clip_folder(tmp_path / "clip")
    model, prep = create_model("open_clip", arch="hf-hub:tiny/clip", weights=tmp_path / "clip")
    x = images(32)
    with torch.no_grad():
        expected = original.encode_image(x)
    assert_same(features(model, x), expected)
    assert (prep.input_size, prep.patch_size) == ((32, 32), 8)
    assert prep.mean == pytest.approx((0.48145466 * 255, 0.4578275 * 255, 0.40821073 * 255))
    assert not any(k.startswith("text") for k in model.state_dict())  # the vision tower only
    text_tower = {k for k in original.state_dict() if not k.startswith("visual.")}
    assert set(model.unused_keys) == text_tower
    assert "transformer.resblocks.0.ln_1.weight" in model.unused_keys  # the text tower's


@pytest.mark.numerics
def test_a_biomedclip_layout_checkpoint_gives_the_original_image_embedding(tmp_path):
    import open_clip

    torch.manual_seed(6)
    # BiomedCLIP's layout: a timm ViT trunk + linear projection (visual.trunk.*, visual.head.*)
    # beside a text tower under text.*; a tiny timm ViT stands in for its ViT-B/16
    vision = {"timm_model_name": "vit_tiny_patch16_224", "timm_model_pretrained": False,
              "timm_pool": "", "timm_proj": "linear", "image_size": 224}
    original = open_clip.CustomTextCLIP(embed_dim=24, vision_cfg=vision,
                                        text_cfg=TINY_TEXT).eval()
    folder = tmp_path / "biomedclip"
    folder.mkdir()
    torch.save(original.state_dict(), folder / "open_clip_pytorch_model.bin")
    (folder / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": {"embed_dim": 24, "vision_cfg": vision, "text_cfg": TINY_TEXT},
        "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073],
                           "std": [0.26862954, 0.26130258, 0.27577711]},
    }))
    model, prep = create_model("biomedclip", weights=folder / "open_clip_pytorch_model.bin")
    x = images(224, n=2)
    with torch.no_grad():
        expected = original.encode_image(x)
    assert_same(features(model, x), expected)
    assert (prep.input_size, prep.patch_size) == ((224, 224), 16)
    assert check_source_arch("biomedclip") == BIOMEDCLIP
    described = describe_source("biomedclip", weights=folder)["preprocessing"]
    assert (described["input_size"], described["patch_size"]) == ([224, 224], 16)


# ------------------------------------------------------------------ registration


def test_the_foundation_sources_are_registered_and_listed(capsys):
    from sm_utils.cli import main

    assert set(list_sources()) >= FOUNDATION
    assert main(["list"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in FOUNDATION)
    assert check_source_arch("dinov2") == "vit_small_patch14_dinov2"
    assert check_source_arch("dinov2", "vit_base_patch14_dinov2.lvd142m").endswith(".lvd142m")
    assert check_source_arch("clip_openai") == "ViT-B-16-quickgelu"
    with pytest.raises(SourceError, match="not a timm VisionTransformer"):
        check_source_arch("timm_vit", "resnet50")
    with pytest.raises(SourceError, match="dinov2"):
        check_source_arch("transformers_vit", "bert")


def test_the_cnn_sources_records_keep_their_form():
    # input_size and patch_size are said only where a source fixes them: the committed run
    # records of the CNN sources stay as they were
    assert "input_size" not in CAFFE.describe() and "patch_size" not in CAFFE.describe()


# ------------------------------------------------------------------ bad input


def test_a_vit_b_checkpoint_for_a_vit_s_source_is_refused_with_both_sizes(tmp_path):
    import timm

    with torch.device("meta"):
        shapes = timm.create_model("vit_base_patch14_dinov2", num_classes=0).state_dict()
    path = tmp_path / "dinov2_vitb14_pretrain.pth"
    torch.save({k: torch.zeros(v.shape) for k, v in shapes.items()}, path)
    try:
        with pytest.raises(WeightsError) as err:
            create_model("dinov2", arch="vit_small_patch14_dinov2", weights=path, image_size=28)
    finally:
        path.unlink()  # 346 MB
    text = str(err.value)
    assert str(path) in text
    assert "ViT-B (width 768, 12 blocks, patch 14x14)" in text  # found
    assert "ViT-S (width 384, 12 blocks, patch 14x14)" in text  # expected
    assert "vit_base_patch14_dinov2" in text  # the fix


def test_a_checkpoint_of_another_layout_names_the_keys_it_found(tmp_path):
    path = tmp_path / "resnet.safetensors"
    save_file({"conv1.weight": torch.zeros(4, 3, 3, 3), "fc.weight": torch.zeros(2, 4)}, path)
    with pytest.raises(WeightsError, match="patch_embed.proj.weight") as err:
        create_model("timm_vit", arch="vit_tiny_patch16_224", weights=path, image_size=32)
    assert str(path) in str(err.value) and "conv1.weight" in str(err.value)


def test_a_torchvision_vit_state_dict_is_named_as_such(tmp_path):
    import torchvision

    with torch.device("meta"):
        shapes = torchvision.models.vit_b_16().state_dict()
    path = tmp_path / "vit_b_16.pth"
    torch.save({k: torch.zeros(v.shape) for k, v in list(shapes.items())[:6]}, path)
    with pytest.raises(WeightsError, match="torchvision ViT state dict") as err:
        create_model("timm_vit", arch="vit_tiny_patch16_224", weights=path, image_size=32)
    assert str(path) in str(err.value)


def test_a_missing_tensor_is_refused_never_left_random(tmp_path):
    state = dict(tiny_vit(32).state_dict())
    del state["blocks.1.attn.qkv.weight"]
    state["blocks.1.attn.extra"] = torch.zeros(1)
    path = tmp_path / "vit.safetensors"
    save_file(state, path)
    with pytest.raises(WeightsError) as err:
        create_model("timm_vit", arch="vit_tiny_patch16_224", weights=path, image_size=32)
    text = str(err.value)
    assert str(path) in text
    assert "missing keys (1): blocks.1.attn.qkv.weight" in text
    assert "unexpected keys (1): blocks.1.attn.extra" in text


def test_a_transformers_folder_without_its_config_is_refused(tmp_path):
    folder = tmp_path / "rad-dino"
    tiny_dinov2_folder(folder)
    (folder / "config.json").unlink()
    with pytest.raises(SourceError) as err:
        create_model("rad_dino", weights=folder)
    text = str(err.value)
    assert str(folder) in text and "missing config.json" in text
    assert "model.safetensors" in text and "preprocessor_config.json" in text  # what it found


def test_a_transformers_folder_whose_config_does_not_fit_its_weights_is_refused(tmp_path):
    folder = tmp_path / "rad-dino"
    tiny_dinov2_folder(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "hidden_size": 64}))
    with pytest.raises(WeightsError) as err:
        create_model("rad_dino", weights=folder)
    text = str(err.value)
    assert str(folder / "model.safetensors") in text and "shape mismatches" in text
    assert "embeddings.cls_token: file (1, 1, 32) vs model (1, 1, 64)" in text


def test_an_open_clip_file_with_text_weights_only_is_refused(tmp_path):
    import open_clip

    original = open_clip.CLIP(embed_dim=24, vision_cfg=TINY_VISION, text_cfg=TINY_TEXT)
    text_only = {k: v for k, v in original.state_dict().items() if not k.startswith("visual.")}
    folder = tmp_path / "clip"
    folder.mkdir()
    save_file(text_only, folder / "open_clip_model.safetensors")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": {
        "embed_dim": 24, "vision_cfg": TINY_VISION, "text_cfg": TINY_TEXT}}))
    with pytest.raises(WeightsError) as err:
        create_model("open_clip", arch="hf-hub:tiny/clip", weights=folder)
    text = str(err.value)
    assert str(folder / "open_clip_model.safetensors") in text
    assert "'visual.*'" in text and "token_embedding.weight" in text and "text weights only" in text


def test_an_open_clip_checkpoint_missing_a_tower_tensor_is_refused(tmp_path):
    tiny_clip_folder(tmp_path / "clip")
    path = tmp_path / "clip" / "open_clip_model.safetensors"
    from safetensors.torch import load_file

    state = load_file(path)
    del state["visual.ln_post.weight"]
    save_file(state, path)
    with pytest.raises(WeightsError, match=r"missing keys \(1\): ln_post.weight") as err:
        create_model("open_clip", arch="hf-hub:tiny/clip", weights=path)
    assert str(path) in str(err.value)


def test_a_published_config_that_contradicts_the_named_one_is_refused(tmp_path):
    # OpenAI's CLIP was trained with QuickGELU: a GELU tower would load its weights without a
    # missing key and compute other features
    import open_clip

    folder = tmp_path / "clip"
    folder.mkdir()
    save_file({"visual.proj": torch.zeros(1)}, folder / "open_clip_model.safetensors")
    gelu = open_clip.get_model_config("ViT-B-16")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": gelu}))
    with pytest.raises(SourceError, match="another vision tower") as err:
        create_model("clip_openai", weights=folder)
    assert "quick_gelu False there, True in 'ViT-B-16-quickgelu'" in str(err.value)
    # the same config as published, with open_clip's defaults written out, is no contradiction
    from open_clip.model import CLIPVisionCfg

    from sm_utils.sources.openclip import model_config

    quick = open_clip.get_model_config("ViT-B-16-quickgelu")
    spelled = {**quick, "vision_cfg": vars(CLIPVisionCfg(**quick["vision_cfg"]))}
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": spelled}))
    assert model_config("ViT-B-16-quickgelu", folder / "open_clip_model.safetensors")[0] == quick


@pytest.mark.parametrize("source, arch, size, patch", [
    ("timm_vit", "vit_tiny_patch16_224", 40, 16),
    ("rad_dino", None, 36, 8),
    ("open_clip", "hf-hub:tiny/clip", 36, 8),
])
def test_an_input_size_the_patch_size_does_not_divide_is_refused(tmp_path, source, arch, size,
                                                                    patch):
    if source == "rad_dino":
        weights = tmp_path / "rad-dino"
        tiny_dinov2_folder(weights)
    elif source == "open_clip":
        weights = tmp_path / "clip"
        tiny_clip_folder(weights)
    else:
        weights = tmp_path / "vit.safetensors"
        save_file(tiny_vit(32).state_dict(), weights)
    with pytest.raises(SourceError) as err:
        create_model(source, arch=arch, weights=weights, image_size=size)
    text = str(err.value)
    assert f"input size {size}x{size}" in text and f"{patch}x{patch} patches" in text
    lower = size // patch * patch
    assert f"image_size={lower} or {lower + patch}" in text


def test_a_foundation_source_has_no_pretrained_head_to_keep(tmp_path):
    folder = tmp_path / "rad-dino"
    tiny_dinov2_folder(folder)
    with pytest.raises(SourceError, match="no pretrained classifier"):
        create_model("rad_dino", weights=folder, keep_pretrained_head=True)


def test_the_offline_stand_ins_are_seeded_and_leave_torchs_rng_alone(tmp_path):
    """The foundation demo's random ViTs (sm_utils.sources.stand_ins): the same seed writes the
    same bytes, another seed other weights, and the caller's torch RNG is untouched."""
    from sm_utils.sources.stand_ins import save_random_source

    tiny = {"image_size": 16, "patch_size": 8, "width": 8, "depth": 1, "heads": 2}
    state = torch.random.get_rng_state()
    first = save_random_source(tmp_path / "a", "transformers", **tiny)
    assert torch.equal(torch.random.get_rng_state(), state)
    again = save_random_source(tmp_path / "b", "transformers", **tiny)
    other = save_random_source(tmp_path / "c", "transformers", seed=1, **tiny)
    weights = [(folder / "model.safetensors").read_bytes() for folder in (first, again, other)]
    assert weights[0] == weights[1] != weights[2]
    assert not list(tmp_path.glob(".*partial"))  # staged, then renamed whole
    with pytest.raises(SourceError, match=r"file_format must be one of \['timm', 'transformers'"):
        save_random_source(tmp_path / "d", "onnx")
