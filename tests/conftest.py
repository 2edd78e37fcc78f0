"""Shared fixtures. Tests run on 2 CPU cores: keep images tiny and threads fixed."""

from __future__ import annotations

import os

# isort: off
import sm_utils  # noqa: F401  (before torch loads: sm_utils.numerics pins the CPU's kernels)
# isort: on
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def phantom_cxr(tmp_path_factory):
    """A small phantom CXR dataset (64 px), built once per test session."""
    from sm_utils.datasets import build_dataset

    out = tmp_path_factory.mktemp("phantom_cxr")
    build_dataset("phantom_cxr", out, n_patients=60, image_size=64, seed=3, n_folds=2)
    return out / "manifest.csv"
