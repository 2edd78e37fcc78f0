import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from sm_utils.data import make_loader
from sm_utils.training import (
    TrainingError,
    configure_device,
    predict,
    resolve_device,
    train_model,
)


def _easy_task(n, seed):
    """A bright square means class 1: learnable by a tiny CNN in a few epochs."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 100, (n, 1, 16, 16), generator=g, dtype=torch.uint8)
    labels = torch.arange(n) % 2
    images[labels == 1, :, 4:10, 4:10] = 250
    return TensorDataset(images, labels)


def _tiny_cnn(seed, batch_norm=True):
    torch.manual_seed(seed)
    layers = [nn.Conv2d(3, 4, 3, padding=1)]
    if batch_norm:
        layers.append(nn.BatchNorm2d(4))
    layers += [nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.5), nn.Linear(4, 2)]
    return nn.Sequential(*layers)


def prep(x):
    return x.float().div(255).expand(-1, 3, -1, -1)


def _train(seed=0, **kwargs):
    settings = {"epochs": 6, "lr": 0.05, "patience": 0, "progress": False}
    settings.update(kwargs)
    model = _tiny_cnn(seed, batch_norm=settings.pop("batch_norm", True))
    train = make_loader(_easy_task(64, 1), batch_size=16, shuffle=True, seed=seed)
    val = make_loader(_easy_task(32, 2), batch_size=16, shuffle=False, seed=seed)
    device = torch.device("cpu")
    with configure_device(device, threads=1):
        result = train_model(model, prep, train, val, device=device, **settings)
    return model, result, val


def test_learns_and_restores_the_best_checkpoint():
    model, result, val = _train()
    history = result.history
    assert list(history.columns) == ["epoch", "train_loss", "val_loss", "val_auc", "seconds"]
    assert result.epochs_run == 6 and list(history["epoch"]) == [1, 2, 3, 4, 5, 6]
    assert history["train_loss"].iloc[-1] < history["train_loss"].iloc[0]
    assert history["val_auc"].max() > 0.9
    assert result.best_epoch == int(history.loc[history["val_loss"].idxmin(), "epoch"])
    # The model holds the best epoch's weights: its validation loss is the best one.
    probs, labels = predict(model, prep, val, torch.device("cpu"))
    loss = -np.log(probs[np.arange(len(labels)), labels]).mean()
    assert loss == pytest.approx(history["val_loss"].min(), rel=1e-5)


def test_early_stopping_after_patience_epochs_without_improvement():
    # lr so small that float32 weights cannot move and no batch norm: val loss is constant.
    _, result, _ = _train(lr=1e-30, patience=2, epochs=10, batch_norm=False)
    assert result.epochs_run == 3 and result.best_epoch == 1


def test_cpu_training_is_reproducible():
    _, first, _ = _train(seed=4, epochs=3)
    _, second, _ = _train(seed=4, epochs=3)
    columns = ["train_loss", "val_loss", "val_auc"]
    assert first.history[columns].equals(second.history[columns])
    _, other, _ = _train(seed=5, epochs=3)
    assert not first.history[columns].equals(other.history[columns])


def test_configure_device_sets_and_restores_determinism():
    before = (torch.are_deterministic_algorithms_enabled(), torch.get_num_threads())
    with configure_device(torch.device("cpu"), threads=1) as record:
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.get_num_threads() == 1
        assert record == {"device": "cpu", "threads": 1, "deterministic": True}
    assert (torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()) == before


def test_bad_settings_are_refused():
    with pytest.raises(TrainingError, match="adam"):
        _train(optimizer="sgd")
    with pytest.raises(TrainingError, match="at least 1"):
        _train(epochs=0)
    with pytest.raises(TrainingError, match="auto"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(TrainingError, match="no CUDA GPU"):
            resolve_device("cuda")
        assert resolve_device("auto").type == "cpu"
