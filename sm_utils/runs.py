"""One fine-tuning run, end to end, and its self-describing run directory (docs/RUNS.md).

``execute_run(RunConfig(...))`` loads the manifest, confounds the splits (apply_prevalence),
builds the uint8 image cache, fine-tunes a model from the chosen source, scores the i.i.d.,
o.o.d. and clean test sets and writes ``runs_dir/<run_id>/``:

- ``config.json``     the resolved configuration, package versions, weights sha256, git commit
- ``history.csv``     per epoch: epoch, train_loss, val_loss, val_auc, seconds
- ``predictions.csv`` per (test_set, image): label, score (probability of class 1), ...
- ``curves.png``      training curves
- ``metrics.json``    written LAST and atomically: its presence means the run is complete.

Every file is written atomically (temporary file + rename), and a stale ``metrics.json`` is
removed before a run starts, so an interrupted run never looks complete.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from .confounders.registry import identity_params
from .confounding import NO_CONFOUNDER, TEST_SETS, ConfoundingError, run_sets
from .data import (
    PAPER_AUGMENTATION,
    Augmentation,
    ConfoundedImageDataset,
    ImageCache,
    ResidentLoader,
    make_loader,
)
from .evaluation import json_safe, summarise_test_set
from .identity import MODES, run_identity
from .io import atomic_path, atomic_write_csv, atomic_write_json, sha256_file, stable_hash
from .manifest import load_manifest
from .paths import METRICS_FILE, resolve
from .plugins import describe_plugins
from .progress import available_cpus
from .provenance import git_commit, package_versions
from .training import (
    configure_device,
    predict,
    ran_on,
    reset_head,
    resolve_device,
    train_model,
)


class RunError(ValueError):
    """A run configuration that cannot be executed as given."""


@dataclass
class RunConfig:
    """Every knob of one run (the ``parameters`` cell of notebook 03; see docs/RUNS.md)."""

    manifest: str = "data/phantom_cxr/manifest.csv"
    confounder: str = "tag"
    strength: float = 1.0
    confounder_params: dict = field(default_factory=dict)
    p: float = 0.5
    fold: int = 0
    source: str = "imagenet_lite0"
    weights: str | None = None
    arch: str | None = None
    image_size: int = 64
    resize: str = "bilinear"      # to the model input: "nearest" as the paper's Keras loader
    epochs: int = 4
    batch_size: int = 32
    lr: float = 1e-3
    optimizer: str = "adam"
    weight_decay: float = 0.0
    patience: int = 3
    augment: bool = True
    drop_rate: float = 0.5
    seed: int = 812
    mode: str = "finetune"        # or "linear_probe": only the head trains, the backbone frozen
    probe: bool = False           # after fine-tuning: encodedness probe of the model (mechanisms)
    attribution: bool = False     # and its attribution share inside the confounder's mask
    device: str = "auto"
    precision: str = "auto"       # of training: auto (bf16 on a GPU, fp32 on a CPU) | fp32 | bf16
    deterministic: bool = False   # GPU: deterministic algorithms, no cuDNN autotuning, no TF32
    num_workers: int = 0
    runs_dir: str = "runs/single"  # one-off runs; a grid passes its own

    def __post_init__(self) -> None:
        # Normalise types so that e.g. p=1 and p=1.0 give the same run id.
        for name in ("strength", "p", "lr", "weight_decay", "drop_rate"):
            setattr(self, name, float(getattr(self, name)))
        for name in ("fold", "image_size", "epochs", "batch_size", "patience", "seed",
                     "num_workers"):
            setattr(self, name, int(getattr(self, name)))
        self.augment = bool(self.augment)
        self.deterministic = bool(self.deterministic)
        self.probe, self.attribution = bool(self.probe), bool(self.attribution)
        self.manifest = str(self.manifest)
        self.runs_dir = str(self.runs_dir)
        self.weights = None if self.weights in (None, "") else str(self.weights)
        # parameters added later are written out where they differ from earlier runs' values
        self.confounder_params = identity_params(self.confounder, self.confounder_params)
        if not 0.0 <= self.p <= 1.0:
            raise RunError(f"p (prevalence) must be in [0, 1]; got {self.p}.")
        if self.batch_size < 2:
            raise RunError(f"batch_size must be at least 2 (batch norm); got {self.batch_size}.")
        if self.mode not in MODES:
            raise RunError(f"mode must be one of {list(MODES)} ('finetune': every layer trains, "
                           f"as in the paper; 'linear_probe': only the head); got {self.mode!r}.")
        from .imaging import RESIZE_METHODS

        if self.resize not in RESIZE_METHODS:
            raise RunError(f"resize must be one of {list(RESIZE_METHODS)} ('nearest': the "
                           f"paper's Keras loader); got {self.resize!r}.")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise RunError(f"unknown run parameter(s) {unknown}; valid: {sorted(names)}.")
        return cls(**values)

    def identity(self) -> dict[str, Any]:
        """The fields that determine the result (everything but where and how it runs), with
        the manifest and weights named by their content (:mod:`sm_utils.identity`)."""
        values = asdict(self)  # relative paths are under the project root, as for the run
        values["manifest"] = str(resolve(self.manifest))
        values["weights"] = None if self.weights is None else str(resolve(self.weights))
        return run_identity(values)

    @property
    def run_id(self) -> str:
        return stable_hash(self.identity())

    def run_dir(self) -> Path:
        """``runs_dir/<run_id>``; a relative runs_dir is under the project root."""
        return resolve(self.runs_dir) / self.run_id


# --- the run --------------------------------------------------------------------------------

def get_run_confounder(config: RunConfig):
    """The run's Confounder, or None for ``confounder="none"``."""
    if config.confounder == NO_CONFOUNDER:
        return None
    from .confounders import get_confounder

    return get_confounder(config.confounder, strength=config.strength, **config.confounder_params)


def run_augmentation(config: RunConfig) -> Augmentation | None:
    """The augmentation a run trains with: the paper's (Keras 2.15's ImageDataGenerator as its
    code configured it) when ``config.augment``, else none."""
    return PAPER_AUGMENTATION if config.augment else None


def split_rows(config: RunConfig, manifest, conf) -> dict[str, pd.DataFrame]:
    """train, val (confounded like train) and the test sets of the run's fold
    (:func:`sm_utils.confounding.run_sets`)."""
    try:
        return run_sets(manifest, conf, fold=config.fold, p=config.p, seed=config.seed,
                        name=config.manifest)
    except ConfoundingError as err:
        raise RunError(str(err)) from None


def plot_curves(history: pd.DataFrame, best_epoch: int, path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_auc) = plt.subplots(1, 2, figsize=(8, 3))
    ax_loss.plot(history["epoch"], history["train_loss"], marker="o", label="train")
    ax_loss.plot(history["epoch"], history["val_loss"], marker="o", label="validation")
    ax_loss.axvline(best_epoch, color="grey", linestyle=":", label="best")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax_loss.legend()
    ax_auc.plot(history["epoch"], history["val_auc"], marker="o", color="C2")
    ax_auc.set(xlabel="epoch", ylabel="AUC", title="validation AUC", ylim=(0, 1.02))
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def _describe_source(config: RunConfig) -> dict[str, Any]:
    from . import sources

    weights = None if config.weights is None else resolve(config.weights)
    return sources.describe_source(config.source, config.arch, weights)


@dataclass
class TrainedRun:
    """A run's model after fine-tuning, with what trained it (:func:`train_run`)."""

    model: Any
    prep: Any
    manifest: Any
    manifest_path: Path
    splits: dict[str, pd.DataFrame]
    cache: Any
    confounder: Any
    result: Any                 # training.TrainResult: history, best epoch, seconds
    device: torch.device
    device_settings: dict
    resident: bool
    dataset: Callable[[str, bool], ConfoundedImageDataset]
    loader: Callable[..., Any]

    @property
    def test_sets(self) -> list[str]:
        return [t for t in TEST_SETS if t in self.splits]

    def predict(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """Class probabilities and labels of the test set ``name``."""
        return predict(self.model, self.prep, self.loader(self.dataset(name, False), False),
                       self.device)


RESIDENT_SHARE = 0.25       # of a GPU's memory, shared by the runs on it, for resident images
FALLBACK_WORKERS = 4        # data-loader workers of a GPU run whose images are not resident
RUNS_PER_GPU_ENV = "SM_RUNS_PER_GPU"   # set by the grid for its workers


def data_placement(device: torch.device, n_images: int, image_size: int,
                   num_workers: int = 0) -> dict[str, Any]:
    """Where a run's images live while it trains (recorded in config.json).

    On a GPU they stay on it (:class:`ResidentLoader`) when their uint8 bytes (``n_images``:
    the training, validation and largest test set together) fit in ``RESIDENT_SHARE`` of the
    GPU's memory divided among the runs that share it (``$SM_RUNS_PER_GPU``), and no
    data-loader workers were asked for. Otherwise batches come from a DataLoader with pinned
    memory and ``num_workers`` workers (``FALLBACK_WORKERS`` when 0 was given). On the CPU:
    the DataLoader with ``num_workers``. Both loaders give the same batches.
    """
    need = int(n_images) * int(image_size) ** 2
    if device.type != "cuda":
        return {"resident": False, "num_workers": int(num_workers), "bytes": need,
                "reason": "CPU run"}
    if num_workers > 0:
        return {"resident": False, "num_workers": int(num_workers), "bytes": need,
                "reason": f"num_workers={num_workers} asked for"}
    sharing = max(1, int(os.environ.get(RUNS_PER_GPU_ENV) or 1))
    budget = RESIDENT_SHARE * torch.cuda.get_device_properties(device).total_memory / sharing
    if need <= budget:
        return {"resident": True, "num_workers": 0, "bytes": need, "budget_bytes": int(budget),
                "reason": "fits the budget"}
    workers = min(FALLBACK_WORKERS, available_cpus())
    return {"resident": False, "num_workers": workers, "bytes": need, "budget_bytes": int(budget),
            "reason": f"{need / 2**30:.2f} GiB of images exceed the budget of {budget / 2**30:.2f} "
                      f"GiB ({RESIDENT_SHARE:.0%} of the GPU / {sharing} run(s) on it)"}


@contextmanager
def train_run(config: RunConfig, *, progress: bool = True, cache_dir: str | Path | None = None,
              resident: bool | None = None, threads: int | None = None) -> Iterator[TrainedRun]:
    """Train the run's model (fine-tune it, or only its head: ``config.mode``) and yield it
    while the device settings it trained under hold (evaluate inside the ``with``). The one
    place a run's data, seeds, head and training are set up: :func:`execute_run` and
    :func:`sm_utils.mechanisms.fine_tune` both use it.

    ``resident``: keep the run's images on the training device and augment them there
    (:class:`sm_utils.data.ResidentLoader`: nothing is copied per epoch); None does so on a
    GPU. On the CPU both ways give the same batches, hence the same metrics.
    """
    from .sources import create_model

    device = resolve_device(config.device)
    manifest_path = resolve(config.manifest)
    manifest = load_manifest(manifest_path)
    conf = get_run_confounder(config)
    splits = split_rows(config, manifest, conf)
    cache = ImageCache.for_manifest(manifest, config.image_size, cache_dir, resize=config.resize)
    if conf is not None:  # e.g. ct_noise, or a filter on the stored 1024 px image
        conf = conf.memoised_under(cache.path.parent / "confounders")

    def dataset(name: str, augment: bool) -> ConfoundedImageDataset:
        return ConfoundedImageDataset(splits[name], cache, confounder=conf, seed=config.seed,
                                      augmentation=run_augmentation(config) if augment else None,
                                      root=manifest.root, resize=config.resize, progress=progress)

    largest_test = max((len(splits[t]) for t in TEST_SETS if t in splits), default=0)
    placement = data_placement(device, len(splits["train"]) + len(splits["val"]) + largest_test,
                               config.image_size, config.num_workers)
    if resident is not None:  # the caller's choice (tests, benchmarks)
        placement.update(resident=bool(resident), reason="asked for")
    resident = placement["resident"]

    def loader(data: ConfoundedImageDataset, shuffle: bool, drop_last: bool = False):
        if resident:
            return ResidentLoader(data, batch_size=config.batch_size, shuffle=shuffle,
                                  seed=config.seed, device=device, drop_last=drop_last)
        return make_loader(data, batch_size=config.batch_size, shuffle=shuffle, seed=config.seed,
                           num_workers=placement["num_workers"],
                           pin_memory=device.type == "cuda", drop_last=drop_last)

    train_set = dataset("train", config.augment)
    train_loader = loader(train_set, True, drop_last=len(train_set) % config.batch_size == 1)
    val_loader = loader(dataset("val", False), False)

    if device.type == "cuda":  # this run's own peak (a warm kernel ran other cells before)
        torch.cuda.reset_peak_memory_stats(device)
    with configure_device(device, threads, deterministic=config.deterministic,
                          precision=config.precision) as device_settings:
        torch.manual_seed(config.seed)  # head initialisation, dropout
        np.random.seed(config.seed % 2**32)
        weights = None if config.weights is None else resolve(config.weights)
        model, prep = create_model(config.source, arch=config.arch, weights=weights,
                                   num_classes=2, drop_rate=config.drop_rate,
                                   image_size=config.image_size)
        reset_head(model)  # the paper's Keras Dense head: Glorot uniform, zero bias
        result = train_model(
            model, prep, train_loader, val_loader, device=device, epochs=config.epochs,
            lr=config.lr, optimizer=config.optimizer, weight_decay=config.weight_decay,
            patience=config.patience, progress=progress, precision=config.precision,
            frozen=config.mode == "linear_probe",
        )
        yield TrainedRun(model=model, prep=prep, manifest=manifest, manifest_path=manifest_path,
                         splits=splits, cache=cache, confounder=conf, result=result,
                         device=device, device_settings={**device_settings,
                                                         "data_placement": placement},
                         resident=bool(resident), dataset=dataset, loader=loader)


def gpu_peak(device: torch.device) -> dict[str, int]:
    """The GPU memory a run reserved at its peak (training, evaluation, mechanisms), as the
    grid's memory check predicts it; nothing on the CPU."""
    if device.type != "cuda":
        return {}
    return {"peak_memory_bytes": int(torch.cuda.max_memory_reserved(device))}


MechanismsHook = Callable[[TrainedRun, RunConfig], dict[str, Any]]


def execute_run(config: RunConfig, *, progress: bool = True, cache_dir: str | Path | None = None,
                n_boot: int = 1000, resident: bool | None = None,
                mechanisms: MechanismsHook | None = None) -> Path:
    """Do the whole run and return its directory (``runs_dir/<run_id>``); ``resident`` as in
    :func:`train_run`.

    ``mechanisms``: what measures the fine-tuned model when ``config.probe`` or
    ``config.attribution`` asks for it, called inside the run with its model and data
    (:func:`sm_utils.mechanisms.measure_run`; runs sit below the mechanisms, so the caller
    hands it in); its columns go to ``metrics.json["mechanisms"]``.
    """
    if (config.probe or config.attribution) and mechanisms is None:
        raise RunError("probe/attribution ask for the run's mechanisms, but execute_run was not "
                       "given the hook that measures them: pass "
                       "mechanisms=sm_utils.mechanisms.measure_run (notebook 03 does).")
    started = time.perf_counter()
    run_dir = config.run_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / METRICS_FILE).unlink(missing_ok=True)  # a rerun is incomplete until it ends

    with train_run(config, progress=progress, cache_dir=cache_dir, resident=resident) as run:
        eval_started = time.perf_counter()
        frames = []
        for name in run.test_sets:
            probs, labels = run.predict(name)
            rows = run.splits[name].reset_index(drop=True)
            frame = pd.DataFrame({"test_set": name, "image_id": rows["image_id"].astype(str),
                                  "patient_id": rows["patient_id"].astype(str).to_numpy(),
                                  "label": labels, "score": probs[:, 1], "prob_0": probs[:, 0],
                                  "prob_1": probs[:, 1], "confounded": rows["confounded"]})
            attributes = [c for c in run.manifest.attributes if c in rows]
            frames.append(pd.concat([frame, rows[attributes].reset_index(drop=True)], axis=1))
        eval_seconds = time.perf_counter() - eval_started
        measured = mechanisms(run, config) if config.probe or config.attribution else None
    predictions = pd.concat(frames, ignore_index=True)
    test_metrics = {
        name: summarise_test_set(part.drop(columns=["test_set"]), n_boot=n_boot, seed=config.seed)
        for name, part in predictions.groupby("test_set", sort=False)
    }

    resolved = {
        "run_id": config.run_id,
        "config": asdict(config),
        "identity": config.identity(),
        "source": _describe_source(config),
        "preprocessing": run.prep.describe() if hasattr(run.prep, "describe") else repr(run.prep),
        "confounder": run.confounder.spec() if run.confounder is not None else {"name": NO_CONFOUNDER},
        "augmentation": asdict(run_augmentation(config)) if config.augment else None,
        "manifest": {"path": str(run.manifest_path), "sha256": sha256_file(run.manifest_path),
                     "meta": run.manifest.meta},
        "image_cache": run.cache.path.name,
        "split_sizes": {name: {"n": len(rows), "n_pos": int(rows["label"].sum()),
                               "n_confounded": int(rows["confounded"].sum())}
                        for name, rows in run.splits.items()},
        "device": {**run.device_settings, "resident_data": run.resident},
        "versions": package_versions(),
        "git": git_commit(),
        "platform": platform.platform(),
        # every plugin loaded: name, how found, file or distribution, version, sha256, names
        "plugins": describe_plugins(),
    }
    atomic_write_json(run_dir / "config.json", json_safe(resolved))
    atomic_write_csv(run_dir / "history.csv", run.result.history)
    atomic_write_csv(run_dir / "predictions.csv", predictions)
    plot_curves(run.result.history, run.result.best_epoch, run_dir / "curves.png",
                title=f"{config.source}{' (linear probe)' if config.mode == 'linear_probe' else ''}"
                      f" | {config.confounder} p={config.p:g} | fold {config.fold}")
    metrics = {
        "run_id": config.run_id,
        "config": asdict(config),
        "test_sets": test_metrics,
        "best_epoch": run.result.best_epoch,
        "epochs_run": run.result.epochs_run,
        "train_seconds": run.result.train_seconds,
        "eval_seconds": eval_seconds,
        "total_seconds": time.perf_counter() - started,
        "ran_on": {**ran_on(run.device_settings), **gpu_peak(run.device)},
    }
    if measured is not None:
        metrics["mechanisms"] = measured
    atomic_write_json(run_dir / METRICS_FILE, json_safe(metrics))  # last: marks completion
    return run_dir


def load_metrics(run_dir: str | Path) -> dict[str, Any]:
    import json

    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise RunError(f"no {METRICS_FILE} in {run_dir}: the run is incomplete or never ran.")
    return json.loads(path.read_text())
