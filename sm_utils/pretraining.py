"""Pretrain a source offline: the radiology-domain stand-in for RadImageNet, or your own.

The paper compares ImageNet with RadImageNet, whose weights cannot be bundled or downloaded
here. The offline demo therefore makes its own radiology-domain source: ``tf_efficientnet_lite0``
trained on a multi-class task of synthetic radiology images from :mod:`sm_utils.phantoms`
(modality x display window x finding):

====================  =================================================================
class                 images
====================  =================================================================
cxr/normal            frontal chest radiograph, no finding
cxr/opacity           chest radiograph with an atelectasis-like lower-lobe opacity
ct_lung/benign        axial CT, lung window, small smooth nodule
ct_lung/malignant     axial CT, lung window, large lobulated spiculated nodule
ct_soft/benign        the same CT slices in a soft-tissue (mediastinal) window
ct_soft/malignant
====================  =================================================================

Like RadImageNet (CT, MRI and ultrasound of many anatomies and pathologies), it teaches
modality, anatomy and pathology. It is NOT RadImageNet: it has never seen a real medical
image, and its CXR classes resemble the demo's downstream CXR task (other patients: the
pretraining phantoms use their own seeds). Its provenance is written into the weights
file's metadata and a JSON sidecar, and is recorded by every run that uses it.

Initialisation: from scratch by default (``init="random"``), so that the radiology source owes
nothing to ImageNet and the demo contrasts two different pretraining domains, as the paper
does; ``init="imagenet_lite0"`` gives ImageNet-then-radiology instead.

:func:`images_from_manifest` lets researchers pretrain on a source dataset of their own: any
manifest with a class column.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from .data import PAPER_AUGMENTATION, ConfoundedImageDataset, ImageCache, make_loader
from .io import atomic_write_json, sha256_file
from .manifest import load_manifest
from .phantoms import (
    LUNG_WINDOW,
    render_ct_hu,
    render_cxr,
    sample_patient,
    window_to_uint8,
)
from .training import configure_device, predict, reset_head, resolve_device, train_model

ARCH = "tf_efficientnet_lite0"
DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / "data" / "sources" / \
    "radiology_phantom_lite0.safetensors"
# Soft-tissue (mediastinal) window: centre 40 HU, width 400 HU.
SOFT_TISSUE_WINDOW = (40.0, 400.0)
PHANTOM_CLASSES = ("cxr/normal", "cxr/opacity", "ct_lung/benign", "ct_lung/malignant",
                   "ct_soft/benign", "ct_soft/malignant")
INITS = ("random", "imagenet_lite0")
RENDER_SIZE = 128
# Pretraining phantoms use seeds far from the datasets' (0, 1, 2, ...): other patients.
SEED_OFFSET = 1_000_003


class PretrainingError(ValueError):
    """Pretraining settings or data that cannot be used as given."""


@dataclass(frozen=True)
class PretrainConfig:
    """Everything that determines a pretrained source (recorded in its provenance)."""

    image_size: int = 64
    n_per_class: int = 400
    difficulty: float = 0.3
    epochs: int = 8
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-5
    patience: int = 3
    val_fraction: float = 0.15
    init: str = "random"
    augment: bool = True
    seed: int = 2024

    def __post_init__(self) -> None:
        if self.init not in INITS:
            raise PretrainingError(f"init must be one of {list(INITS)}; got {self.init!r}.")
        if self.n_per_class < 2:
            raise PretrainingError(f"n_per_class must be at least 2; got {self.n_per_class}.")
        if not 0 < self.val_fraction < 1:
            raise PretrainingError(f"val_fraction must be in (0, 1); got {self.val_fraction}.")


def render_phantom_class(name: str, index: int, *, size: int, difficulty: float,
                         seed: int) -> np.ndarray:
    """One uint8 image of class ``name`` (see PHANTOM_CLASSES), a pure function of its inputs."""
    if name not in PHANTOM_CLASSES:
        raise PretrainingError(f"unknown class {name!r}; valid: {', '.join(PHANTOM_CLASSES)}.")
    kind, finding = name.split("/")
    class_id = PHANTOM_CLASSES.index(name)
    # Each image is its own patient; benign/malignant CT pairs share no patient either.
    patient = sample_patient(seed + SEED_OFFSET, class_id * 1_000_000 + index)
    rng = np.random.default_rng(np.random.SeedSequence([seed, SEED_OFFSET, class_id, index]))
    positive = finding in ("opacity", "malignant")
    # Rendered at >= 128 px and resized, like the demo's fine-tuning data (rendered at 128 px,
    # cached at the training size): the same look, and less pixel noise than a 64 px render.
    render_size = max(size, RENDER_SIZE)
    if kind == "cxr":
        image = render_cxr(patient, size=render_size, finding=positive, difficulty=difficulty,
                           rng=rng)
    else:
        hu = render_ct_hu(patient, size=render_size, finding=positive, difficulty=difficulty,
                          rng=rng)
        image = window_to_uint8(hu, LUNG_WINDOW if kind == "ct_lung" else SOFT_TISSUE_WINDOW)
    if render_size != size:
        image = np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR,
                                                         reducing_gap=None))
    return image


def build_phantom_pretraining_set(
    n_per_class: int, *, image_size: int = 64, difficulty: float = 0.3, seed: int = 2024,
    classes: tuple[str, ...] = PHANTOM_CLASSES,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(images uint8 (N, S, S), labels (N,), class names), ``n_per_class`` images each."""
    images, labels = [], []
    for label, name in enumerate(classes):
        for index in range(n_per_class):
            images.append(render_phantom_class(name, index, size=image_size,
                                               difficulty=difficulty, seed=seed))
            labels.append(label)
    return np.stack(images), np.array(labels, dtype=np.int64), list(classes)


def images_from_manifest(
    manifest_csv: str | Path, label_column: str, image_size: int,
    cache_dir: str | Path | None = None,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """A source dataset of your own: every image of a manifest, labelled by ``label_column``.

    The manifest's binary ``label`` is ignored; ``label_column`` (an attribute such as
    ``body_part`` or ``finding``) gives the classes, sorted by name.
    """
    manifest = load_manifest(manifest_csv)
    if label_column not in manifest.table.columns:
        raise PretrainingError(
            f"{manifest_csv} has no column {label_column!r}; its columns are "
            f"{list(manifest.table.columns)}. Add a class column or name another one."
        )
    cache = ImageCache.for_manifest(manifest, image_size, cache_dir)
    values = manifest.table[label_column].astype(str)
    classes = sorted(values.unique())
    if len(classes) < 2:
        raise PretrainingError(f"column {label_column!r} holds a single class {classes}; "
                               "pretraining needs at least two.")
    labels = values.map({c: i for i, c in enumerate(classes)}).to_numpy(np.int64)
    return np.asarray(cache.array), labels, classes


def _stratified_split(labels: np.ndarray, val_fraction: float, seed: int):
    rng = np.random.default_rng(np.random.SeedSequence([seed, 17]))
    val = np.zeros(len(labels), bool)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        n_val = max(1, round(val_fraction * len(members)))
        val[rng.permutation(members)[:n_val]] = True
    return np.flatnonzero(~val), np.flatnonzero(val)


@dataclass
class PretrainResult:
    model: torch.nn.Module
    history: pd.DataFrame
    best_epoch: int
    val_accuracy: float
    per_class_accuracy: dict[str, float]
    confusion: pd.DataFrame
    seconds: float
    device: dict


def pretrain(
    images: np.ndarray, labels: np.ndarray, classes: list[str], config: PretrainConfig, *,
    device: str = "auto", num_workers: int = 0, progress: bool = True,
) -> PretrainResult:
    """Train ``tf_efficientnet_lite0`` on a multi-class task; keep the best val-loss epoch."""
    from .sources import LITE, create_model

    if len(images) != len(labels):
        raise PretrainingError(f"{len(images)} images but {len(labels)} labels.")
    train_idx, val_idx = _stratified_split(labels, config.val_fraction, config.seed)
    ids = [f"img{i:06d}" for i in range(len(images))]
    cache = ImageCache.in_memory(images, ids)
    rows = pd.DataFrame({"image_id": ids, "label": labels})
    augmentation = PAPER_AUGMENTATION if config.augment else None
    train_set = ConfoundedImageDataset(rows.iloc[train_idx], cache, seed=config.seed,
                                       augmentation=augmentation)
    val_set = ConfoundedImageDataset(rows.iloc[val_idx], cache, seed=config.seed)
    torch_device = resolve_device(device)
    args = {"batch_size": config.batch_size, "seed": config.seed, "num_workers": num_workers,
            "pin_memory": torch_device.type == "cuda"}
    train_loader = make_loader(train_set, shuffle=True,
                               drop_last=len(train_set) % config.batch_size == 1, **args)
    val_loader = make_loader(val_set, shuffle=False, **args)

    started = time.perf_counter()
    with configure_device(torch_device) as device_record:
        torch.manual_seed(config.seed)
        model, _ = create_model(config.init, arch=ARCH, num_classes=len(classes),
                                drop_rate=0.2, image_size=config.image_size)
        prep = LITE  # one recipe whatever the init; it is saved with the weights
        reset_head(model)
        result = train_model(model, prep, train_loader, val_loader, device=torch_device,
                             epochs=config.epochs, lr=config.lr, optimizer="adamw",
                             weight_decay=config.weight_decay, patience=config.patience,
                             progress=progress)
        probs, val_labels = predict(model, prep, val_loader, torch_device)
    predicted = probs.argmax(axis=1)
    confusion = pd.crosstab(pd.Categorical([classes[i] for i in val_labels], categories=classes),
                            pd.Categorical([classes[i] for i in predicted], categories=classes),
                            rownames=["true"], colnames=["predicted"], dropna=False)
    per_class = {name: float((predicted[val_labels == i] == i).mean())
                 for i, name in enumerate(classes) if (val_labels == i).any()}
    return PretrainResult(model=model.cpu(), history=result.history, best_epoch=result.best_epoch,
                          val_accuracy=float((predicted == val_labels).mean()),
                          per_class_accuracy=per_class, confusion=confusion,
                          seconds=time.perf_counter() - started, device=device_record)


def provenance_text(config: PretrainConfig, classes: list[str], dataset: str) -> str:
    start = "from scratch" if config.init == "random" else "from ImageNet (imagenet_lite0)"
    return (f"{ARCH} pretrained {start} on {dataset}: {len(classes)} classes "
            f"({', '.join(classes)}), {config.image_size} px, made offline by "
            "notebooks/00_source_pretraining.ipynb (sm_utils.pretraining). It is NOT "
            "RadImageNet and has never seen a real medical image."
            if dataset == "synthetic radiology phantoms" else
            f"{ARCH} pretrained {start} on {dataset}: {len(classes)} classes, "
            f"{config.image_size} px, by sm_utils.pretraining.")


def save_source(
    result: PretrainResult, config: PretrainConfig, classes: list[str],
    path: str | Path = DEFAULT_OUTPUT, *, dataset: str = "synthetic radiology phantoms",
    extra: dict | None = None,
) -> tuple[Path, Path]:
    """Write the weights (safetensors, provenance in its metadata) and a JSON sidecar.

    The file holds the whole state dict (the pretraining classifier too; it is skipped when
    the source is loaded for fine-tuning) and the preprocessing it was trained with.
    """
    from .provenance import git_commit, package_versions
    from .sources import LITE
    from .weights import save_state_dict

    path = Path(path)
    provenance = provenance_text(config, classes, dataset)
    record = {
        "provenance": provenance,
        "arch": ARCH,
        "dataset": dataset,
        "classes": classes,
        "config": asdict(config),
        "preprocessing": LITE.describe(),
        "best_epoch": result.best_epoch,
        "val_accuracy": result.val_accuracy,
        "per_class_accuracy": result.per_class_accuracy,
        "history": result.history.to_dict(orient="records"),
        "train_seconds": result.seconds,
        "device": result.device,
        "versions": package_versions(),
        "git": git_commit(),
        **(extra or {}),
    }
    save_state_dict(path, result.model.state_dict(), metadata={
        "provenance": provenance, "preprocessing": LITE.describe(), "arch": ARCH,
        "classes": classes, "config": asdict(config)})
    record["sha256"] = sha256_file(path)
    sidecar = path.with_suffix(".json")
    atomic_write_json(sidecar, record)
    return path, sidecar


def read_provenance(path: str | Path = DEFAULT_OUTPUT) -> dict:
    """The JSON sidecar of a pretrained source file."""
    sidecar = Path(path).with_suffix(".json")
    if not sidecar.is_file():
        raise PretrainingError(f"no provenance sidecar {sidecar}; re-create the source with "
                               "notebooks/00_source_pretraining.ipynb.")
    return json.loads(sidecar.read_text())
