"""Notebook 01 runs headless under papermill with non-default parameters, unchanged."""

from pathlib import Path

import papermill as pm
import pytest

from sm_utils.datasets import build_from_notebook
from sm_utils.manifest import ManifestError, load_manifest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "01_data_preparation.ipynb"


def test_notebook_01_with_other_parameters(tmp_path):
    out_dir = tmp_path / "ct"
    pm.execute_notebook(
        str(NOTEBOOK), str(tmp_path / "out.ipynb"), kernel_name="python3", progress_bar=False,
        parameters={"dataset": "phantom_ct", "out_dir": str(out_dir), "image_size": 64,
                    "n_patients": 30, "n_folds": 2, "seed": 4, "test_fraction": 0.25,
                    "val_fraction": 0.25},
    )
    manifest = load_manifest(out_dir / "manifest.csv")
    assert manifest.folds == [0, 1]
    assert set(manifest.table["modality"]) == {"ct"}
    assert manifest.table["patient_id"].nunique() == 30


def test_build_from_notebook_skips_common_parameters_a_builder_does_not_take(tmp_path):
    manifest, skipped = build_from_notebook(
        "phantom_cxr", tmp_path, common={"n_patients": 20, "image_size": 64, "n_folds": 2,
                                         "test_fraction": 0.25, "val_fraction": 0.25, "views": "PA"})
    assert skipped == ["views"]
    assert manifest.table["patient_id"].nunique() == 20
    with pytest.raises(ManifestError, match="generated, it reads no data root"):
        build_from_notebook("phantom_cxr", tmp_path, data_root=tmp_path)
    with pytest.raises(ManifestError, match=r"does not take parameter\(s\) \['bogus'\]"):
        build_from_notebook("phantom_cxr", tmp_path, extra={"bogus": 1})
