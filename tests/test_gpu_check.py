"""benchmarks/gpu_check.sh, the prepared GPU check, as far as a machine without a GPU can run it:
its dry run, its tiny grid's configuration, and its report on run directories."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd

from sm_utils.cli import main

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["setup", "environment", "gpu_tests", "bench_training", "bench_grid", "tiny_grid",
         "ct_noise", "gpu_check_report"]


def test_the_dry_run_lists_every_step_within_nine_and_a_half_minutes_and_runs_nothing(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(["bash", str(ROOT / "benchmarks/gpu_check.sh"), "--dry-run"],
                          env={"PATH": "/usr/bin:/bin", "OUT": str(out)}, capture_output=True,
                          text=True, timeout=60, check=True)
    steps = re.findall(r"^(\w+)\s+(\d+)s  (.*)$", done.stdout, flags=re.MULTILINE)
    assert [name for name, _, _ in steps] == STEPS
    assert sum(int(seconds) for _, seconds, _ in steps) <= 9.5 * 60  # a device command: 10 min
    commands = {name: command for name, _, command in steps}
    assert "--device cuda --runs 1 2 4" in commands["bench_grid"]
    assert "--arch keras_resnet50 --image-size 224 --batch-size 32 --bf16" in commands["bench_training"]
    assert "tests/test_gpu.py" in commands["gpu_tests"]
    assert "bench_ct_noise.py --gpu-check cuda" in commands["ct_noise"]
    assert not out.exists()  # nothing run, nothing written
    bad = subprocess.run(["bash", str(ROOT / "benchmarks/gpu_check.sh"), "--dry"],
                         capture_output=True, text=True, timeout=60, check=False)
    assert bad.returncode == 2 and "expected --dry-run" in bad.stderr


def test_the_tiny_grid_shares_a_gpu_between_two_architectures(capsys):
    from sm_utils.grid import expand_cells, load_grid

    assert main(["validate", str(ROOT / "configs/gpu_check.yaml"), "--no-check-paths"]) == 0
    spec = load_grid(ROOT / "configs/gpu_check.yaml")
    assert spec.run["runs_per_gpu"] == 2 and spec.run["device"] == "cuda" and spec.attribution
    assert {c.params["arch"] for c in expand_cells(spec)} == {"tf_efficientnet_lite0",
                                                             "keras_resnet50"}


def _write_run(runs_dir: Path, run_id: str, scores, peak):
    run = runs_dir / run_id
    run.mkdir(parents=True)
    config = {"source": "random", "arch": "keras_resnet50", "p": 0.5, "fold": 0}
    ran_on = {"device": "cuda", "gpu": "NVIDIA H200", "precision": "bf16",
              "peak_memory_bytes": peak}
    (run / "metrics.json").write_text(json.dumps({"run_id": run_id, "config": config,
                                                  "ran_on": ran_on, "train_seconds": 3.0}))
    pd.DataFrame({"test_set": ["ood"] * len(scores), "score": scores}).to_csv(
        run / "predictions.csv", index=False)


def test_the_report_gives_device_memory_against_the_prediction_and_tied_scores(tmp_path):
    runs = tmp_path / "runs"
    _write_run(runs, "a", [0.1, 0.2, 0.3, 0.4], 2 * 2**30)
    _write_run(runs, "b", [0.5, 0.5, 0.5, 0.9], 4 * 2**30)  # three of four scores tie
    (runs / "memory_check.json").write_text(json.dumps({"need_bytes": 3 * 2**30}))
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu_check_report.py"),
                           str(runs), "--csv", str(tmp_path / "report.csv")],
                          capture_output=True, text=True, timeout=120, check=True)
    table = pd.read_csv(tmp_path / "report.csv").set_index("run_id")
    assert table.loc["a", "score_ties"] == 0 and table.loc["b", "score_ties"] == 0.75
    assert table.loc["a", "predicted_over_peak"] == 1.5
    assert table.loc["b", "predicted_over_peak"] == 0.75
    assert set(table["device"]) == {"cuda"} and set(table["precision"]) == {"bf16"}
    assert "largest share of tied scores 0.750" in done.stdout
    assert "from 0.75 to 1.50 (below 1: the check under-predicted)" in done.stdout
    empty = subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu_check_report.py"),
                            str(tmp_path / "nothing")], capture_output=True, text=True,
                           timeout=120, check=False)
    assert empty.returncode == 1 and "no complete runs" in empty.stderr

