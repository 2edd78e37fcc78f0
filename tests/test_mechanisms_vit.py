"""The mechanisms on vision-transformer sources (issue 32): the encodedness probe's features
(the CLS token the head reads, the mean of the patch tokens), attribution on the patch grid,
a kept fine-tuned model reloaded without its weights file, and the shortcut seen: a ViT
fine-tuned with the tag at p = 1 puts its attribution on the tag.

One tiny, randomly initialised model per published format, saved as its library publishes
it and loaded through its source: a timm ViT checkpoint (timm's ``test_vit``: width 64, 6
blocks, patch 16), a ``transformers`` Dinov2Model folder and an open_clip CLIP checkpoint
(width 32, 2 blocks, patch 8), all at 64 px. Nothing touches the network.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sm_utils import mechanisms as M
from sm_utils.mechanisms.tokens import token_layout
from sm_utils.sources import create_model

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

SIZE = 64
KINDS = ("timm", "transformers", "open_clip")
REGISTERS = "transformers_registers"  # a Dinov2WithRegistersModel: CLS + 4 register tokens
TINY_TEXT = {"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1}
TINY_VISION = {"image_size": SIZE, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16}


def save_tiny(kind: str, folder: Path) -> dict:
    """A tiny random ViT saved in ``kind``'s published format; the run parameters that load it."""
    folder.mkdir(parents=True)
    torch.manual_seed(1)
    if kind == "timm":
        import timm

        save_file(timm.create_model("test_vit", img_size=SIZE).state_dict(),
                  folder / "model.safetensors")
        return {"source": "timm_vit", "arch": "test_vit",
                "weights": str(folder / "model.safetensors")}
    if kind in ("transformers", REGISTERS):
        import transformers

        shape = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                 "intermediate_size": 64, "patch_size": 8, "image_size": SIZE}
        if kind == REGISTERS:
            model = transformers.Dinov2WithRegistersModel(
                transformers.Dinov2WithRegistersConfig(**shape, num_register_tokens=4))
        else:
            model = transformers.Dinov2Model(transformers.Dinov2Config(**shape))
        model.save_pretrained(folder)
        # a file of the folder: a run's identity hashes its weights file
        return {"source": "transformers_vit", "arch": model.config.model_type,
                "weights": str(folder / "model.safetensors")}
    import open_clip

    clip = open_clip.CLIP(embed_dim=24, vision_cfg=TINY_VISION, text_cfg=TINY_TEXT)
    save_file(clip.state_dict(), folder / "open_clip_model.safetensors")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": {
        "embed_dim": 24, "vision_cfg": TINY_VISION, "text_cfg": TINY_TEXT}}))
    return {"source": "open_clip", "arch": "hf-hub:tiny/clip",
            "weights": str(folder / "open_clip_model.safetensors")}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("vits")
    return {kind: save_tiny(kind, root / kind) for kind in (*KINDS, REGISTERS)}


def load(saved, kind):
    torch.manual_seed(0)
    model, prep = create_model(**saved[kind], image_size=SIZE, num_classes=2, drop_rate=0.0)
    return model.eval(), prep


def images(n: int = 4) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, SIZE, SIZE)).astype(np.uint8)


def prefix_tokens(model) -> int:
    """CLS and register tokens, as each library counts them."""
    if model.kind == "timm":
        return model.backbone.num_prefix_tokens
    if model.kind == "transformers":
        return 1 + getattr(model.backbone.config, "num_register_tokens", 0)
    return 1


def patch_tokens_reference(model, x: torch.Tensor) -> torch.Tensor:
    """The patch tokens after the final norm, as each library itself gives them."""
    backbone = model.backbone
    if model.kind == "timm":
        return backbone.forward_features(x)[:, prefix_tokens(model):]
    if model.kind == "transformers":
        return backbone(pixel_values=x).last_hidden_state[:, prefix_tokens(model):]
    backbone.output_tokens = True
    try:
        return backbone(x)[1]
    finally:
        backbone.output_tokens = False


# --------------------------------------------------------------------------- probe features


@pytest.mark.numerics
@pytest.mark.parametrize("kind", (*KINDS, REGISTERS))
def test_probe_features_are_the_cls_token_and_the_patch_mean(saved, kind):
    model, prep = load(saved, kind)
    assert M.feature_layers(model)[:2] == [M.PENULTIMATE, M.PATCH_MEAN]
    cls = M.extract_features(model, prep, images())
    patch_mean = M.extract_features(model, prep, images(), layer=M.PATCH_MEAN)
    width = 64 if kind == "timm" else 32
    assert cls.shape == (4, model.num_features) and patch_mean.shape == (4, width)
    x = prep(torch.from_numpy(images()))
    with torch.no_grad():
        expected = patch_tokens_reference(model, x).mean(dim=1).double().numpy()
        head_input = model.forward_features(x).double().numpy()
    np.testing.assert_allclose(patch_mean, expected, rtol=0, atol=1e-5)  # CLS, registers out
    np.testing.assert_allclose(cls, head_input, rtol=0, atol=1e-6)  # what the head reads
    if kind != "open_clip":  # both of width 32/64 there: the CLS token is not the patch mean
        assert np.abs(cls - patch_mean).max() > 1e-2


@pytest.mark.numerics
def test_the_probe_runs_on_both_vit_features(saved, phantom_cxr, tmp_path):
    model, prep = load(saved, "transformers")
    settings = {"n_images": 40, "image_size": SIZE, "n_boot": 50, "cache_dir": tmp_path,
                "confounder_params": {"resolution": "input", "font_size": 192.0}}
    for layer in (M.PENULTIMATE, M.PATCH_MEAN):
        out = M.probe_model(model, prep, phantom_cxr, "tag", layer=layer, **settings)
        assert out["layer"] == layer and out["feature_dim"] == 32
        assert 0.0 <= out["probe_auc"] <= 1.0 and out["probe_n"] == 80


def test_patch_mean_of_a_cnn_is_refused():
    from sm_utils.sources import make_architecture

    with pytest.raises(M.MechanismError, match="patch tokens"):
        M.extract_features(make_architecture("resnet18"), lambda x: x, images(1),
                           layer=M.PATCH_MEAN)


# --------------------------------------------------------------------------- attribution


@pytest.mark.numerics
@pytest.mark.parametrize("kind", KINDS)
def test_attribution_maps_of_a_vit_have_the_image_shape(saved, kind):
    model, prep = load(saved, kind)
    layout = token_layout(model)
    assert M.cam_layer(model, SIZE) == layout.before_last  # the tokens the last block reads
    for method in M.ATTRIBUTION_METHODS:
        maps, layer = M.activation_maps(model, prep, images(), method=method)
        assert layer == layout.before_last and maps.shape == (4, SIZE, SIZE)
        assert (maps >= 0).all() and (maps.reshape(4, -1).max(axis=1) > 0).all()
    # the last block's own patch tokens do not reach a head that reads the CLS token
    with pytest.raises(M.MechanismError, match="do not reach the classifier"):
        M.activation_maps(model, prep, images(), layer=layout.last)


@pytest.mark.numerics
@pytest.mark.parametrize("kind", (*KINDS, REGISTERS))
def test_hirescam_of_a_vit_is_its_patch_tokens_on_the_patch_grid(saved, kind):
    """activation_maps against HiResCAM computed by hand from the library's own count of
    prefix tokens: a map one patch off (the CLS token kept, a register taken for a patch)
    fails here."""
    model, prep = load(saved, kind)
    layer = token_layout(model).before_last
    x = prep(torch.from_numpy(images()))
    kept = []
    hook = dict(model.named_modules())[layer].register_forward_hook(
        lambda module, args, out: kept.append(out[0] if isinstance(out, tuple) else out))
    try:
        logits = model(x)
    finally:
        hook.remove()
    tokens = kept[0]
    grads, = torch.autograd.grad((logits[:, 1] - logits[:, 0]).sum(), tokens)
    cam = (grads * tokens)[:, prefix_tokens(model):].sum(dim=-1).clamp_min(0)
    side = SIZE // model.pretrained_cfg["patch_size"]
    expected = torch.nn.functional.interpolate(cam.reshape(-1, 1, side, side), (SIZE, SIZE),
                                               mode="bilinear")[:, 0].clamp_min(0)
    maps, _ = M.activation_maps(model, prep, images())
    np.testing.assert_allclose(maps, expected.detach().numpy(), rtol=1e-4,
                               atol=1e-6 * float(expected.max()))


@pytest.mark.numerics
def test_sequence_first_open_clip_blocks_give_the_same_features_and_maps(saved):
    model, prep = load(saved, "open_clip")
    expected_maps, _ = M.activation_maps(model, prep, images())
    expected_mean = M.extract_features(model, prep, images(), layer=M.PATCH_MEAN)
    # open_clip before batch_first (and with batch_first=False) runs its blocks on (T, N, C)
    model.backbone.transformer.batch_first = False
    for block in model.backbone.transformer.resblocks:
        block.attn.batch_first = False
    assert token_layout(model).seq_first
    maps, _ = M.activation_maps(model, prep, images())
    np.testing.assert_allclose(maps, expected_maps, rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(M.extract_features(model, prep, images(), layer=M.PATCH_MEAN),
                               expected_mean, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- kept run models


@pytest.mark.numerics
@pytest.mark.parametrize("kind", KINDS)
def test_a_kept_vit_run_model_reloads_without_its_weights_file(saved, kind, tmp_path):
    weights = Path(saved[kind]["weights"])
    copy = tmp_path / "source"
    shutil.copytree(weights.parent, copy)
    model, prep = create_model(**{**saved[kind], "weights": str(copy / weights.name)},
                               image_size=SIZE, num_classes=2, drop_rate=0.3)
    with torch.no_grad():
        model.head.weight.add_(1.0)  # "fine-tuned": not what a fresh head would be
    M.save_run_model(model, prep, tmp_path, arch=str(saved[kind].get("arch")), drop_rate=0.3,
                     source=saved[kind]["source"])
    shutil.rmtree(copy)  # rebuilt from the recorded architecture, not from the source's file
    reloaded, reloaded_prep = M.load_run_model(tmp_path)
    x = prep(torch.from_numpy(images()))
    with torch.no_grad():
        assert torch.equal(reloaded(x), model.eval()(x))
    assert reloaded_prep == prep and reloaded.head_drop.p == 0.3
    assert type(reloaded.backbone) is type(model.backbone)


# --------------------------------------------------------------------------- the shortcut


@pytest.fixture(scope="module")
def demo_like(tmp_path_factory):
    """Phantoms as visible as the demo's (difficulty 0.15), 100 patients, as in
    test_mechanisms.py."""
    from sm_utils.datasets import build_dataset

    out = tmp_path_factory.mktemp("demo_like")
    build_dataset("phantom_cxr", out, n_patients=100, image_size=SIZE, seed=3, n_folds=2,
                  difficulty=0.15)
    return out / "manifest.csv"


@pytest.mark.numerics
@pytest.mark.parametrize("kind", KINDS)
def test_a_vit_fine_tuned_with_the_tag_looks_at_the_tag(saved, demo_like, kind, tmp_path):
    """The run a user runs (execute_run with attribution, the measure_run hook): the recipe of
    test_mechanisms.py (no augmentation, dropout 0.2, Adam 1e-3, the tag at 3x the paper's
    size) with 20 epochs, as these ViTs start from random weights. Measured at seeds 1-3 and
    812: o.o.d. AUC 0.0-0.35 (the tag reversed), attribution 1.8-26x the tag's area share
    (seed 812: 3.3x timm, 5.4x transformers, 19x open_clip); at p = 0 (seed 812): 0.5-0.9x.
    The map one patch off (the CLS token kept in the grid) still gives 1.9-6.2x here: the
    exact check of the map is test_hirescam_of_a_vit_is_its_patch_tokens_on_the_patch_grid."""
    from sm_utils.runs import RunConfig, execute_run, load_metrics

    config = RunConfig(manifest=str(demo_like), confounder="tag", p=1.0, fold=0,
                       confounder_params={"resolution": "input", "font_size": 192.0},
                       image_size=SIZE, epochs=20, batch_size=32, patience=0, augment=False,
                       drop_rate=0.2, seed=812, device="cpu", runs_dir=str(tmp_path / "runs"),
                       probe=True, attribution=True, **saved[kind])
    run_dir = execute_run(config, progress=False, cache_dir=tmp_path / "cache", n_boot=50,
                          mechanisms=M.measure_run)
    metrics = load_metrics(run_dir)
    measured = metrics["mechanisms"]
    assert metrics["test_sets"]["ood"]["auc"] < 0.5  # it took the tag: reversed, it misranks
    assert measured["attribution_layer"].endswith(".0" if kind != "timm" else ".4")
    assert 0 < measured["mask_share"] < 0.05
    assert measured["attribution_share"] > measured["mask_share"]  # above chance
    assert measured["attribution_n"] > 0 and measured["attribution_n_empty"] == 0
    assert measured["probe_layer"] == M.PENULTIMATE and 0.5 <= measured["probe_auc"] <= 1.0
