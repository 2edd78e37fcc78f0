"""The paper's own grids, end to end, on provider-format data, as a user runs them.

`sm run configs/paper_cxr.yaml` and `configs/paper_ct.yaml` through the documented smoke
override (configs/smoke.yaml: 32 px, 1 epoch, 2 folds, 2 prevalences) plus a file that points
the grid at the downloads, which here are small fakes in the providers' formats: NIH's
Data_Entry CSV and image folders, the paper's published split files, LIDC-IDRI DICOM series
and Keras .h5 weight files for ImageNet and RadImageNet (tests/fakes/paper_data.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from fakes.paper_data import write_keras_weights, write_lidc, write_nih, write_paper_splits

from sm_utils.manifest import load_manifest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.paper_e2e


@pytest.fixture(scope="module")
def downloads(tmp_path_factory):
    """What a user has put on disk: data and weights (fakes, in the providers' formats)."""
    folder = tmp_path_factory.mktemp("downloads")
    records = write_nih(folder / "nih_cxr14")
    write_paper_splits(folder / "source_matters_splits" / "chest14", records)
    table = write_lidc(folder / "lidc_idri")
    weights = write_keras_weights(folder / "weights")
    return {"folder": folder, "lidc_annotations": table, "weights": weights}


def paths_override(downloads, out: Path) -> Path:
    """The user's paths: where the data and weights are, where runs and figures go."""
    folder = downloads["folder"]
    override = {
        "runs_dir": str(out / "runs" / "{name}"),
        "figures_dir": str(out / "figures"),
        "datasets": [
            {"name": "nih_cxr14", "manifest": str(out / "data/nih_cxr14/manifest.csv"),
             "params": {"data_root": str(folder / "nih_cxr14"),
                        "dataset_params": {"split_dir": str(folder / "source_matters_splits/chest14")}}},
            {"name": "nih_sex_task", "manifest": str(out / "data/nih_sex_task/manifest.csv"),
             "params": {"data_root": str(folder / "nih_cxr14")}},
            {"name": "lidc_idri", "manifest": str(out / "data/lidc_idri/manifest.csv"),
             "params": {"data_root": str(folder / "lidc_idri"),
                        # the fakes' slices span 28 mm: a 8.4 mm box (12 px) instead of 64 mm
                        "dataset_params": {"annotations": str(downloads["lidc_annotations"]),
                                           "image": "roi", "roi_mm": 8.4}}},
        ],
        "sources": [{"name": name, "weights": str(path)}
                    for name, path in downloads["weights"].items()],
    }
    path = out / "my_paths.yaml"
    path.write_text(yaml.safe_dump(override))
    return path


def sm(*args: str, cwd: Path, env_extra: dict | None = None, timeout: int = 1500):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SM_CACHE_DIR": str(cwd / "cache"),
           **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "sm_utils", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


def run_paper_grid(config: str, downloads, out: Path):
    override = paths_override(downloads, out)
    result = sm("run", str(ROOT / "configs" / config), "--override", str(ROOT / "configs/smoke.yaml"),
                "--override", str(override), "--progress", "off", cwd=out)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    # a clean run prints no warning at all (e.g. none of Jupyter's per-kernel TCP warnings)
    warnings = [line for line in (result.stdout + result.stderr).splitlines()
                if "warning" in line.lower()]
    assert warnings == []
    return result


def configs_of_runs(runs_dir: Path) -> pd.DataFrame:
    rows = []
    for path in sorted(runs_dir.glob("*/config.json")):
        config = json.loads(path.read_text())
        rows.append({"run_id": config["run_id"], "source": config["source"]["source"],
                     "arch": config["source"]["arch"],
                     "preprocessing": config["preprocessing"]["name"],
                     "confounder": config["confounder"]["name"],
                     "split_sizes": config["split_sizes"]})
    return pd.DataFrame(rows)


@pytest.mark.numerics
def test_paper_cxr_grid_runs_every_cell_on_nih_files_and_keras_weights(downloads, tmp_path):
    run_paper_grid("paper_cxr.yaml", downloads, tmp_path)
    runs_dir = tmp_path / "runs" / "paper_cxr"
    cells = pd.read_csv(runs_dir / "cells.csv")
    # tag, low-pass and X-ray noise on the published splits, sex on the sex task:
    # 4 confounders x 2 p x 2 folds x 3 sources
    assert len(cells) == 48 and set(cells["dataset"]) == {"nih_cxr14", "nih_sex_task"}
    report = json.loads((runs_dir / "grid_report.json").read_text())
    assert report["succeeded"] == 48 and report["failures"] == []
    runs = configs_of_runs(runs_dir)
    assert len(runs) == 48
    # The paper's three arms: one Keras ResNet50, the paper's preprocessing per source.
    arms = runs.drop_duplicates("source").set_index("source")
    assert set(arms.index) == {"imagenet_keras", "radimagenet", "random"}
    assert set(arms["arch"]) == {"keras_resnet50"}
    assert arms.loc["radimagenet", "preprocessing"] == "keras_caffe_x_1/255"
    assert arms.loc["imagenet_keras", "preprocessing"] == "keras_caffe"
    assert arms.loc["random", "preprocessing"] == "keras_caffe"
    # The main task is the paper's split files: 16 test images, 35 + 5 per fold.
    tag = runs[runs["confounder"] == "tag"].iloc[0]["split_sizes"]
    assert tag["train"]["n"] == 35 and tag["val"]["n"] == 5 and tag["ood"]["n"] == 16
    # The sex task is scored on its o.o.d. test (male positives vs female negatives) and on
    # our i.i.d. pool.
    sex = runs[runs["confounder"] == "sex"].iloc[0]["split_sizes"]
    assert sex["ood"]["n"] == 16 and sex["ood"]["n_pos"] == 8 and "iid" in sex
    results = pd.read_csv(runs_dir / "results.csv")
    assert results["run_id"].nunique() == 48
    assert results["micro_auc"].notna().all() and results["auc"].notna().all()
    # Notebook 04 ran and drew the figure against the paper's reported (micro-AUC) means.
    analysis = json.loads((runs_dir / "04_analysis.ipynb").read_text())
    assert analysis["metadata"]["papermill"]["exception"] is not True
    assert (tmp_path / "figures" / "paper_cxr_vs_paper.png").stat().st_size > 10_000
    paper_test = pd.read_csv(runs_dir / "paper_test.csv")
    assert set(paper_test["confounder"]) == {"tag", "lowpass", "xray_noise", "sex"}


@pytest.mark.numerics
def test_paper_ct_grid_runs_every_cell_on_lidc_dicom(downloads, tmp_path):
    run_paper_grid("paper_ct.yaml", downloads, tmp_path)
    runs_dir = tmp_path / "runs" / "paper_ct"
    report = json.loads((runs_dir / "grid_report.json").read_text())
    # CT noise and X-ray noise in CT: 2 confounders x 2 p x 2 folds x 3 sources
    assert report["total"] == 24 and report["succeeded"] == 24 and report["failures"] == []
    runs = configs_of_runs(runs_dir)
    assert set(runs["source"]) == {"imagenet_keras", "radimagenet", "random"}
    assert (tmp_path / "figures" / "paper_ct_vs_paper.png").stat().st_size > 10_000
    # The task is ours and says so; each row's model input is a box of 8.4 mm (12 px at the
    # fakes' 0.7 mm) cut from its slice, stored whole in HU, after the dose noise.
    manifest = load_manifest(tmp_path / "data/lidc_idri/manifest.csv")
    assert manifest.meta["task"].startswith("ours") and manifest.meta["image"] == "roi"
    sides = manifest.table.eval("roi_row1 - roi_row0").unique().tolist()
    assert sides == [12] and manifest.table["pixel_spacing_row_mm"].eq(0.7).all()
    assert set(runs["confounder"]) == {"ct_noise", "xray_noise_ct"}


def test_validate_refuses_radimagenet_in_a_torchvision_resnet50(tmp_path, capsys):
    from sm_utils.cli import main

    override = tmp_path / "wrong_arch.yaml"
    override.write_text(yaml.safe_dump({"sources": [{"name": "radimagenet", "arch": "resnet50"}]}))
    code = main(["validate", str(ROOT / "configs/paper_cxr.yaml"), "--no-check-paths",
                 "--override", str(override)])
    err = capsys.readouterr().err
    assert code == 2
    # every radimagenet cell is named, with the reason and the fix
    assert "120 cell(s): source 'radimagenet' with arch 'resnet50'" in err
    assert "keras_resnet50" in err and "radimagenet" in err


def test_validate_lists_every_unrunnable_cell_at_once(downloads, tmp_path, capsys):
    """A sex task without a sex column, and a manifest without test rows, in one report."""
    from sm_utils.cli import main
    from sm_utils.datasets import build_dataset

    out = tmp_path
    sex_dir = out / "data/nih_sex_task"
    build_dataset("nih_sex_task", sex_dir, root=downloads["folder"] / "nih_cxr14", n_folds=2,
                  n_dev_female_positive=12, n_dev_male_positive=12, n_dev_male_negative=12,
                  n_test_male_positive=8, n_test_female_negative=8, n_iid_test_per_group=4)
    table = pd.read_csv(sex_dir / "manifest.csv", dtype=str)
    table.drop(columns="sex").to_csv(sex_dir / "manifest.csv", index=False)
    main_dir = out / "data/nih_cxr14"
    build_dataset("published_splits", main_dir, root=downloads["folder"] / "nih_cxr14",
                  split_dir=downloads["folder"] / "source_matters_splits/chest14")
    table = pd.read_csv(main_dir / "manifest.csv", dtype=str)
    table["fold_1"] = table["fold_1"].replace({"test": "unused"})
    table.to_csv(main_dir / "manifest.csv", index=False)
    code = main(["validate", str(ROOT / "configs/paper_cxr.yaml"), "--override",
                 str(ROOT / "configs/smoke.yaml"), "--override", str(paths_override(downloads, out))])
    err = capsys.readouterr().err
    assert code == 2
    assert "sampled confounder 'sex' needs attribute column 'sex'" in err
    assert "fold 1" in err and "no test rows" in err
    # 12 sex cells + the fold-1 cells of the 3 confounders on the main task (3 x 2 p x 3)
    assert "30 cell(s) cannot run" in err
