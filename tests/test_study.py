"""A study of one's own, outside the checkout: its plugin (a confounder, a source loaded from a
local weights file, a dataset built from a table, a metric) used by `sm validate`, `sm run`
(local executor, 2 workers), `sm analyse` and `sm report`, as a user runs them; editing the
plugin changes the affected run ids; a broken plugin stops `sm run` before any cell.

The grid is tiny (40 phantom patients, 32 px, 1 epoch, a 100k-parameter timm model): one
module-scoped study, built and run once, serves the tests that read its results.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SM = str(Path(sys.executable).parent / "sm")
ARCH = "test_efficientnet"  # timm's 100k-parameter test model: seconds per run on a CPU

PLUGIN = '''
"""Burned-in text: the radiology department of one hospital stamps its name into the corner of
every film, and that hospital takes the sickest patients."""
from pathlib import Path

import numpy as np

from sm_utils.confounders import register_confounder
from sm_utils.datasets.table import build_table
from sm_utils.datasets import register_dataset
from sm_utils.metrics import register_metric
from sm_utils.sources import Source, SourceError, default_preprocessing, register_source
from sm_utils.sources import read_state_dict, strip_prefix


@register_confounder("burned_text", category="environment/marker",
                     description="A hospital's name burned into the top-left corner of the film.")
def burned_text(image, rng, *, strength):
    out = image.astype(np.float32)
    h, w = image.shape
    box = out[1:max(2, h // 8), 1:max(2, w // 3)]
    box += strength * (255 - box)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _find(arch, weights):
    if weights is None or not Path(weights).is_file():
        raise SourceError(f"source 'ward_ssl' needs weights= its checkpoint file; found {weights}")
    return Path(weights)


def _load(model, path, cache_dir):
    state, _ = read_state_dict(path)
    return strip_prefix(state, "encoder.")   # the checkpoint's own key prefix


register_source(Source(
    name="ward_ssl", default_arch="test_efficientnet", archs=("test_efficientnet",),
    provenance="The ward's self-supervised checkpoint (a local file).",
    find_weights=_find, load=_load, preprocessing=lambda arch, path: default_preprocessing(arch)))


@register_dataset("ward_cxr")
def ward_cxr(out_dir, root, table="findings.csv", n_folds=2, seed=0, test_fraction=0.2,
             val_fraction=0.1):
    """The ward's radiographs from its findings table (File, Finding, PatientID, Sex)."""
    return build_table(out_dir, root=root, table=table, path_column="File",
                       label_column="Finding", positive="atelectasis", negative="no finding",
                       patient_column="PatientID", attributes={"Sex": "sex"}, name="ward_cxr",
                       n_folds=n_folds, seed=seed, test_fraction=test_fraction,
                       val_fraction=val_fraction)


@register_metric("sensitivity_at_half", description="Positives scored above 0.5.")
def sensitivity_at_half(labels, scores):
    return float((scores[labels == 1] > 0.5).mean())
'''


def grid_yaml(data: Path, **changes) -> dict:
    spec = {
        "name": "ward", "root": ".", "runs_dir": "runs", "figures_dir": "figures",
        "plugins": ["plugins.py"],
        "datasets": [{"name": "ward", "builder": "ward_cxr", "manifest": "data/ward/manifest.csv",
                      "params": {"data_root": str(data), "n_folds": 2, "seed": 0}}],
        "confounders": ["burned_text"],
        "prevalences": [0, 1], "folds": 2, "seeds": [812],
        "sources": [{"name": "ward_ssl", "weights": "weights/ward_ssl.safetensors"}, "random"],
        "architectures": [ARCH],
        "training": {"image_size": 32, "epochs": 1, "batch_size": 16, "patience": 1,
                     "augment": False, "drop_rate": 0.2},
        "run": {"device": "cpu", "workers": 2, "threads_per_worker": 1},
    }
    spec.update(changes)
    return spec


def sm(*args, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    start = time.perf_counter()
    done = subprocess.run([SM, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={k: v for k, v in os.environ.items()
                                                if k != "SM_PLUGINS"}, check=False)
    done.seconds = time.perf_counter() - start
    return done


def make_study(folder: Path) -> Path:
    """The ward's table of images, its checkpoint, its plugin and its grid, in ``folder``."""
    import torch
    from safetensors.torch import save_file

    from sm_utils.datasets import build_dataset
    from sm_utils.sources import make_architecture

    data = folder / "hospital"
    build_dataset("phantom_cxr", data, n_patients=40, image_size=64, seed=5, n_folds=2,
                  difficulty=0.15)
    rows = pd.read_csv(data / "manifest.csv")
    pd.DataFrame({"File": rows["path"], "PatientID": rows["patient_id"], "Sex": rows["sex"],
                  "Finding": rows["label"].map({1: "atelectasis", 0: "no finding"})}
                 ).to_csv(data / "findings.csv", index=False)
    (data / "manifest.csv").unlink()  # the builder reads the table, nothing else
    torch.manual_seed(0)
    model = make_architecture(ARCH, num_classes=2)
    (folder / "weights").mkdir()
    save_file({f"encoder.{k}": v.contiguous() for k, v in model.state_dict().items()},
              str(folder / "weights" / "ward_ssl.safetensors"))
    (folder / "plugins.py").write_text(textwrap.dedent(PLUGIN))
    grid = folder / "grid.yaml"
    grid.write_text(yaml.safe_dump(grid_yaml(data), sort_keys=False))
    return grid


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ward_study")
    assert ROOT not in folder.resolve().parents
    grid = make_study(folder)
    out = {"folder": folder, "grid": grid}
    out["validate_before"] = sm("validate", grid, "--no-check-paths", cwd=folder)
    out["run"] = sm("run", grid, "--workers", "2", "--progress", "off", cwd=folder)
    out["validate"] = sm("validate", grid, cwd=folder)
    out["analyse"] = sm("analyse", grid, "--permutations", "99", cwd=folder)
    out["report"] = sm("report", grid, folder / "kit", "--permutations", "99", cwd=folder)
    return out


def _runs(folder: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text())
            for p in sorted((folder / "runs").glob("*/config.json"))}


@pytest.mark.numerics
def test_sm_run_uses_the_study_s_confounder_source_and_dataset(study):
    run = study["run"]
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "local executor: 2 worker(s)" in run.stdout
    configs = _runs(study["folder"])
    assert len(configs) == 8            # burned_text x 2 p x 2 folds x (ward_ssl, random)
    assert {c["config"]["source"] for c in configs.values()} == {"ward_ssl", "random"}
    assert {c["confounder"]["name"] for c in configs.values()} == {"burned_text"}
    assert {c["manifest"]["meta"].get("dataset") for c in configs.values()} == {"ward_cxr"}
    ward = next(c for c in configs.values() if c["config"]["source"] == "ward_ssl")
    weights = study["folder"] / "weights" / "ward_ssl.safetensors"
    assert ward["source"]["weights"] == str(weights)
    assert ward["source"]["provenance"].startswith("The ward's self-supervised checkpoint")
    [plugin] = ward["plugins"]
    assert plugin["file"] == str(study["folder"] / "plugins.py") and plugin["how"] == "file"
    assert plugin["sha256"] == __import__("hashlib").sha256(
        (study["folder"] / "plugins.py").read_bytes()).hexdigest()
    assert plugin["registers"] == ["confounder:burned_text", "dataset:ward_cxr",
                                   "metric:sensitivity_at_half", "source:ward_ssl"]
    assert len(ward["identity"]["plugin_code"]["confounder"]) == 64
    assert set(ward["identity"]["plugin_code"]) == {"confounder", "source"}


@pytest.mark.numerics
def test_the_burned_in_text_reaches_the_training_images(study):
    """p = 1: every positive training image carries the confounder; p = 0: none does."""
    sizes = {c["config"]["p"]: c["split_sizes"]["train"] for c in _runs(study["folder"]).values()}
    assert sizes[1.0]["n_confounded"] == sizes[1.0]["n_pos"] > 0
    assert sizes[0.0]["n_confounded"] == 0


@pytest.mark.numerics
def test_validate_analyse_and_report_load_the_plugin(study):
    before = study["validate_before"]
    assert before.returncode == 0 and "valid; 8 cells" in before.stdout, before.stderr
    assert study["validate"].returncode == 0, study["validate"].stderr
    analyse = study["analyse"]
    assert analyse.returncode == 0, analyse.stderr[-3000:]
    results = pd.read_csv(study["folder"] / "runs" / "results.csv")
    # the plugin's metric: a column computed from each run's predictions
    predictions = pd.concat(pd.read_csv(p).assign(run_id=p.parent.name)
                            for p in (study["folder"] / "runs").glob("*/predictions.csv"))
    mine = predictions[predictions.label == 1].groupby(["run_id", "test_set"])["score"].apply(
        lambda s: float((s > 0.5).mean()))
    table = results.set_index(["run_id", "test_set"])["sensitivity_at_half"]
    assert len(table) == len(mine) > 0
    assert (table.sort_index() - mine.sort_index()).abs().max() < 1e-12
    report = study["report"]
    assert report.returncode == 0, report.stderr[-3000:]
    methods = (study["folder"] / "kit" / "methods.md").read_text()
    assert f"plugin `{study['folder'] / 'plugins.py'}` (file;" in methods
    assert "registers confounder:burned_text, dataset:ward_cxr" in methods


@pytest.mark.numerics
def test_editing_the_plugin_s_confounder_changes_the_affected_run_ids(study, tmp_path):
    """A copy of the study with the built-in tag beside the plugin's confounder: after editing
    burned_text, the cells that use the plugin's code (its confounder, or its source from the
    same file) are new runs; tag x random keeps its id; the old run directories stay."""
    folder = tmp_path / "copy"
    shutil.copytree(study["folder"], folder, ignore=shutil.ignore_patterns("kit", "figures"))
    data = Path(yaml.safe_load(study["grid"].read_text())["datasets"][0]["params"]["data_root"])
    (folder / "grid.yaml").write_text(yaml.safe_dump(grid_yaml(
        data, confounders=["burned_text", {"name": "tag", "params": {"resolution": "input"}}])))

    def ids() -> dict[tuple, tuple]:
        done = sm("run", folder / "grid.yaml", "--dry-run", cwd=folder)
        assert done.returncode == 0, done.stderr
        lines = [line.split() for line in done.stdout.splitlines()[2:] if line.strip()]
        # run_id dataset confounder strength p fold source arch seed status
        return {(x[2], x[4], x[5], x[6]): (x[0], x[-1]) for x in lines if len(x) == 10}

    before = ids()
    assert len(before) == 16
    assert {v[1] for k, v in before.items() if k[0] == "burned_text"} == {"done"}
    plugin = folder / "plugins.py"
    plugin.write_text(plugin.read_text().replace("box += strength * (255 - box)",
                                                 "box += strength * (200 - box)"))
    after = ids()
    assert after.keys() == before.keys()
    for key in before:
        changed = before[key][0] != after[key][0]
        assert changed == (key[0] == "burned_text" or key[3] == "ward_ssl"), key
    assert {v[1] for k, v in after.items() if k[0] == "burned_text"} == {"pending"}
    old = [before[k][0] for k in before if k[0] == "burned_text"]
    assert all((folder / "runs" / run_id / "metrics.json").exists() for run_id in old)


def test_a_plugin_with_a_syntax_error_stops_sm_run_before_any_cell(tmp_path):
    (tmp_path / "plugins.py").write_text("import numpy\n\n\ndef burned_text(image\n    pass\n")
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump(grid_yaml(tmp_path)))
    done = sm("run", grid, "--workers", "2", "--progress", "off", cwd=tmp_path)
    assert done.returncode == 2
    assert f"SyntaxError at {tmp_path / 'plugins.py'}:4" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "data").exists()


def test_a_plugin_path_that_does_not_resolve_is_named(tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump(grid_yaml(tmp_path, plugins=["study/markers.py"])))
    done = sm("validate", grid, cwd=tmp_path)
    assert done.returncode == 2
    assert f"plugin file {tmp_path / 'study' / 'markers.py'} (named in grid file {grid})" \
        f" does not exist" in done.stderr
