"""The GPU path, on a real CUDA GPU: skipped without one (this project's CI has none);
`benchmarks/gpu_check.sh` runs them where a GPU is lent. Each checks what the CPU tests can
only check with fakes."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from sm_utils.runs import RunConfig, execute_run

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _run(manifest, tmp_path, name, **overrides):
    values = {"manifest": str(manifest), "confounder": "tag", "p": 0.5, "source": "random",
              "arch": "tf_efficientnet_lite0", "image_size": 64, "epochs": 2, "batch_size": 16,
              "seed": 7, "device": "cuda", "runs_dir": str(tmp_path / name)}
    values.update(overrides)
    run_dir = execute_run(RunConfig(**values), progress=False, cache_dir=tmp_path / "cache",
                          n_boot=20)
    return {"metrics": json.loads((run_dir / "metrics.json").read_text()),
            "config": json.loads((run_dir / "config.json").read_text()),
            "predictions": pd.read_csv(run_dir / "predictions.csv"),
            "history": pd.read_csv(run_dir / "history.csv")}


def test_a_gpu_run_records_where_it_ran_and_scores_without_bf16_ties(phantom_cxr, tmp_path):
    run = _run(phantom_cxr, tmp_path, "bf16")
    ran_on = run["metrics"]["ran_on"]
    assert ran_on["device"] == "cuda" and ran_on["precision"] == "bf16"
    assert ran_on["gpu"] == torch.cuda.get_device_name(0) and ran_on["peak_memory_bytes"] > 0
    device = run["config"]["device"]
    assert device["scoring_precision"] == "fp32" and device["cudnn_benchmark"] is True
    assert device["data_placement"]["resident"] is True  # a few hundred images fit the budget
    # fp32 scores: distinct where bf16 logits (8 bits of mantissa) would tie many of them
    scores = run["predictions"]["score"]
    assert scores.nunique() > 0.9 * len(scores), scores.value_counts().head()


def test_deterministic_gpu_runs_repeat_bit_for_bit(phantom_cxr, tmp_path):
    first, second = (_run(phantom_cxr, tmp_path, name, deterministic=True, precision="fp32")
                     for name in ("a", "b"))
    assert first["metrics"]["ran_on"]["precision"] == "fp32"  # no TF32 when deterministic
    assert first["config"]["device"]["cudnn_benchmark"] is False
    pd.testing.assert_frame_equal(first["history"].drop(columns="seconds"),
                                  second["history"].drop(columns="seconds"))
    assert first["metrics"]["test_sets"] == second["metrics"]["test_sets"]


def test_augmentation_on_the_gpu_matches_the_cpu_to_a_grey_level():
    from sm_utils.data import PAPER_AUGMENTATION, apply_affine

    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (32, 1, 64, 64), dtype=np.uint8))
    matrices = PAPER_AUGMENTATION.draw([np.random.default_rng(i) for i in range(32)], 64, 64)
    on_cpu = apply_affine(images, matrices).int()
    on_gpu = apply_affine(images.cuda(), matrices).cpu().int()
    difference = (on_cpu - on_gpu).abs()
    assert difference.max() <= 1 and (difference > 0).float().mean() < 0.01


def test_the_memory_check_predicts_at_least_what_a_run_reserves(phantom_cxr, tmp_path):
    from sm_utils.grid import measure_run_memory, spawned_child
    from sm_utils.grid.local import MEMORY_MARGIN

    config = {"source": "random", "arch": "tf_efficientnet_lite0", "weights": None,
              "image_size": 64, "batch_size": 16, "optimizer": "adam", "precision": "auto",
              "deterministic": False, "attribution": False, "num_workers": 0,
              "n_images": len(pd.read_csv(phantom_cxr))}
    with spawned_child("cuda") as child:
        predicted = child.submit(measure_run_memory, config, "cuda").result()
    run = _run(phantom_cxr, tmp_path, "memory")
    need = predicted["peak_bytes"] + predicted["resident_bytes"]
    actual = run["metrics"]["ran_on"]["peak_memory_bytes"]
    print(f"memory check: predicted {need / 2**20:.0f} MiB, the run reserved "
          f"{actual / 2**20:.0f} MiB")
    assert need * MEMORY_MARGIN >= actual


def test_the_grid_sees_a_usable_gpu():
    from sm_utils.grid import check_gpus_usable, visible_gpus

    lines = []
    check_gpus_usable("auto", lines.append)  # raises if nvidia-smi's GPUs were unusable
    assert visible_gpus() and not lines
