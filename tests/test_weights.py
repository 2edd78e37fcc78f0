"""Safe weight loading: formats, refusals of unsafe pickles, corrupt files, and checked loads."""

from __future__ import annotations

import pickle
import struct
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from sm_utils.weights import (
    LoadReport,
    SourceError,
    WeightsError,
    detect_format,
    load_checked,
    read_state_dict,
    save_state_dict,
    strip_prefix,
)

torch.set_num_threads(1)


class Tiny(nn.Module):
    def __init__(self, width: int = 3, classes: int = 2):
        super().__init__()
        self.body = nn.Linear(4, width)
        self.norm = nn.BatchNorm1d(width)
        self.fc = nn.Linear(width, classes)


class Custom:  # a class that is not a tensor: unpickling it needs arbitrary code
    def __init__(self):
        self.value = 3


@pytest.fixture
def state():
    torch.manual_seed(0)
    return Tiny().state_dict()


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k, value in a.items():
        torch.testing.assert_close(value, b[k], rtol=0, atol=0)


def test_weights_error_is_a_source_error_and_value_error():
    assert issubclass(WeightsError, SourceError) and issubclass(WeightsError, ValueError)


@pytest.mark.parametrize("fmt", ["safetensors", "torch_zip", "torch_legacy"])
def test_state_dict_round_trip_in_every_format(tmp_path, state, fmt):
    path = tmp_path / f"w.{fmt}"
    if fmt == "safetensors":
        save_state_dict(path, state, {"provenance": "unit test", "preprocessing": {"a": 1}})
    else:
        torch.save(state, path, _use_new_zipfile_serialization=fmt == "torch_zip")
    assert detect_format(path) == fmt
    loaded, metadata = read_state_dict(path)
    assert_same(loaded, state)
    if fmt == "safetensors":
        assert metadata == {"provenance": "unit test", "preprocessing": '{"a": 1}'}


def test_safetensors_files_are_byte_identical_across_saves_and_processes(tmp_path, state):
    # safetensors orders its header from a hash map; without canonicalisation these differ
    metadata = {name: f"value {i}" for i, name in enumerate("abcdefgh")}
    paths = [save_state_dict(tmp_path / f"w{i}.safetensors", state, metadata) for i in range(4)]
    script = ("import sys, torch; from sm_utils.weights import save_state_dict; "
              "state = torch.load(sys.argv[1], weights_only=True); "
              f"save_state_dict(sys.argv[2], state, {metadata!r})")
    torch.save(state, tmp_path / "state.pt")
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "state.pt"),
                    str(tmp_path / "other_process.safetensors")], check=True)
    paths.append(tmp_path / "other_process.safetensors")
    assert len({p.read_bytes() for p in paths}) == 1
    assert struct.unpack("<Q", paths[0].read_bytes()[:8])[0] % 8 == 0  # header stays aligned
    loaded, read_metadata = read_state_dict(paths[-1])
    assert_same(loaded, state)
    assert read_metadata == metadata


def test_checkpoint_with_state_dict_key_is_unwrapped(tmp_path, state):
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": state, "epoch": 7, "best_loss": 0.25}, path)
    loaded, _ = read_state_dict(path)
    assert_same(loaded, state)


def test_whole_pickled_model_is_refused_with_reason(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(Tiny(), path)  # pickles the class itself
    with pytest.raises(WeightsError) as info:
        read_state_dict(path)
    message = str(info.value)
    assert "refused" in message and "arbitrary code" in message
    assert "model.state_dict()" in message


def test_plain_pickle_of_custom_object_is_refused(tmp_path):
    path = tmp_path / "custom.pkl"
    path.write_bytes(pickle.dumps({"w": torch.zeros(2), "extra": Custom()}, protocol=2))
    with pytest.raises(WeightsError, match="more than tensors"):
        read_state_dict(path)


def test_mapping_with_non_tensor_values_is_not_a_state_dict(tmp_path, state):
    path = tmp_path / "mixed.pt"
    torch.save({**state, "note": "trained on Tuesday", "lr": 0.1}, path)
    with pytest.raises(WeightsError, match=r"not a plain state dict.*: note, lr\."):
        read_state_dict(path)


def test_a_list_of_tensors_is_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(WeightsError, match="holds a list, not a state dict"):
        read_state_dict(path)


@pytest.mark.parametrize("fmt", ["safetensors", "torch_zip", "torch_legacy"])
def test_truncated_file_is_reported_as_truncated(tmp_path, fmt):
    torch.manual_seed(1)
    big = Tiny(width=256).state_dict()
    path = tmp_path / "w.bin"
    if fmt == "safetensors":
        save_state_dict(path, big)
    else:
        torch.save(big, path, _use_new_zipfile_serialization=fmt == "torch_zip")
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.6)])
    with pytest.raises(WeightsError, match="truncated or corrupt"):
        read_state_dict(path)


def test_corrupt_empty_missing_and_foreign_files(tmp_path):
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(WeightsError, match="not a recognised weights file"):
        read_state_dict(garbage)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(WeightsError, match="empty"):
        read_state_dict(empty)
    with pytest.raises(WeightsError, match="not found"):
        read_state_dict(tmp_path / "nope.safetensors")
    keras = tmp_path / "model.h5"
    with h5py.File(keras, "w") as fh:
        fh["x"] = np.zeros(2)
    with pytest.raises(WeightsError, match="'radimagenet'.*'imagenet_keras'"):
        read_state_dict(keras)


def test_safetensors_with_corrupted_header_is_reported(tmp_path, state):
    path = save_state_dict(tmp_path / "w.safetensors", state)
    data = bytearray(path.read_bytes())
    data[10:20] = b"#" * 10  # inside the JSON header
    path.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="truncated or corrupt"):
        read_state_dict(path)


def test_strip_prefix_only_touches_prefixed_keys():
    sd = {"backbone.conv1.weight": torch.zeros(1), "fc.bias": torch.ones(1)}
    assert list(strip_prefix(sd, "backbone.")) == ["conv1.weight", "fc.bias"]


# ------------------------------------------------------------------ checked loading


def test_checked_load_copies_every_tensor_and_reports_skipped_head(state):
    torch.manual_seed(5)
    target = Tiny(classes=7)
    head_before = target.fc.weight.detach().clone()
    report = load_checked(target, state, skip_prefixes=("fc",), init_prefixes=("fc",))
    assert isinstance(report, LoadReport)
    torch.testing.assert_close(target.body.weight, state["body.weight"])
    torch.testing.assert_close(target.norm.running_var, state["norm.running_var"])
    torch.testing.assert_close(target.fc.weight, head_before)  # fresh 7-way head kept
    assert report.skipped == ["fc.bias", "fc.weight"]
    assert set(report.kept_init) == {"fc.weight", "fc.bias"}


def test_wrong_architecture_lists_missing_unexpected_and_shapes(state):
    wrong = dict(state)
    wrong["extra.weight"] = torch.zeros(3)
    del wrong["norm.running_mean"]
    wrong["body.weight"] = torch.zeros(5, 4)
    with pytest.raises(WeightsError) as info:
        load_checked(Tiny(), wrong)
    message = str(info.value)
    assert "missing keys (1): norm.running_mean" in message
    assert "unexpected keys (1): extra.weight" in message
    assert "body.weight: file (5, 4) vs model (3, 4)" in message
    assert "Tiny" in message


def test_long_key_lists_are_shortened():
    many = {f"layer{i}.weight": torch.zeros(1) for i in range(40)}
    with pytest.raises(WeightsError, match=r"unexpected keys \(40\): .*\.\.\. and 28 more"):
        load_checked(Tiny(), {**Tiny().state_dict(), **many})


def test_half_precision_weights_are_cast_to_model_dtype(state):
    half = {k: (v.half() if v.is_floating_point() else v) for k, v in state.items()}
    model = Tiny()
    load_checked(model, half)
    assert model.body.weight.dtype == torch.float32
    torch.testing.assert_close(model.body.weight, state["body.weight"].half().float())
