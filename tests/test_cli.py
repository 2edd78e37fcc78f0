"""The `sm` command line: help, validation, dry run, a full (stand-in) grid with notebook 04."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from sm_utils.cli import main

ROOT = Path(__file__).resolve().parents[1]
FAKE_NOTEBOOK = ROOT / "tests" / "fixtures" / "fake_fine_tuning.ipynb"


def fake_grid(folder: Path) -> Path:
    (folder / "manifest.csv").write_text("image_id\n")
    spec = {
        "name": "clitest", "root": ".", "runs_dir": "runs/clitest", "figures_dir": "figs",
        "datasets": [{"name": "phantom_cxr", "manifest": "manifest.csv"}],
        "confounders": ["tag"], "prevalences": [0, 1], "folds": 2, "sources": ["imagenet_lite0", "random"],
        "notebooks": {"fine_tuning": str(FAKE_NOTEBOOK), "analysis": str(ROOT / "notebooks/04_analysis.ipynb")},
    }
    path = folder / "grid.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for command in ("run", "validate", "analyse", "check-splits", "list"):
        assert command in text
    out = subprocess.run([sys.executable, "-m", "sm_utils", "run", "--help"], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    assert "--dry-run" in out and "--executor {local,slurm}" in out and "--workers" in out


def test_validate_paper_configs_names_missing_weights(capsys, tmp_path):
    # the paper's weights, where a clone puts them, are absent here (a fresh clone's state)
    override = tmp_path / "weights_here.yaml"
    override.write_text(yaml.safe_dump({"sources": [
        {"name": "imagenet_keras", "weights": str(tmp_path / "resnet50_notop.h5")},
        {"name": "radimagenet", "weights": str(tmp_path / "RadImageNet-ResNet50_notop.h5")}]}))
    code = main(["validate", str(ROOT / "configs/paper_ct.yaml"), "--override", str(override)])
    err = capsys.readouterr().err
    assert code == 2
    assert f"weights file {tmp_path / 'RadImageNet-ResNet50_notop.h5'} does not exist" in err
    assert f"weights file {tmp_path / 'resnet50_notop.h5'} does not exist" in err  # every one


def test_paper_cxr_cell_count(capsys):
    assert main(["validate", str(ROOT / "configs/paper_cxr.yaml"), "--no-check-paths"]) == 0
    # 3 confounders on the main task + sex on the sex task, 6 p, 5 folds, 3 sources
    assert "valid; 360 cells" in capsys.readouterr().out


@pytest.mark.slow
def test_dry_run_then_run_then_analyse(tmp_path, capsys):
    path = fake_grid(tmp_path)
    assert main(["run", str(path), "--no-check-names", "--dry-run"]) == 0
    listing = capsys.readouterr().out
    assert "8 cells (0 done, 0 failed, 0 partial, 8 pending)" in listing
    assert listing.count("pending") == 9  # the header count and one per cell

    assert main(["run", str(path), "--no-check-names", "--workers", "1", "--progress", "off"]) == 0
    out = capsys.readouterr().out
    assert "8 run now, 0 failed" in out and "overhead share" in out
    figures = tmp_path / "figs"
    assert f"{figures / 'clitest_auc_vs_p.png'}" in out and f"{figures / 'clitest_auc_vs_p.pdf'}" in out
    assert (figures / "clitest_auc_vs_p.png").stat().st_size > 1000
    results = pd.read_csv(tmp_path / "runs/clitest/results.csv")
    assert len(results) == 8 * 3 and set(results["test_set"]) == {"iid", "ood", "clean"}
    comparisons = pd.read_csv(tmp_path / "runs/clitest/comparisons.csv")
    assert len(comparisons) == 2 * 3  # 2 p x 3 test sets, one pair of sources
    assert (tmp_path / "runs/clitest/04_analysis.ipynb").exists()
    report = yaml.safe_load((tmp_path / "runs/clitest/grid_report.json").read_text())
    assert report["succeeded"] == 8 and report["failures"] == []
    # the analysis step checked the paper's claims: no in-domain source here, 2 folds
    claims = pd.read_csv(tmp_path / "runs/clitest/claims.csv", dtype={"claim": str})
    assert (tmp_path / "runs/clitest/claims.md").read_text().startswith("# The paper's claims")
    claim2 = claims[claims["claim"] == "2"].iloc[0]
    assert claim2["verdict"] == "not testable here" and "in_domain" in claim2["why"]
    claim5b = claims[(claims["claim"] == "5b") & (claims["measure"] == "fall vs ImageNet")]
    assert list(claim5b["sources"]) == ["imagenet_lite0 vs random"]
    assert list(claim5b["verdict"]) == ["cannot tell with these folds"]
    assert list(claim5b["min_p"]) == [0.25]
    capsys.readouterr()
    assert main(["claims", str(tmp_path / "runs/clitest"), "--format", "csv"]) == 0
    assert "imagenet_lite0 vs random" in capsys.readouterr().out

    assert main(["run", str(path), "--no-check-names", "--dry-run"]) == 0
    assert "8 cells (8 done, 0 failed, 0 partial, 0 pending)" in capsys.readouterr().out

    assert main(["analyse", str(tmp_path / "runs/clitest"), "--figures-dir", str(tmp_path / "again"),
                 "--permutations", "99"]) == 0
    assert (tmp_path / "again" / "clitest_auc_vs_p.pdf").exists()

    # each run says where it trained; a condition whose runs disagree is refused
    assert set(results["device"]) == {"cpu"} and set(results["precision"]) == {"fp32"}
    resumed = results.loc[results["p"] == results["p"].max(), "run_id"].iloc[0]
    metrics_path = tmp_path / "runs/clitest" / resumed / "metrics.json"
    metrics = json.loads(metrics_path.read_text())
    metrics["ran_on"] = {"device": "cuda", "gpu": "NVIDIA H100", "precision": "bf16",
                         "deterministic": False}  # as the run would have been resumed on a GPU
    metrics_path.write_text(json.dumps(metrics))
    capsys.readouterr()
    assert main(["analyse", str(tmp_path / "runs/clitest"), "--figures-dir", str(tmp_path / "mixed"),
                 "--permutations", "99"]) != 0
    err = capsys.readouterr().err
    assert "mixes devices/precisions" in err and "3 run(s) on cpu/fp32, 1 run(s) on cuda/bf16" in err
    assert resumed in err and not (tmp_path / "mixed").exists()


def test_check_splits_reports_leaks(tmp_path, capsys):
    from sm_utils.datasets import build_dataset

    build_dataset("phantom_cxr", tmp_path / "d", n_patients=20, image_size=64, n_folds=2)
    manifest = tmp_path / "d" / "manifest.csv"
    assert main(["check-splits", str(manifest)]) == 0
    assert "no patient appears in two of train, val and test" in capsys.readouterr().out

    # one image of a test patient moved to training in fold 0: that patient leaks
    table = pd.read_csv(manifest, dtype=str)
    test_patients = table.loc[table["fold_0"] == "test", "patient_id"]
    leaky = test_patients.value_counts().index[0]
    assert (table["patient_id"] == leaky).sum() >= 2, "the phantom has a test patient with 2+ images"
    row = table.index[(table["patient_id"] == leaky)][0]
    table.loc[row, "fold_0"] = "train"
    table.to_csv(manifest, index=False)
    code = main(["check-splits", str(manifest)])
    out = capsys.readouterr().out
    assert code == 1  # found and reported by the check, with the split summary
    assert f"fold_0: 1 patient(s) in more than one split: {leaky} (test+train)" in out
    assert "role" in out and "images" in out


@pytest.mark.slow
def test_a_cell_failing_outside_its_notebook_is_summarised_by_its_exception(tmp_path, capsys,
                                                                              monkeypatch):
    import shutil
    import threading
    import time

    path = fake_grid(tmp_path)
    monkeypatch.setenv("SM_FAKE_SLEEP_S", "1.5")
    executing = tmp_path / "runs/clitest/.executing"

    def remove_the_output_folder():  # while the first cell runs, as a careless cleanup would
        deadline = time.monotonic() + 60
        while not list(executing.glob("*.ipynb")) and time.monotonic() < deadline:
            time.sleep(0.05)
        shutil.rmtree(executing, ignore_errors=True)

    thread = threading.Thread(target=remove_the_output_folder)
    thread.start()
    code = main(["run", str(path), "--no-check-names", "--workers", "1", "--progress", "off",
                 "--no-analysis"])
    thread.join()
    out = capsys.readouterr().out
    assert code == 1
    failed = [line for line in out.splitlines() if line.strip().startswith("FAILED")]
    assert len(failed) == 1
    assert "FileNotFoundError" in failed[0] and "doesn't exist" in failed[0]
    assert "Traceback (most recent call last)" not in failed[0]
    report = json.loads((tmp_path / "runs/clitest/grid_report.json").read_text())
    assert report["failed_cells"][0]["error"].startswith("FileNotFoundError")
    assert main(["run", str(path), "--no-check-names", "--dry-run"]) == 0
    listing = capsys.readouterr().out
    assert "1 failed" in listing and "FileNotFoundError" in listing


@pytest.mark.slow
def test_a_tiny_grid_prints_no_warning(tmp_path):
    path = fake_grid(tmp_path)
    result = subprocess.run([sys.executable, "-m", "sm_utils", "run", str(path), "--no-check-names",
                             "--workers", "1", "--progress", "off"], capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    output = result.stdout + result.stderr
    assert "8 run now, 0 failed" in output
    assert [line for line in output.splitlines() if "warning" in line.lower()] == []


@pytest.mark.slow
def test_a_failed_preparation_ends_in_one_line_naming_the_step_and_cause(tmp_path):
    spec = yaml.safe_load(fake_grid(tmp_path).read_text())
    spec["datasets"] = [{"name": "phantom_cxr", "manifest": "built/manifest.csv",
                         "params": {"image_size": 32, "n_patients": 20}}]
    spec["notebooks"] = {"fine_tuning": str(FAKE_NOTEBOOK),  # the real notebook 01 builds data
                         "data": str(ROOT / "notebooks/01_data_preparation.ipynb")}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(spec))
    command = [sys.executable, "-m", "sm_utils", "run", str(path), "--no-check-names", "--progress",
               "off"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: building dataset 'phantom_cxr' failed: ManifestError:")
    assert "image size must be an integer from 64 to 1024 px; got 32" in lines[0]
    assert f"full traceback: {tmp_path / 'runs/clitest/_prepare/01_phantom_cxr.ipynb'}" in lines[0]
    debug = subprocess.run([*command, "--debug"], capture_output=True, text=True, timeout=300,
                           check=False)
    assert debug.returncode != 0 and "Traceback (most recent call last)" in debug.stderr


def test_validate_reports_every_problem_of_a_grid_file_at_once(tmp_path, capsys):
    spec = yaml.safe_load(fake_grid(tmp_path).read_text())
    spec.update(prevalences=[0, 1.5], confounders=["tagg"], sources=["random", "imagenett"])
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "prevalences must lie in [0, 1]; found [1.5]" in err
    assert "unknown confounders ['tagg']" in err and "unknown sources ['imagenett']" in err


def test_sm_notebook_runs_one_notebook_with_parameters_and_no_warning(tmp_path):
    import nbformat

    notebook = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('size = 2\nnames = ["a"]')
    params.metadata["tags"] = ["parameters"]
    notebook.cells = [params, nbformat.v4.new_code_cell('print(f"{size * 10} {names}")'),
                      nbformat.v4.new_code_cell('assert size < 100, f"size {size} too large"')]
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                       "language": "python"}
    path = tmp_path / "nb.ipynb"
    nbformat.write(notebook, path)
    out = tmp_path / "out" / "nb.ipynb"
    run = lambda *extra: subprocess.run(
        [sys.executable, "-m", "sm_utils", "notebook", str(path), str(out), *extra],
        capture_output=True, text=True, timeout=300, check=False)
    result = run("-p", "size", "7", "-p", "names", "[x, y]")
    assert result.returncode == 0, result.stderr[-2000:]
    printed = "".join("".join(o.get("text", "")) for c in nbformat.read(out, 4).cells
                      for o in c.get("outputs", []))
    assert "70 ['x', 'y']" in printed  # values read as YAML: an int and a list
    output = result.stdout + result.stderr
    assert [line for line in output.splitlines() if "warning" in line.lower()] == []
    failed = run("-p", "size", "500")
    assert failed.returncode == 1
    assert "AssertionError: size 500 too large" in failed.stderr and str(out) in failed.stderr
    assert len(failed.stderr.strip().splitlines()) == 1  # one line, no traceback
