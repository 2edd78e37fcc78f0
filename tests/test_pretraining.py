import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from sm_utils.manifest import Manifest, save_manifest
from sm_utils.pretraining import (
    PHANTOM_CLASSES,
    PretrainConfig,
    PretrainingError,
    build_phantom_pretraining_set,
    images_from_manifest,
    pretrain,
    read_provenance,
    render_phantom_class,
    save_source,
)
from sm_utils.sources import create_model, describe_source


def test_phantom_classes_are_deterministic_and_distinct():
    images, labels, classes = build_phantom_pretraining_set(3, image_size=32, seed=1)
    assert classes == list(PHANTOM_CLASSES) and len(classes) == 6
    assert images.shape == (18, 32, 32) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [3] * 6
    again, _, _ = build_phantom_pretraining_set(3, image_size=32, seed=1)
    np.testing.assert_array_equal(images, again)
    other, _, _ = build_phantom_pretraining_set(3, image_size=32, seed=2)
    assert not np.array_equal(images, other)
    # The two CT windows show the same slice differently: soft tissue is darker in the lungs.
    lung = render_phantom_class("ct_lung/benign", 0, size=32, difficulty=0.3, seed=1)
    soft = render_phantom_class("ct_soft/benign", 0, size=32, difficulty=0.3, seed=1)
    assert soft.mean() < lung.mean() - 20
    with pytest.raises(PretrainingError, match="valid"):
        render_phantom_class("mri/brain", 0, size=32, difficulty=0.3, seed=1)


@pytest.mark.numerics
def test_pretrain_save_and_load_as_the_radiology_source(tmp_path):
    images, labels, classes = build_phantom_pretraining_set(4, image_size=32, seed=0)
    config = PretrainConfig(image_size=32, n_per_class=4, epochs=1, batch_size=8, val_fraction=0.25)
    result = pretrain(images, labels, classes, config, device="cpu", progress=False)
    assert result.history["epoch"].tolist() == [1]
    assert result.confusion.shape == (6, 6) and result.confusion.to_numpy().sum() == 6
    assert 0.0 <= result.val_accuracy <= 1.0

    path, sidecar = save_source(result, config, classes, tmp_path / "rp.safetensors")
    record = json.loads(sidecar.read_text())
    assert record["classes"] == classes and record["config"]["init"] == "random"
    assert "NOT RadImageNet" in record["provenance"]
    assert record == read_provenance(path)
    with safe_open(str(path), framework="pt") as fh:
        assert "NOT RadImageNet" in fh.metadata()["provenance"]

    model, prep = create_model("radiology_phantom", weights=path, num_classes=2)
    saved = result.model.state_dict()
    loaded = model.state_dict()
    assert torch.equal(loaded["conv_stem.weight"], saved["conv_stem.weight"])
    assert torch.equal(loaded["blocks.6.0.conv_pwl.weight"], saved["blocks.6.0.conv_pwl.weight"])
    assert loaded["classifier.weight"].shape == (2, 1280)  # a fresh 2-way head
    assert prep.describe()["name"] == "efficientnet_lite"
    assert describe_source("radiology_phantom", weights=path)["weights_sha256"] == record["sha256"]


@pytest.mark.numerics
def test_pretraining_is_reproducible_on_cpu():
    images, labels, classes = build_phantom_pretraining_set(3, image_size=32, seed=0)
    config = PretrainConfig(image_size=32, n_per_class=3, epochs=1, batch_size=6, val_fraction=0.34)
    first = pretrain(images, labels, classes, config, device="cpu", progress=False)
    second = pretrain(images, labels, classes, config, device="cpu", progress=False)
    columns = ["train_loss", "val_loss"]
    assert first.history[columns].equals(second.history[columns])


def test_own_source_dataset_from_a_manifest(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        rows.append({"image_id": str(i), "path": f"{i}.png", "label": 0, "patient_id": str(i),
                     "body_part": ["knee", "brain", "chest"][i % 3]})
    csv = save_manifest(Manifest(pd.DataFrame(rows), tmp_path), tmp_path / "manifest.csv")
    images, labels, classes = images_from_manifest(csv, "body_part", 32, tmp_path / "cache")
    assert classes == ["brain", "chest", "knee"]
    assert labels.tolist() == [2, 0, 1, 2, 0, 1] and images.shape == (6, 32, 32)
    with pytest.raises(PretrainingError, match="no column 'modality'"):
        images_from_manifest(csv, "modality", 32, tmp_path / "cache")


def test_bad_settings():
    with pytest.raises(PretrainingError, match="init"):
        PretrainConfig(init="radimagenet")


@pytest.mark.numerics
def test_notebook_00_runs_headless_with_small_parameters(tmp_path):
    import papermill

    from sm_utils.paths import project_root

    out = tmp_path / "tiny_source.safetensors"
    papermill.execute_notebook(
        str(project_root() / "notebooks" / "00_source_pretraining.ipynb"),
        str(tmp_path / "out.ipynb"), kernel_name="python3", progress_bar=False,
        parameters={"out": str(out), "image_size": 32, "n_per_class": 3, "epochs": 1,
                    "batch_size": 6, "seed": 5, "device": "cpu"})
    record = read_provenance(out)
    assert record["config"]["n_per_class"] == 3 and record["config"]["seed"] == 5
    model, _ = create_model("radiology_phantom", weights=out)
    assert model.classifier.out_features == 2
