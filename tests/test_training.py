import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import sm_utils
from sm_utils.data import make_loader
from sm_utils.training import (
    TrainingError,
    configure_device,
    predict,
    resolve_device,
    train_model,
    training_precision,
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


def _train(seed=0, val=None, **kwargs):
    settings = {"epochs": 6, "lr": 0.05, "patience": 0, "progress": False}
    settings.update(kwargs)
    model = _tiny_cnn(seed, batch_norm=settings.pop("batch_norm", True))
    train = make_loader(_easy_task(64, 1), batch_size=16, shuffle=True, seed=seed)
    val = make_loader(_easy_task(32, 2), batch_size=16, shuffle=False, seed=seed) if val is None \
        else val(model)
    device = torch.device("cpu")
    with configure_device(device, threads=1):
        result = train_model(model, prep, train, val, device=device, **settings)
    return model, result, val


class SteeredValidation:
    """A validation loader that sets each epoch's validation loss and records the weights.

    ``plan[e - 1]`` decides epoch e: "low" labels every image as the class the model predicts
    (loss below log 2), "high" as the other class (loss above log 2), "nan" feeds NaN images
    (the model's outputs, and so the loss, are NaN). ``states[e - 1]`` is the model's state
    when epoch e was scored, i.e. the checkpoint train_model would keep for that epoch.
    """

    def __init__(self, model, plan):
        self.model, self.plan, self.states = model, plan, []
        self.images = _easy_task(32, 2).tensors[0]
        self.dataset = self.images  # train_model checks len(loader.dataset)

    def __iter__(self):
        kind = self.plan[len(self.states)]
        self.states.append({k: v.detach().clone() for k, v in self.model.state_dict().items()})
        assert not self.model.training  # scored as predict() scores: eval mode
        with torch.no_grad():
            predicted = self.model(prep(self.images)).argmax(dim=1)
        if kind == "nan":
            yield torch.full(self.images.shape, float("nan")), predicted
        else:
            yield self.images, predicted if kind == "low" else 1 - predicted


def steered(plan):
    return lambda model: SteeredValidation(model, plan)


def same_state(model, state):
    current = model.state_dict()
    assert current.keys() == state.keys()
    return all(torch.equal(current[k], state[k]) for k in state)


@pytest.mark.numerics
def test_learns_an_easy_task():
    model, result, val = _train()
    history = result.history
    assert list(history.columns) == ["epoch", "train_loss", "val_loss", "val_auc", "seconds"]
    assert result.epochs_run == 6 and list(history["epoch"]) == [1, 2, 3, 4, 5, 6]
    assert history["train_loss"].iloc[-1] < history["train_loss"].iloc[0]
    assert history["val_auc"].max() > 0.9
    assert result.best_epoch == int(history.loc[history["val_loss"].idxmin(), "epoch"])
    assert result.best_val_loss == history["val_loss"].min()
    # The model holds the best epoch's weights: its validation loss is the best one.
    probs, labels = predict(model, prep, val, torch.device("cpu"))
    loss = -np.log(probs[np.arange(len(labels)), labels]).mean()
    assert loss == pytest.approx(history["val_loss"].min(), rel=1e-5)


@pytest.mark.numerics
def test_restores_the_best_epoch_not_the_last():
    model, result, val = _train(val=steered(["high", "low", "high", "high", "high"]), epochs=5)
    losses = result.history["val_loss"].to_numpy()
    assert losses[1] < np.log(2) < losses[[0, 2, 3, 4]].min()  # the plan was followed
    assert result.best_epoch == 2 and result.epochs_run == 5
    assert result.best_val_loss == losses[1]
    # The model returned holds epoch 2's weights, not the last epoch's (they moved after 2).
    assert same_state(model, val.states[1])
    assert not same_state(model, val.states[4])


@pytest.mark.numerics
def test_early_stopping_after_patience_epochs_without_improvement():
    model, result, val = _train(val=steered(["high", "low", "high", "high"] + ["low"] * 6),
                                epochs=10, patience=2)
    # Epochs 3 and 4 do not improve on epoch 2: training stops after epoch 4 (never scores 5).
    assert result.epochs_run == 4 and len(val.states) == 4 and result.best_epoch == 2
    assert list(result.history["epoch"]) == [1, 2, 3, 4]
    assert same_state(model, val.states[1])
    assert not same_state(model, val.states[3])
    # An improvement restarts the count: epoch 3 improves on 1, so epochs 4 and 5 (not 2 and
    # 4) are the two without improvement. (NaN and "high" after "low" never improve.)
    model, result, val = _train(val=steered(["high", "nan", "low", "nan", "high", "low", "low"]),
                                epochs=7, patience=2)
    assert result.epochs_run == 5 and result.best_epoch == 3
    assert same_state(model, val.states[2])


@pytest.mark.numerics
def test_a_nan_validation_loss_is_never_the_best():
    model, result, val = _train(val=steered(["high", "low", "nan", "nan", "nan"]), epochs=5)
    history = result.history
    assert history["val_loss"].iloc[:2].notna().all() and history["val_loss"].iloc[2:].isna().all()
    assert history["val_auc"].iloc[2:].isna().all()
    assert result.best_epoch == 2 and result.best_val_loss == history["val_loss"].iloc[1]
    assert same_state(model, val.states[1])
    # NaN epochs are epochs without improvement: patience stops training after two of them.
    _, result, val = _train(val=steered(["high", "low", "nan", "nan", "low"]), epochs=5, patience=2)
    assert result.epochs_run == 4 and result.best_epoch == 2


@pytest.mark.numerics
def test_training_that_diverges_in_every_epoch_is_an_error():
    # lr 1e20 sends the weights to inf in the first step: every validation loss is NaN.
    with pytest.raises(TrainingError) as error:
        _train(lr=1e20, epochs=3)
    message = str(error.value)
    assert "NaN in every one of the 3 epoch(s)" in message
    assert "training loss by epoch: nan, nan, nan" in message
    assert "Lower the learning rate (lr=1e+20)" in message


@pytest.mark.numerics
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
        numerics = record.pop("numerics")  # the CPU kernels in effect (tests/test_numerics.py)
        assert numerics["mode"] == sm_utils.numerics.mode()
        assert record == {"device": "cpu", "threads": 1, "deterministic": True,
                          "training_precision": "fp32", "scoring_precision": "fp32"}
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


@pytest.mark.numerics
def test_scoring_never_runs_under_autocast_while_training_does(monkeypatch):
    """The validation loss that picks the checkpoint and the test scores are fp32 on every
    device: predict never enters training's autocast (bf16 on a GPU), train_model does."""
    from sm_utils import training

    calls = []
    real = training._autocast

    def recording(device, precision="auto"):
        calls.append(precision)
        return real(device, precision)

    monkeypatch.setattr(training, "_autocast", recording)
    model, _, val = _train(epochs=1)
    assert len(calls) == 4  # one per training batch (64 images / 16)
    calls.clear()
    probs, _ = predict(model, prep, val, torch.device("cpu"))
    assert calls == [] and probs.dtype == np.float64


class FlagRecorder:
    """Stands in for a model in predict: records the TF32 flags its forward runs under."""

    def __init__(self, fail=False):
        self.seen, self.fail = [], fail

    def eval(self):
        return self

    def __call__(self, x):
        self.seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
        if self.fail:
            raise RuntimeError("forward failed")
        return torch.zeros(len(x), 2)


def test_scoring_runs_without_tf32_and_training_s_flags_come_back(monkeypatch):
    """configure_device turns TF32 on for training on a GPU; predict (the validation loss and
    the test scores, recorded as scoring_precision fp32) runs with it off, then restores it,
    also when the forward fails."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "fake GPU")
    val = make_loader(_easy_task(32, 2), batch_size=16, shuffle=False, seed=0)
    with configure_device(torch.device("cuda")) as record:
        assert record["tf32"] and record["scoring_precision"] == "fp32"
        on = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        assert on == (True, True)
        model = FlagRecorder()
        predict(model, prep, val, torch.device("cpu"))
        assert model.seen == [(False, False)] * 2  # both batches in true fp32
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == on
        failing = FlagRecorder(fail=True)
        with pytest.raises(RuntimeError, match="forward failed"):
            predict(failing, prep, val, torch.device("cpu"))
        assert failing.seen == [(False, False)]
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == on


def test_training_precision_is_a_setting_and_bf16_is_for_gpus():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert training_precision(cpu) == "fp32" and training_precision(gpu) == "bf16"
    assert training_precision(gpu, "fp32") == "fp32"
    with pytest.raises(TrainingError, match="bf16.*is for GPUs"):
        training_precision(cpu, "bf16")
    with pytest.raises(TrainingError, match="precision must be one of"):
        training_precision(gpu, "fp16")


@pytest.mark.parametrize("deterministic", [False, True])
def test_the_gpu_settings_are_set_for_the_run_and_restored_after(monkeypatch, deterministic):
    """The GPU branch of configure_device, on a machine without one: TF32, autotuning and
    deterministic algorithms as asked, every flag back as it was afterwards."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "fake GPU")
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    flags = lambda: (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
                     torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    before = flags()
    with configure_device(torch.device("cuda"), deterministic=deterministic) as record:
        assert flags() == (deterministic, not deterministic, not deterministic, not deterministic)
        assert record["deterministic"] is deterministic and record["tf32"] is (not deterministic)
        assert record["training_precision"] == "bf16" and record["scoring_precision"] == "fp32"
        if deterministic:
            import os

            assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert flags() == before
