"""A tiny grid over datasets built from provider-format fixtures, run through `sm run` as a
user runs it: the sex (sampled) and tag (synthetic) confounders at p = 1, fold 0, one randomly
initialised source, 32 px, 1 epoch (about 15 s a dataset). Shared by the dataset tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import yaml


def run_dataset_grid(folder: Path, datasets: list[dict]) -> pd.DataFrame:
    """Write ``folder/grid.yaml`` over ``datasets`` (grid entries), run it, check that every
    cell ran, and return its results table."""
    spec = {
        "name": "datasets", "runs_dir": str(folder / "runs"), "figures_dir": str(folder / "figs"),
        "datasets": datasets,
        "confounders": ["sex", {"name": "tag", "params": {"resolution": "input"}}],
        "prevalences": [1], "folds": [0], "seeds": [812], "sources": ["random"],
        "architectures": ["tf_efficientnet_lite0"],
        "training": {"image_size": 32, "epochs": 1, "batch_size": 16, "patience": 1,
                     "augment": False},
        "run": {"device": "cpu", "workers": 1, "threads_per_worker": 1},
    }
    grid = folder / "grid.yaml"
    grid.write_text(yaml.safe_dump(spec))
    done = subprocess.run([sys.executable, "-m", "sm_utils", "run", str(grid), "--progress", "off"],
                          cwd=folder, capture_output=True, text=True, timeout=1200, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    cells = 2 * len(datasets)
    assert f"{cells} run now, 0 failed" in done.stdout
    results = pd.read_csv(folder / "runs/results.csv")
    assert set(results["confounder"]) == {"sex", "tag"} and results["auc"].notna().all()
    assert set(results["dataset"]) == {d["name"] for d in datasets}
    return results
