"""Shared fixtures. Tests run on 2 CPU cores: keep images tiny and threads fixed.

Every test that runs a model (training, scoring, pretraining, probes, attribution), in this
process, in a fixture it uses or in a process it starts, must carry the ``numerics`` marker:
``make test-foreign`` repeats exactly those tests (and the notebooks) under another CPU's
kernels. A test that runs one without the marker fails at teardown, naming the marker.
"""

from __future__ import annotations

import os

# isort: off
import sm_utils  # noqa: F401  (before torch loads: sm_utils.numerics pins the CPU's kernels)
# isort: on
import pytest
import torch
from model_use.guard import (  # noqa: F401  (the numerics marker's guard: its hooks)
    pytest_configure,
    pytest_fixture_setup,
    pytest_runtest_setup,
    pytest_runtest_teardown,
    pytest_unconfigure,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

# the stand-in notebooks of the grid tests, not notebooks to check (`make test` passes --nbval-lax)
collect_ignore_glob = ["fixtures/*.ipynb"]


@pytest.fixture(scope="session")
def phantom_cxr(tmp_path_factory):
    """A small phantom CXR dataset (64 px), built once per test session."""
    from sm_utils.datasets import build_dataset

    out = tmp_path_factory.mktemp("phantom_cxr")
    build_dataset("phantom_cxr", out, n_patients=60, image_size=64, seed=3, n_folds=2)
    return out / "manifest.csv"
