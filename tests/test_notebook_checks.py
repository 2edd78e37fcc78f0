"""The README's two commands in its order: the notebook checks pass after a demo on any machine.

`make demo` leaves the user's own runs in runs/demo (results that differ from machine to
machine); `make test` then checks the notebooks against their committed outputs. Notebook 04
with its defaults must therefore analyse the committed results table whatever runs/ holds, and
write nothing into the user's runs or figures.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def fake_demo_runs(runs_dir: Path) -> None:
    """A finished demo grid whose AUCs are nothing like the committed ones (another machine)."""
    run_dir = runs_dir / "aaaaaaaaaaaa"
    run_dir.mkdir(parents=True)
    config = {"manifest": "data/demo/phantom_cxr/manifest.csv", "confounder": "tag", "strength": 1.0,
              "p": 0.5, "fold": 0, "source": "imagenet_lite0", "arch": None, "seed": 812}
    test_sets = {name: {"auc": 0.123, "micro_auc": 0.2, "n": 10, "n_pos": 5, "n_confounded": 1}
                 for name in ("iid", "ood", "clean")}
    (run_dir / "metrics.json").write_text(json.dumps(
        {"run_id": run_dir.name, "config": config, "test_sets": test_sets, "best_epoch": 1,
         "epochs_run": 1, "train_seconds": 1.0, "eval_seconds": 0.1}))
    (runs_dir / "cells.csv").write_text(
        "run_id,dataset,confounder,strength,p,fold,source,arch,seed\n"
        "aaaaaaaaaaaa,phantom_cxr,tag,1.0,0.5,0,imagenet_lite0,,812\n")


def test_notebook_04_checks_pass_after_a_demo_and_touch_nothing_of_the_users(tmp_path):
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    shutil.copytree(ROOT / "configs", project / "configs")
    shutil.copytree(ROOT / "data" / "reference", project / "data" / "reference")
    fake_demo_runs(project / "runs" / "demo")
    before = sorted(p.name for p in (project / "runs" / "demo").iterdir())
    env = {**os.environ, "SM_PROJECT_ROOT": str(project), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--nbval-lax", "--nbval-sanitize-with",
         str(ROOT / "tests" / "nbval_sanitize.cfg"), "-p", "no:randomly", "-p", "no:cacheprovider",
         "-q", str(ROOT / "notebooks" / "04_analysis.ipynb")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-3000:]
    # the user's runs and figures are as the demo left them
    assert sorted(p.name for p in (project / "runs" / "demo").iterdir()) == before
    assert not (project / "figures").exists()
    assert (project / "runs" / "committed" / "demo" / "figures" / "demo_auc_vs_p.png").is_file()
