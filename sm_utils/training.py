"""Full fine-tuning as in the paper: every layer trained, cross-entropy on a 2-way softmax,
Adam (or AdamW), early stopping on validation loss and the best-validation-loss checkpoint
restored at the end. Or linear probing (``mode="linear_probe"``, not in the paper): the same
loop training only the classification head on a frozen backbone.

On a GPU: training under bf16 autocast (``precision="auto"``; ``"fp32"`` to train in full
precision) and channels_last memory format; ``deterministic=True`` trades speed for repeatable
runs (deterministic algorithms, no cuDNN autotuning, no TF32). On a CPU: deterministic
algorithms and a fixed number of threads, so a run repeated on the same machine reproduces
its metrics exactly (see :func:`configure_device`). Scoring (:func:`predict`: the validation
loss that picks the checkpoint, the test scores) is always true fp32 (no autocast, no TF32),
on every device.

Batches arrive as uint8 tensors (N, 1, H, W) and go to the device as uint8 (4x less to copy);
the source's ``prep`` turns them into the float input its weights expect, on the device.
"""

from __future__ import annotations

import contextlib
import copy
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score
from torch import nn
from tqdm import tqdm

from . import numerics
from .evaluation import binary_auc

OPTIMIZERS = ("adam", "adamw")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")  # of training; auto: bf16 autocast on a GPU, fp32 on a CPU
THREADS_ENV = "SM_NUM_THREADS"
# Seconds between progress-bar updates on a terminal (notebooks and logs get fewer lines).
PROGRESS_INTERVAL_S = 1.0


def _bar_off(progress: bool) -> bool | None:
    """tqdm's ``disable``: no bar when progress is off; otherwise only on a terminal (or as
    ``$SM_PROGRESS`` says), so notebooks and logs get the per-epoch lines without bar debris."""
    from .progress import bars_disabled

    return True if not progress else bars_disabled()


class TrainingError(ValueError):
    """Training settings that cannot be used as given."""


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cuda`` without a GPU is an error."""
    if device not in DEVICES:
        raise TrainingError(f"device must be one of {list(DEVICES)}; got {device!r}.")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise TrainingError("device='cuda' was asked for but no CUDA GPU is visible; use 'cpu' "
                            "or 'auto'.")
    return torch.device(device)


def cpu_threads() -> int:
    """Threads for CPU training: ``$SM_NUM_THREADS``, else ``$OMP_NUM_THREADS``, else 1.

    Results can depend on the thread count (the order of float sums), so it is fixed and
    recorded in config.json rather than left to the machine.
    """
    name = THREADS_ENV if os.environ.get(THREADS_ENV) else "OMP_NUM_THREADS"
    value = os.environ.get(name) or "1"
    try:
        threads = int(value)
    except ValueError:
        threads = 0
    if threads < 1:
        raise TrainingError(f"{name} must be a positive integer; got {value!r}.")
    return threads


def training_precision(device: torch.device, precision: str = "auto") -> str:
    """``"bf16"`` (autocast) or ``"fp32"``: what training runs in on ``device``."""
    if precision not in PRECISIONS:
        raise TrainingError(f"precision must be one of {list(PRECISIONS)}; got {precision!r}.")
    if precision == "bf16" and device.type != "cuda":
        raise TrainingError("precision='bf16' (autocast) is for GPUs; on the CPU use 'auto' or "
                            "'fp32'.")
    return "bf16" if device.type == "cuda" and precision != "fp32" else "fp32"


@contextlib.contextmanager
def configure_device(device: torch.device, threads: int | None = None, *,
                     deterministic: bool = False, precision: str = "auto") -> Iterator[dict]:
    """Set up the process for training on ``device``; restore the previous settings after.

    CPU: ``torch.use_deterministic_algorithms(True)`` and a fixed thread count, always. GPU:
    cuDNN autotuning and TF32 for training (speed over bit-exactness; :func:`predict` turns
    TF32 off while it scores), or with ``deterministic`` none of them and deterministic
    algorithms (cuBLAS gets ``CUBLAS_WORKSPACE_CONFIG``, which acts
    before its first use in the process). Yields a record of the settings, with the training
    and scoring precision and the CPU numerics in effect (:mod:`sm_utils.numerics`; a
    warning where a library loaded before ``sm_utils`` escaped pinning).
    """
    numerics.warn_if_unpinned()
    trained_in = training_precision(device, precision)
    previous = (torch.are_deterministic_algorithms_enabled(), torch.get_num_threads(),
                torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32,
                torch.backends.cudnn.allow_tf32)
    if device.type == "cpu":
        threads = cpu_threads() if threads is None else int(threads)
        torch.use_deterministic_algorithms(True)
        torch.set_num_threads(threads)
        record = {"device": "cpu", "threads": threads, "deterministic": True}
    else:
        if deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(bool(deterministic))
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cuda.matmul.allow_tf32 = not deterministic
        torch.backends.cudnn.allow_tf32 = not deterministic
        record = {"device": str(device), "gpu": torch.cuda.get_device_name(device),
                  "deterministic": bool(deterministic), "cudnn_benchmark": not deterministic,
                  "tf32": not deterministic, "channels_last": True}
    record.update(training_precision=trained_in, scoring_precision="fp32",
                  numerics=numerics.describe())
    try:
        yield record
    finally:
        torch.use_deterministic_algorithms(previous[0])
        torch.set_num_threads(previous[1])
        torch.backends.cudnn.benchmark = previous[2]
        torch.backends.cuda.matmul.allow_tf32 = previous[3]
        torch.backends.cudnn.allow_tf32 = previous[4]


def classifier(model: nn.Module) -> nn.Linear:
    """The model's classification head: ``get_classifier()`` (timm, the foundation sources)
    when it is a linear layer, else its last linear layer (the Keras ResNet50's ``fc``)."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(head, nn.Linear):
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise TrainingError(f"{type(model).__name__} has no linear classification head.")
        head = linears[-1]
    return head


def reset_head(model: nn.Module) -> nn.Linear:
    """Initialise the classification head as Keras' Dense does: Glorot uniform, zero bias.

    The paper's head is a Keras ``Dense(2, activation="softmax")``. timm's EfficientNet init
    scales the head by 1/sqrt(fan_out), i.e. 1/sqrt(2) for two classes, which starts training
    with logits of about +-20 and losses of 5-10; Glorot keeps the initial logits near 0.
    Uses torch's global RNG (seed it first).
    """
    head = classifier(model)
    nn.init.xavier_uniform_(head.weight)
    if head.bias is not None:
        nn.init.zeros_(head.bias)
    return head


def freeze_backbone(model: nn.Module) -> nn.Linear:
    """Linear probing: only the classification head trains. Every other parameter stops
    requiring gradients (so none is computed through the backbone, and the optimizer gets only
    the head's); :func:`train_model` with ``frozen=True`` also keeps the backbone in eval mode (:func:`set_training`),
    so its batch-norm statistics stay as loaded and its features are deterministic."""
    head = classifier(model)
    trained = {id(p) for p in head.parameters()}
    for parameter in model.parameters():
        parameter.requires_grad_(id(parameter) in trained)
    return head


def set_training(model: nn.Module, frozen: bool = False) -> nn.Module:
    """``model.train()``; with ``frozen`` (linear probing) every top-level part but the head and
    the dropout before it back in eval mode (timm applies its head dropout from the root's own
    ``training`` flag, which stays on)."""
    model.train()
    if frozen:
        head = classifier(model)
        for child in model.children():
            if not isinstance(child, nn.Dropout) and not any(m is head for m in child.modules()):
                child.eval()
    return model


def make_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float = 0.0):
    if name not in OPTIMIZERS:
        raise TrainingError(f"optimizer must be one of {list(OPTIMIZERS)}; got {name!r}.")
    if not lr > 0:
        raise TrainingError(f"learning rate must be positive; got {lr!r}.")
    cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
    # a frozen backbone's parameters are left out (linear probing: the head's alone)
    return cls([p for p in model.parameters() if p.requires_grad], lr=lr,
               weight_decay=weight_decay)


def ran_on(settings: dict) -> dict:
    """Where and in what precision a run trained, from :func:`configure_device`'s record (as
    results.csv's ``device`` and ``precision`` columns): device "cpu" or "cuda"; precision
    "bf16" (autocast), "tf32" (fp32 with TF32 matmuls and convolutions, a GPU's default) or
    "fp32"; "unknown" where an older record lacks it."""
    device = str(settings.get("device", "unknown")).split(":")[0]
    precision = settings.get("training_precision", "fp32" if device == "cpu" else "unknown")
    if precision == "fp32" and settings.get("tf32"):
        precision = "tf32"
    return {"device": device, "gpu": settings.get("gpu"), "precision": precision,
            "deterministic": settings.get("deterministic")}


def _autocast(device: torch.device, precision: str = "auto"):
    """Training's autocast: bf16 on a GPU unless ``precision="fp32"``; never in scoring."""
    if training_precision(device, precision) == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _to_input(images: torch.Tensor, prep: Callable, device: torch.device) -> torch.Tensor:
    images = images.to(device, non_blocking=True)
    x = prep(images)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


@contextlib.contextmanager
def _without_tf32() -> Iterator[None]:
    """TF32 off for CUDA matmuls and cuDNN convolutions (true fp32), restored after: training
    may use TF32 on a GPU (:func:`configure_device`), scoring never does."""
    previous = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


@torch.no_grad()
def predict(
    model: nn.Module, prep: Callable, loader, device: torch.device, *, progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """(softmax probabilities (N, 2), labels (N,)) of the loader's images, in loader order.

    Always in fp32, whatever precision training used (no autocast, TF32 off): these scores
    pick the best checkpoint (validation loss) and are the test results (AUCs, ties).
    """
    model.eval()
    probs, labels = [], []
    with _without_tf32():
        for images, y in tqdm(loader, desc="predict", leave=False, disable=_bar_off(progress)):
            logits = model(_to_input(images, prep, device))
            probs.append(torch.softmax(logits.float(), dim=1).cpu())
            labels.append(y)
    return torch.cat(probs).numpy().astype(np.float64), torch.cat(labels).cpu().numpy()


def _val_metrics(probs: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(mean cross-entropy, AUC) from softmax probabilities.

    Two classes: binary AUC of class 1. More (source pretraining): one-vs-rest macro AUC.
    """
    if not np.isfinite(probs).all():  # non-finite outputs (a diverged model): no loss, no AUC
        return float("nan"), float("nan")
    p = np.clip(probs[np.arange(len(labels)), labels], 1e-12, 1.0)
    loss = float(-np.log(p).mean())
    if probs.shape[1] == 2:
        return loss, binary_auc(labels, probs[:, 1])
    if len(np.unique(labels)) < probs.shape[1]:
        return loss, float("nan")
    return loss, float(roc_auc_score(labels, probs, multi_class="ovr"))


@dataclass
class TrainResult:
    history: pd.DataFrame
    best_epoch: int
    epochs_run: int
    train_seconds: float
    best_val_loss: float
    settings: dict = field(default_factory=dict)


def train_model(
    model: nn.Module, prep: Callable, train_loader, val_loader, *, device: torch.device,
    epochs: int, lr: float, optimizer: str = "adam", weight_decay: float = 0.0,
    patience: int = 3, progress: bool = True, precision: str = "auto", frozen: bool = False,
) -> TrainResult:
    """Fine-tune ``model`` in place; on return it holds the best-validation-loss weights.

    Early stopping: training stops after ``patience`` epochs without a lower validation
    loss (``patience <= 0`` never stops early). Epochs are numbered from 1.

    ``precision``: of training (:func:`training_precision`); validation is always fp32.
    ``frozen``: linear probing: the backbone is frozen (:func:`freeze_backbone`) and stays in
    eval mode while the head trains.

    A NaN validation loss (the model's outputs are not finite: it diverged) is recorded in the
    history but never counts as the best; it is an epoch without improvement. If no epoch
    has a finite validation loss there is no checkpoint to restore and a TrainingError says so.
    """
    if epochs < 1:
        raise TrainingError(f"epochs must be at least 1; got {epochs}.")
    if len(val_loader.dataset) == 0 or len(train_loader.dataset) == 0:
        raise TrainingError(
            f"empty split: {len(train_loader.dataset)} training and {len(val_loader.dataset)} "
            "validation images. Check the manifest's fold and the prevalence selection."
        )
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    if hasattr(prep, "to"):
        prep.to(device)
    if frozen:
        freeze_backbone(model)
    opt = make_optimizer(model, optimizer, lr, weight_decay)
    loss_fn = nn.CrossEntropyLoss()

    history, best_loss, best_epoch, best_state, stale = [], float("inf"), 0, None, 0
    started = time.perf_counter()
    for epoch in range(1, epochs + 1):
        tic = time.perf_counter()
        if hasattr(train_loader.dataset, "set_epoch"):
            train_loader.dataset.set_epoch(epoch)  # a new augmentation draw per epoch
        set_training(model, frozen)
        total, count = 0.0, 0
        bar = tqdm(train_loader, desc=f"epoch {epoch}/{epochs}", leave=False,
                   disable=_bar_off(progress),
                   mininterval=PROGRESS_INTERVAL_S if sys.stderr.isatty() else 30.0)
        for images, labels in bar:
            labels = labels.to(device, non_blocking=True)
            with _autocast(device, precision):
                logits = model(_to_input(images, prep, device))
                loss = loss_fn(logits.float(), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(labels)
            count += len(labels)
            bar.set_postfix(loss=f"{total / count:.4f}", refresh=False)
        probs, val_labels = predict(model, prep, val_loader, device)
        val_loss, val_auc = _val_metrics(probs, val_labels)
        seconds = time.perf_counter() - tic
        history.append({"epoch": epoch, "train_loss": total / max(count, 1),
                        "val_loss": val_loss, "val_auc": val_auc, "seconds": seconds})
        if progress:
            tqdm.write(f"epoch {epoch}: train_loss {total / max(count, 1):.4f}  "
                       f"val_loss {val_loss:.4f}  val_auc {val_auc:.4f}")
        if val_loss < best_loss:  # False for NaN: a NaN loss is never the best
            best_loss, best_epoch, stale = val_loss, epoch, 0
            best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
        else:
            stale += 1
            if 0 < patience <= stale:
                break
    if best_state is None:
        losses = ", ".join(f"{row['train_loss']:.4g}" for row in history)
        raise TrainingError(
            f"the validation loss was NaN in every one of the {len(history)} epoch(s) run "
            f"(training loss by epoch: {losses}): the model diverged, so there is no "
            "checkpoint to restore. "
            f"Lower the learning rate (lr={lr:g}), or check the images and labels for "
            "non-finite values."
        )
    model.load_state_dict(best_state)
    return TrainResult(history=pd.DataFrame(history), best_epoch=best_epoch,
                       epochs_run=len(history), train_seconds=time.perf_counter() - started,
                       best_val_loss=best_loss)
