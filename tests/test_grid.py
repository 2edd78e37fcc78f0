"""Grid specification, cells and resumable execution, with a stand-in for notebook 03.

The stand-in (tests/fixtures/fake_fine_tuning.ipynb) takes notebook 03's parameters and writes
a run directory in the contract's schema without torch, so these tests check the grid
machinery (papermill, warm kernels, workers, submitit, resume) in seconds.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from sm_utils.analysis import collect_results
from sm_utils.grid import (
    GridError,
    check_gpus_usable,
    check_slurm_gpus,
    detect_gpus,
    dry_run,
    expand_cells,
    load_grid,
    parse_grid,
    run_grid,
    run_id_for,
)

FIXTURES = Path(__file__).parent / "fixtures"
FAKE_NOTEBOOK = FIXTURES / "fake_fine_tuning.ipynb"
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def write_grid(folder: Path, **overrides) -> Path:
    """A small grid (2 confounders x 2 p x 2 folds x 2 sources = 16 cells) run by the stand-in."""
    (folder / "manifest.csv").write_text("image_id\n")
    spec = {
        "name": "fake",
        "root": ".",
        "runs_dir": "runs/fake",
        "datasets": [{"name": "phantom_cxr", "manifest": "manifest.csv"}],
        "confounders": ["tag", "lowpass"],
        "prevalences": [0, 1],
        "folds": 2,
        "sources": ["imagenet_lite0", "random"],
        "training": {"image_size": 32, "epochs": 1},
        "notebooks": {"fine_tuning": str(FAKE_NOTEBOOK), "analysis": "no_analysis.ipynb"},
        "run": {"cells_per_kernel": 100},
    }
    spec.update(overrides)
    path = folder / "grid.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def results_without_ids(runs_dir: Path) -> pd.DataFrame:
    return collect_results(runs_dir)


# --------------------------------------------------------------------------- specification


def test_unknown_names_are_listed_with_the_valid_ones(tmp_path):
    path = write_grid(tmp_path, confounders=["tagg", "lowpass"], sources=["imagenett"])
    with pytest.raises(GridError) as info:
        load_grid(path, check_paths=False)
    message = str(info.value)
    assert "unknown confounders ['tagg']" in message
    assert "unknown sources ['imagenett']" in message
    # valid names are listed so the user can fix the typo
    assert "tag" in message.split("unknown confounders")[1] and "imagenet_lite0" in message


def test_missing_weights_are_named_unless_paths_are_not_checked(tmp_path):
    path = write_grid(tmp_path, sources=[{"name": "radimagenet", "weights": "weights/RadImageNet.h5"}])
    with pytest.raises(GridError, match=r"weights file .*weights/RadImageNet.h5 does not exist"):
        load_grid(path)
    spec = load_grid(path, check_paths=False)
    assert spec.sources[0].weights == (tmp_path / "weights/RadImageNet.h5").resolve()


def test_structural_problems_are_all_reported_at_once(tmp_path):
    path = write_grid(tmp_path, prevalences=[0, 1.5], training={"epochz": 3}, colour="red")
    with pytest.raises(GridError) as info:
        load_grid(path, check_names=False, check_paths=False)
    message = str(info.value)
    assert "3 problem(s)" in message
    assert "[1.5]" in message and "'epochz'" in message and "'colour'" in message


def test_cells_cover_the_product_with_unique_stable_ids(tmp_path):
    spec = load_grid(write_grid(tmp_path), check_names=False)
    cells = expand_cells(spec)
    assert len(cells) == 2 * 2 * 2 * 2
    assert len({c.run_id for c in cells}) == 16
    assert [c.run_id for c in cells] == [c.run_id for c in expand_cells(spec)]
    first = cells[0].params
    assert first["runs_dir"] == str(tmp_path.resolve() / "runs/fake")
    assert first["image_size"] == 32 and first["epochs"] == 1 and first["seed"] == 812


def test_confounder_restricted_to_a_dataset_and_none_deduplicated(tmp_path):
    raw = yaml.safe_load(write_grid(tmp_path).read_text())
    raw["datasets"] = [{"name": "a", "manifest": "a/manifest.csv"}, {"name": "b", "manifest": "b/manifest.csv"}]
    raw["confounders"] = ["none", {"name": "sex", "datasets": ["b"]}]
    spec = parse_grid(raw, tmp_path)
    cells = expand_cells(spec)
    # none: p does not matter -> 2 folds x 2 sources per dataset; sex only on b: 2 p x 2 x 2
    assert sum(c.params["confounder"] == "none" for c in cells) == 2 * 2 * 2
    assert {c.dataset for c in cells if c.params["confounder"] == "sex"} == {"b"}
    assert sum(c.params["confounder"] == "sex" for c in cells) == 8


def test_run_ids_follow_the_fine_tuning_rule(tmp_path):
    from sm_utils import runs

    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"some weights")
    spec = load_grid(write_grid(tmp_path, sources=["random", {"name": "file", "arch": "resnet18",
                                                              "weights": str(weights)}]),
                     check_names=False)
    cells = expand_cells(spec)[::3]
    none = dict(cells[0].params, confounder="none", p=1, strength=2.0)  # p ignored without one
    variants = [c.params for c in cells] + [none, dict(none, weights="", epochs=3.0, augment=1)]
    for params in variants:
        assert run_id_for(params) == runs.RunConfig(**params).run_id
    assert run_id_for(none) == run_id_for(dict(none, p=0.0, strength=0.0))


def clone_grid(folder: Path, manifest_text: str = "image_id\nim0\n") -> Path:
    """The test grid as it would be in a clone at ``folder``: same files, another path."""
    folder.mkdir(parents=True)
    path = write_grid(folder)
    (folder / "manifest.csv").write_text(manifest_text)
    (folder / "manifest.meta.json").write_text(json.dumps({"root": str(folder), "seed": 1}))
    return path


def test_run_ids_are_equal_across_clones_at_different_paths(tmp_path):
    first = expand_cells(load_grid(clone_grid(tmp_path / "a"), check_names=False))
    second = expand_cells(load_grid(clone_grid(tmp_path / "elsewhere" / "b"), check_names=False))
    assert [c.run_id for c in first] == [c.run_id for c in second]
    assert first[0].run_dir != second[0].run_dir  # each clone keeps its runs in its own folder
    # the manifest's path and root are not part of a run's identity; its content is
    assert all(str(tmp_path) not in json.dumps(c.run_id) for c in first)


@pytest.mark.slow
def test_a_rebuilt_manifest_with_other_content_makes_its_cells_run_again(tmp_path):
    path = clone_grid(tmp_path / "a")
    spec = load_grid(path, check_names=False)
    report = run_grid(spec, workers=1, analyse=False, progress=False, check=False)
    assert report.succeeded == 16
    (tmp_path / "a" / "manifest.csv").write_text("image_id\nim0\nim1\n")  # rebuilt, changed
    rebuilt = expand_cells(spec)
    assert not any(c.done for c in rebuilt)
    again = run_grid(spec, workers=1, analyse=False, progress=False, check=False)
    assert again.already_done == 0 and again.succeeded == 16
    # the same content again: the first runs count as done, nothing reruns
    (tmp_path / "a" / "manifest.csv").write_text("image_id\nim0\n")
    assert all(c.done for c in expand_cells(spec))


def test_training_modes_are_an_axis_and_a_fine_tuning_cell_keeps_its_parameters(tmp_path):
    finetune = expand_cells(load_grid(write_grid(tmp_path), check_names=False))
    both = expand_cells(load_grid(write_grid(tmp_path, training={
        "image_size": 32, "epochs": 1, "mode": ["finetune", "linear_probe"]}), check_names=False))
    assert len(both) == 2 * len(finetune)
    # the fine-tuning cells are the grid's without modes, parameters and ids alike
    assert [c.params for c in both if "mode" not in c.params] == [c.params for c in finetune]
    probes = [c for c in both if c.params.get("mode") == "linear_probe"]
    assert len(probes) == len(finetune) and "linear_probe" in probes[0].label()
    assert not {c.run_id for c in probes} & {c.run_id for c in finetune}
    one = load_grid(write_grid(tmp_path, training={"mode": "linear_probe"}), check_names=False)
    assert one.modes == ["linear_probe"]
    # the cell index (cells.csv, --dry-run) names the mode only in a grid that probes
    from sm_utils.grid.cells import cells_table

    assert "mode" not in cells_table(finetune).columns
    assert cells_table(both)["mode"].value_counts().to_dict() == {"finetune": len(finetune),
                                                                  "linear_probe": len(finetune)}


def test_bad_modes_builds_and_role_arms_are_refused(tmp_path):
    path = write_grid(tmp_path, training={"mode": ["finetune", "frozen"]},
                      sources=["random", {"name": "imagenet_lite0", "weights": "w.safetensors",
                                          "build": {"script": "make.py"}}],
                      claims={"roles": {"imagenet": "imagenet_lite0:linear_probe"}})
    with pytest.raises(GridError) as info:
        load_grid(path, check_names=False, check_paths=False)
    message = str(info.value)
    assert "training.mode: one of ['finetune', 'linear_probe']" in message and "'frozen'" in message
    assert "build must name one 'notebook' (a path) or one 'function'" in message
    # a linear probe's arm is a role's only where the grid probes
    assert "'imagenet_lite0:linear_probe' is not an arm of this grid" in message
    fine = write_grid(tmp_path, training={"mode": ["finetune", "linear_probe"]},
                      claims={"roles": {"imagenet": "imagenet_lite0:linear_probe"}})
    assert load_grid(fine, check_names=False).claims["roles"]["imagenet"].endswith(":linear_probe")


def test_a_source_is_built_by_a_function_named_in_the_grid(tmp_path):
    from sm_utils.grid import prepare
    from sm_utils.identity import weights_digest

    build = {"function": "sm_utils.sources.stand_ins:save_random_source",
             "parameters": {"out": "{weights}", "file_format": "transformers", "image_size": 16,
                            "patch_size": 8, "width": 8, "depth": 1, "heads": 2}}
    path = write_grid(tmp_path, sources=[{"name": "rad_dino", "weights": "dino", "build": build}])
    spec = load_grid(path, check_names=False)
    prepare(spec, log=lambda message: None)
    folder = tmp_path / "dino"
    assert {p.name for p in folder.iterdir()} == {"config.json", "model.safetensors",
                                                   "preprocessor_config.json"}
    assert json.loads((folder / "config.json").read_text())["hidden_size"] == 8
    # a folder of weights is named by its files' content
    digest = weights_digest(folder)
    assert len(digest) == 64 and weights_digest(folder) == digest
    (folder / "preprocessor_config.json").write_text("{}")
    assert weights_digest(folder) != digest
    spec.sources[0].build = {"function": "sm_utils.sources.stand_ins:no_such_function"}
    import shutil

    shutil.rmtree(folder)
    with pytest.raises(GridError, match="build function 'sm_utils.sources.stand_ins:no_such"):
        prepare(spec, log=lambda message: None)


@pytest.mark.parametrize("name", ["demo.yaml", "paper_cxr.yaml", "paper_ct.yaml",
                                  "foundation_cxr.yaml", "foundation_demo.yaml"])
def test_shipped_configs_validate(name):
    spec = load_grid(CONFIGS / name, check_paths=False)
    cells = expand_cells(spec)
    assert len(cells) > 0
    if name.startswith("paper"):
        assert spec.prevalences == [0.0, 0.1, 0.2, 0.5, 0.8, 1.0]
        assert len(spec.folds) == 5
        # the paper's three arms, all one Keras ResNet50
        assert {s.name for s in spec.sources} == {"imagenet_keras", "radimagenet", "random"}
        from sm_utils.sources import check_source_arch

        assert {check_source_arch(c.params["source"], c.params["arch"]) for c in cells} == {
            "keras_resnet50"}
        assert spec.training["resize"] == "nearest" and spec.training["drop_rate"] == 0.5
        # the paper trained in float32: every cell asks for fp32, not the GPU default of bf16
        assert {c.params.get("precision") for c in cells} == {"fp32"}
    elif name.startswith("foundation"):  # every source fine-tuned and linearly probed
        assert spec.modes == ["finetune", "linear_probe"]
        assert spec.claims["roles"]["in_domain"] == "rad_dino"
        assert sum("mode" in c.params for c in cells) == len(cells) / 2
    else:
        assert {c.params.get("precision") for c in cells} == {None}  # auto, notebook 03's default


def test_grid_level_architectures_apply_only_to_sources_that_accept_them(tmp_path):
    raw = yaml.safe_load(write_grid(tmp_path).read_text())
    raw["sources"] = ["radimagenet", "random", {"name": "imagenet", "arch": "resnet50.tv_in1k"}]
    raw["architectures"] = ["resnet18"]
    spec = parse_grid(raw, tmp_path)
    archs = {(c.params["source"], c.params["arch"]) for c in expand_cells(spec)}
    # radimagenet takes only keras_resnet50: its default; imagenet names its own
    assert archs == {("radimagenet", None), ("random", "resnet18"),
                     ("imagenet", "resnet50.tv_in1k")}


def test_override_files_merge_named_entries_and_replace_the_rest(tmp_path):
    base = write_grid(tmp_path, datasets=[{"name": "phantom_cxr", "manifest": "m.csv",
                                           "params": {"n_patients": 50, "seed": 1}}])
    override = tmp_path / "override.yaml"
    override.write_text(yaml.safe_dump({
        "runs_dir": "elsewhere/{name}", "prevalences": [0.5], "training": {"epochs": 9},
        "datasets": [{"name": "phantom_cxr", "params": {"n_patients": 8}},
                     {"name": "not_in_this_grid", "manifest": "x.csv"}],
        "sources": [{"name": "random", "arch": "resnet18"}]}))
    spec = load_grid(base, check_names=False, check_paths=False, overrides=[override])
    assert spec.runs_dir == tmp_path.resolve() / "elsewhere" / "fake"
    assert spec.prevalences == [0.5] and spec.training["epochs"] == 9
    assert spec.training["image_size"] == 32  # untouched keys stay
    assert [d.name for d in spec.datasets] == ["phantom_cxr"]  # unknown names are not added
    assert spec.datasets[0].params == {"n_patients": 8, "seed": 1}
    assert {s.name: s.arch for s in spec.sources} == {"imagenet_lite0": None, "random": "resnet18"}


# --------------------------------------------------------------------------- execution


@pytest.mark.slow
def test_failing_cell_is_recorded_and_the_rest_continues(tmp_path, monkeypatch):
    monkeypatch.setenv("SM_FAKE_FAIL_SOURCE", "random")
    spec = load_grid(write_grid(tmp_path, confounders=["tag"]), check_names=False)
    report = run_grid(spec, workers=1, analyse=False, progress=False, check=False)
    cells = expand_cells(spec)
    failed = [c for c in cells if c.params["source"] == "random"]
    assert report.succeeded == 4 and len(report.failures) == 4
    for cell in failed:
        assert cell.status == "failed"
        assert "fake failure for source random" in (cell.run_dir / "error.txt").read_text()
        assert (cell.run_dir / "notebook.ipynb").exists()  # the executed notebook, with the error
    for cell in cells:
        if cell not in failed:
            assert cell.done and (cell.run_dir / "notebook.ipynb").exists()
    assert "FAILED" in report.summary() and "fake failure" in report.summary()
    listing = dry_run(spec)
    assert "4 done, 4 failed, 0 partial, 0 pending" in listing

    # Relaunched without the fault: only the failed cells run, and their error files go.
    monkeypatch.delenv("SM_FAKE_FAIL_SOURCE")
    report = run_grid(spec, workers=1, analyse=False, progress=False, check=False)
    assert report.already_done == 4 and report.succeeded == 4 and not report.failures
    assert all(c.done and not (c.run_dir / "error.txt").exists() for c in cells)


TWO_H100 = "GPU 0: NVIDIA H100 (UUID: GPU-0)\nGPU 1: NVIDIA H100 (UUID: GPU-1)\n"


def fake_nvidia_smi(folder: Path, listing: str = TWO_H100) -> dict[str, str]:
    """An environment whose nvidia-smi -L prints ``listing`` (default: two GPUs) on driver
    550.54.15 (torch here has no CUDA: as torch's default CUDA 13 wheel on a driver older than
    580)."""
    script = folder / "bin" / "nvidia-smi"
    script.parent.mkdir(parents=True)
    script.write_text('#!/bin/sh\ncase "$*" in\n  *driver_version*) printf "550.54.15\\n550.54.15\\n";;\n'
                      f"  *) cat <<'EOF'\n{listing}EOF\n;;\n"
                      'esac\n')
    script.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    env["PATH"] = f"{script.parent}{os.pathsep}{env['PATH']}"
    return env


@pytest.mark.parametrize("device", ["auto", "cuda"])
def test_gpus_torch_cannot_use_stop_the_grid_before_any_cell(tmp_path, device):
    path = write_grid(tmp_path, run={"device": device})
    env = fake_nvidia_smi(tmp_path)
    done = subprocess.run([sys.executable, "-m", "sm_utils", "run", str(path), "--no-analysis",
                           "--progress", "off"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 2, done.stdout + done.stderr
    consequence = "train every cell on the CPU" if device == "auto" else "fail every cell"
    assert re.search(r"nvidia-smi lists 2 GPU\(s\) \(driver 550\.54\.15\) but torch \S+ cannot "
                     rf"use them .*device '{device}' would {consequence}.*CUDA 12.*"
                     r"run\.device: cpu", done.stderr), done.stderr
    assert not (tmp_path / "runs").exists()  # stopped before any cell, any preparation


def test_bench_grid_measures_k_runs_on_one_gpu_of_a_multi_gpu_machine(tmp_path, monkeypatch):
    import importlib.util

    from sm_utils.grid import worker_environments

    env = fake_nvidia_smi(tmp_path)  # two GPUs
    monkeypatch.setenv("PATH", env["PATH"])
    # pin_to_one_gpu sets these in os.environ: recorded here so that they are undone after
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "FASTEST_FIRST")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "recorded")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert len(worker_environments("auto", None, runs_per_gpu=2)) == 4  # 2 per GPU, 2 GPUs
    spec = importlib.util.spec_from_file_location(
        "bench_grid", Path(__file__).resolve().parents[1] / "benchmarks/bench_grid.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.pin_to_one_gpu() == "0"
    workers = worker_environments("auto", None, runs_per_gpu=2)
    assert [w["CUDA_VISIBLE_DEVICES"] for w in workers] == ["0", "0"]  # k = 2 on GPU 0 only
    assert bench.pin_to_one_gpu("1") == "1"
    assert [w["CUDA_VISIBLE_DEVICES"] for w in worker_environments("auto", None, 2)] == ["1", "1"]


def test_slurm_refuses_runs_per_gpu_and_names_idle_gpus(tmp_path):
    spec = load_grid(write_grid(tmp_path, run={"runs_per_gpu": 2}), check_names=False)
    with pytest.raises(GridError, match=r"run\.runs_per_gpu=2 is not honoured by the slurm "
                                        r"executor.*array_parallelism"):
        run_grid(spec, executor="slurm", slurm_cluster="debug", analyse=False, progress=False,
                 check=False)
    assert not spec.runs_dir.exists()  # refused before any preparation or submission
    spec = load_grid(write_grid(tmp_path, slurm={"gpus_per_task": 4}), check_names=False)
    messages = []
    check_slurm_gpus(spec, messages.append)
    assert messages == [("slurm.gpus_per_task=4: a job runs its cells on its first GPU only, so 3 "
                         "will sit idle; set slurm.gpus_per_task: 1 and raise "
                         "slurm.array_parallelism for more runs at once")]


def test_mig_slices_count_as_devices_and_workers_get_their_uuids(tmp_path, monkeypatch):
    from sm_utils.grid import worker_environments

    env = fake_nvidia_smi(tmp_path, (  # GPU 0 split into two MIG slices, GPU 1 whole
        "GPU 0: NVIDIA A100-SXM4-40GB (UUID: GPU-5d1b0f7a-0000-0000-0000-000000000000)\n"
        "  MIG 3g.20gb     Device  0: (UUID: MIG-aaaa1111-0000-0000-0000-000000000000)\n"
        "  MIG 3g.20gb     Device  1: (UUID: MIG-bbbb2222-0000-0000-0000-000000000000)\n"
        "GPU 1: NVIDIA A100-SXM4-40GB (UUID: GPU-6e2c1a8b-0000-0000-0000-000000000000)\n"))
    monkeypatch.setenv("PATH", env["PATH"])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "recorded")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert detect_gpus() == 3
    workers = worker_environments("auto", None, runs_per_gpu=1)
    assert [w["CUDA_VISIBLE_DEVICES"] for w in workers] == [
        "MIG-aaaa1111-0000-0000-0000-000000000000", "MIG-bbbb2222-0000-0000-0000-000000000000",
        "1"]
    assert {w["CUDA_DEVICE_ORDER"] for w in workers} == {"PCI_BUS_ID"}  # "1" as nvidia-smi says
    assert [w["SM_RUNS_PER_GPU"] for w in worker_environments("auto", None, 2)] == ["2"] * 6
    # the grid's own GPU work (probes, memory check) runs in a child on the first worker's slice
    from sm_utils.grid import spawned_child

    with spawned_child("auto") as child:
        seen = child.submit(os.getenv, "CUDA_VISIBLE_DEVICES").result()
        assert seen == "MIG-aaaa1111-0000-0000-0000-000000000000"
        assert child.submit(os.getpid).result() != os.getpid()
    with spawned_child("cpu") as child:  # a CPU grid: the child is not pointed at a GPU
        assert child.submit(os.getenv, "CUDA_VISIBLE_DEVICES").result() is None


def test_source_probes_run_on_the_grids_device(tmp_path):
    from sm_utils.grid import probe_sources
    from sm_utils.training import TrainingError

    spec = load_grid(write_grid(tmp_path, probe=True, run={"device": "cuda"}), check_names=False)
    spec.runs_dir.mkdir(parents=True, exist_ok=True)
    # device cuda on a machine without one: the probe says so instead of probing on the CPU
    with pytest.raises(TrainingError, match="device='cuda' was asked for but no CUDA GPU"):
        probe_sources(spec, expand_cells(spec), log=lambda message: None)


def test_device_auto_without_a_gpu_says_so_once(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi
    messages = []
    check_gpus_usable("auto", messages.append)
    check_gpus_usable("cpu", messages.append)
    assert messages == ["device auto: no NVIDIA GPU here, every cell runs on the CPU"]


@pytest.mark.slow
def test_the_cell_after_a_failure_runs_in_a_fresh_kernel(tmp_path, monkeypatch):
    """A failed cell's traceback (sys.last_traceback) would keep its model and, on a GPU, its
    memory alive in the kernel: the next cell must not inherit it."""
    monkeypatch.setenv("SM_FAKE_FAIL_SOURCE", "random")
    spec = load_grid(write_grid(tmp_path, confounders=["tag"]), check_names=False)
    run_grid(spec, workers=1, analyse=False, progress=False, check=False)
    failed = {c.run_id for c in expand_cells(spec) if c.params["source"] == "random"}
    executions = [line.split() for line in
                  (spec.runs_dir / "executions.log").read_text().splitlines()]
    assert len(executions) == 8
    pairs = list(itertools.pairwise(executions))
    after_failure = [after[1] != before[1] for before, after in pairs if before[0] in failed]
    after_success = [after[1] == before[1] for before, after in pairs if before[0] not in failed]
    assert after_failure and all(after_failure)  # a new kernel process after each failure
    assert after_success and all(after_success)  # and the same one after a success


@pytest.mark.slow
def test_grid_killed_midway_resumes_to_the_uninterrupted_results(tmp_path):
    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    reference_dir.mkdir()
    killed_dir.mkdir()
    reference = load_grid(write_grid(reference_dir, folds=[0]), check_names=False)
    run_grid(reference, workers=2, analyse=False, progress=False, check=False)
    expected = collect_results(reference.runs_dir)
    assert len(expected) == 8 * 3

    path = write_grid(killed_dir, folds=[0])
    spec = load_grid(path, check_names=False)
    cells = expand_cells(spec)
    hang = cells[4]  # the stand-in writes predictions.csv for this cell, then sleeps
    # A crash left by an earlier attempt: a partial run directory without metrics.json.
    stale = cells[6].run_dir
    stale.mkdir(parents=True)
    (stale / "predictions.csv").write_text("half a file")
    env = {**os.environ, "SM_FAKE_HANG_RUN_ID": hang.run_id}
    code = ("import sys; from sm_utils.grid import load_grid, run_grid; "
            "run_grid(load_grid(sys.argv[1], check_names=False), workers=1, analyse=False, progress=False, check=False)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not (hang.run_dir / "predictions.csv").exists():
            assert time.monotonic() < deadline, "the hanging cell never started"
            assert proc.poll() is None, "the grid ended before the hanging cell"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the grid process and its workers, mid-run
        proc.wait(timeout=30)
    assert not hang.done and hang.status == "partial"
    done_before = {c.run_id for c in cells if c.done}
    assert 0 < len(done_before) < 8
    mtimes = {c.run_id: (c.run_dir / "metrics.json").stat().st_mtime_ns for c in cells if c.done}

    report = run_grid(spec, workers=1, analyse=False, progress=False, check=False)
    assert report.already_done == len(done_before) and not report.failures
    assert all(c.done for c in cells)
    # finished cells were not redone
    assert all((c.run_dir / "metrics.json").stat().st_mtime_ns == mtimes[c.run_id] for c in cells
               if c.run_id in done_before)
    resumed = collect_results(spec.runs_dir)
    pd.testing.assert_frame_equal(resumed.drop(columns="run_id"), expected.drop(columns="run_id"))
    assert json.loads((stale / "metrics.json").read_text())["run_id"] == cells[6].run_id
    assert not (stale / "predictions.csv").read_text().startswith("half")


@pytest.mark.slow
def test_two_launches_at_once_run_each_cell_once(tmp_path):
    path = write_grid(tmp_path)
    spec = load_grid(path, check_names=False)
    env = {**os.environ, "SM_FAKE_SLEEP_S": "0.3"}
    code = ("import sys; from sm_utils.grid import load_grid, run_grid; "
            "r = run_grid(load_grid(sys.argv[1], check_names=False), workers=1, analyse=False, "
            "progress=False, check=False); print('ELSEWHERE', len(r.elsewhere))")
    launches = [subprocess.Popen([sys.executable, "-c", code, str(path)], env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
                for _ in range(2)]
    outputs = [launch.communicate(timeout=240)[0] for launch in launches]
    assert [launch.returncode for launch in launches] == [0, 0], outputs
    executions = [line.split() for line in (spec.runs_dir / "executions.log").read_text().splitlines()]
    counts = pd.Series([run_id for run_id, _ in executions]).value_counts()
    assert len(counts) == 16 and (counts == 1).all()  # every cell ran, and only once
    assert len({pid for _, pid in executions}) == 2  # both launches did some of the work
    assert all(c.done for c in expand_cells(spec))
    assert sum(int(o.split("ELSEWHERE")[1]) for o in outputs) > 0  # and each left some to the other
    assert not list((spec.runs_dir / ".claims").glob("*.json"))  # every claim released


def test_claims_of_dead_or_silent_processes_are_taken_over(tmp_path):
    from sm_utils.grid.locks import CellClaim

    mine = CellClaim(tmp_path, "abc")
    assert mine.acquire()
    assert not CellClaim(tmp_path, "abc").acquire()  # held by a live process
    mine.release()
    assert not mine.path.exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True,
                          capture_output=True, text=True)
    mine.path.write_text(json.dumps({"host": __import__("socket").gethostname(),
                                     "pid": int(dead.stdout), "since": 0}))
    other = CellClaim(tmp_path, "abc")
    assert other.acquire()  # the process that claimed it is gone: taken over
    other.release()
    mine.path.write_text(json.dumps({"host": "node-17", "pid": 1, "since": 0}))
    assert not CellClaim(tmp_path, "abc").acquire()  # another host, heartbeat fresh
    old = time.time() - 20 * 60
    os.utime(mine.path, (old, old))
    taken = CellClaim(tmp_path, "abc")
    assert taken.acquire()  # its heartbeat stopped 20 min ago
    assert json.loads(taken.path.read_text())["pid"] == os.getpid()
    taken.release()


def test_submitit_local_executor_runs_a_small_grid(tmp_path):
    spec = load_grid(write_grid(tmp_path, confounders=["tag"], folds=[0], sources=["random"],
                                slurm={"cells_per_job": 1, "time_min": 2, "array_parallelism": 2}),
                     check_names=False)
    report = run_grid(spec, executor="slurm", slurm_cluster="local", slurm_timeout_s=120,
                      analyse=False, progress=False, check=False)
    cells = expand_cells(spec)
    assert len(cells) == 2
    assert report.succeeded == 2 and not report.failures, report.summary()
    assert all(c.done and (c.run_dir / "notebook.ipynb").exists() for c in cells)
    assert len(list((spec.runs_dir / "_submitit").glob("*"))) >= 2  # one folder per array task


def test_one_worker_per_visible_gpu(monkeypatch):
    from sm_utils.grid import worker_environments

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    envs = worker_environments("auto", None)
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["2", "5"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # GPUs hidden: CPU workers, one thread each
    for variable in ("SLURM_CPUS_PER_TASK", "SLURM_CPUS_ON_NODE"):
        monkeypatch.delenv(variable, raising=False)
    envs = worker_environments("auto", 1)
    assert len(envs) == len(os.sched_getaffinity(0))
    assert all(e["OMP_NUM_THREADS"] == "1" and "CUDA_VISIBLE_DEVICES" not in e for e in envs)
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "3")  # a job's allocation, not the node's cores
    assert len(worker_environments("auto", 1)) == 3
    assert {e["OMP_NUM_THREADS"] for e in worker_environments(1, None)} == {"3"}
    assert len(worker_environments(3, None)) == 3


def test_datasets_are_built_once_and_never_reused_with_other_parameters(tmp_path):
    from sm_utils.grid import prepare

    path = write_grid(tmp_path, datasets=[{"name": "phantom_cxr", "manifest": "data/ph/manifest.csv",
                                           "params": {"n_patients": 7}}],
                      notebooks={"data": str(FIXTURES / "fake_data_preparation.ipynb"),
                                 "fine_tuning": str(FAKE_NOTEBOOK)})
    spec = load_grid(path, check_names=False)
    prepare(spec, log=lambda message: None)
    manifest = tmp_path / "data/ph/manifest.csv"
    assert manifest.read_text() == "image_id\n# phantom_cxr 7\n"  # notebook 01 got the parameters
    assert (spec.runs_dir / "_prepare" / "01_phantom_cxr.ipynb").exists()
    before = manifest.stat().st_mtime_ns
    prepare(spec, log=lambda message: None)  # built already: not rebuilt
    assert manifest.stat().st_mtime_ns == before
    spec.datasets[0].params["n_patients"] = 8
    with pytest.raises(GridError, match=r"was built with \{'n_patients': 7\}"):
        prepare(spec, log=lambda message: None)


def test_source_weights_are_built_once_and_never_reused_with_other_build_parameters(tmp_path):
    import nbformat

    from sm_utils.grid import prepare

    builder = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell('out = "w.bin"\nepochs = 1', metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell("from pathlib import Path\nPath(out).write_text(f'epochs={epochs}')"),
    ])
    builder.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(builder, tmp_path / "build.ipynb")
    build = {"notebook": "build.ipynb", "parameters": {"out": "{weights}", "epochs": 3}}
    path = write_grid(tmp_path, sources=[{"name": "radiology_phantom", "weights": "w.bin", "build": build}])
    spec = load_grid(path, check_names=False)
    prepare(spec, log=lambda message: None)
    weights = tmp_path / "w.bin"
    assert weights.read_text() == "epochs=3"  # the build notebook got the parameters
    before = weights.stat().st_mtime_ns
    prepare(spec, log=lambda message: None)  # built already: not rebuilt
    assert weights.stat().st_mtime_ns == before
    spec.sources[0].build["parameters"]["epochs"] = 5
    with pytest.raises(GridError, match=r"w.bin was built with .*'epochs': 3.*delete .*w.bin"):
        prepare(spec, log=lambda message: None)


def test_cells_rerun_when_their_weights_file_changes(tmp_path):
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"first weights")
    spec = load_grid(write_grid(tmp_path, confounders=["tag"], prevalences=[1], folds=[0],
                                sources=["random", {"name": "imagenet_lite0", "weights": str(weights)}]),
                     check_names=False)
    first = run_grid(spec, workers=1, analyse=False, progress=False, check=False)
    assert first.succeeded == 2
    again = run_grid(spec, workers=1, analyse=False, progress=False, check=False)
    assert again.already_done == 2 and again.succeeded == 0
    weights.write_bytes(b"rebuilt weights")  # same path, new content: the old run is stale
    rebuilt = run_grid(spec, workers=1, analyse=False, progress=False, check=False)
    assert rebuilt.already_done == 1 and rebuilt.succeeded == 1


def test_a_grid_with_unrunnable_cells_is_refused_before_anything_starts(tmp_path):
    spec = load_grid(write_grid(tmp_path, confounders=["tag"],
                                sources=["random", {"name": "radimagenet", "arch": "resnet50",
                                                    "weights": "w.h5"}]),
                     check_paths=False)
    with pytest.raises(GridError) as info:
        run_grid(spec, workers=1, analyse=False, progress=False)
    message = str(info.value)
    assert "refused before any cell started" in message
    # 4 radimagenet cells (2 p x 2 folds), and every cell, since the stand-in manifest is empty
    assert "4 cell(s): source 'radimagenet' with arch 'resnet50'" in message
    assert "8 cell(s) cannot run (2 cause(s))" in message
    assert not spec.runs_dir.exists()  # nothing was prepared or run


@pytest.mark.slow
@pytest.mark.parametrize("fault, expected", [
    ("SM_FAKE_KILL_WORKER_RUN_ID", "died (exit code -9) during this cell"),
    ("SM_FAKE_EXIT_KERNEL_RUN_ID", "DeadKernelError"),
    ("SM_FAKE_NO_METRICS_RUN_ID", "finished without writing"),
])
def test_a_cell_that_dies_is_reported_and_the_grid_goes_on(tmp_path, monkeypatch, fault, expected):
    spec = load_grid(write_grid(tmp_path, confounders=["tag"]), check_names=False)
    cells = expand_cells(spec)
    victim = cells[2]
    monkeypatch.setenv(fault, victim.run_id)
    report = run_grid(spec, workers=1, analyse=False, progress=False, check=False)
    assert report.succeeded == len(cells) - 1
    assert [label for label, _ in report.failures] == [victim.label()]
    assert expected in report.failures[0][1]
    assert not victim.done and all(c.done for c in cells if c is not victim)
    # relaunched without the fault, the victim runs and nothing else does
    monkeypatch.delenv(fault)
    again = run_grid(spec, workers=1, analyse=False, progress=False, check=False)
    assert again.already_done == len(cells) - 1 and again.succeeded == 1


def test_a_failing_analysis_notebook_is_reported_after_the_cells(tmp_path):
    import nbformat

    broken = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell('grid_config = ""\nruns_dir = ""\nfigures_dir = ""\nresults_csv = ""',
                                  metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell("raise ValueError('no figure today')")])
    broken.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                     "language": "python"}
    nbformat.write(broken, tmp_path / "broken_analysis.ipynb")
    spec = load_grid(write_grid(tmp_path, confounders=["tag"], folds=[0],
                                notebooks={"fine_tuning": str(FAKE_NOTEBOOK),
                                           "analysis": "broken_analysis.ipynb"}),
                     check_names=False)
    report = run_grid(spec, workers=1, progress=False, check=False)
    assert report.succeeded == 4
    assert report.failures == [("analysis notebook", report.failures[0][1])]
    assert "ValueError: no figure today" in report.failures[0][1]
    assert (spec.runs_dir / "04_analysis.ipynb").exists()  # executed, with the error in it


@pytest.mark.numerics
def test_a_grid_file_in_a_folder_of_ones_own_runs(tmp_path, capsys):
    """No root: the grid belongs to the installed project: its notebooks, its runs folder."""
    from sm_utils.cli import main

    study = tmp_path / "my_study"
    study.mkdir()
    grid = {"name": "outside", "datasets": [{"name": "phantom_cxr",
                                            "manifest": str(study / "data/manifest.csv"),
                                            "params": {"n_patients": 24, "image_size": 64,
                                                       "n_folds": 2}}],
            "confounders": ["tag"], "prevalences": [1], "folds": [0],
            "sources": [{"name": "random", "arch": "tf_efficientnet_lite0"}],
            "training": {"image_size": 32, "epochs": 1, "batch_size": 16, "augment": False}}
    path = study / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    spec = load_grid(path, check_paths=False)
    assert spec.notebooks["fine_tuning"] == CONFIGS.parent / "notebooks" / "03_fine_tuning.ipynb"
    assert spec.runs_dir == CONFIGS.parent / "runs" / "outside"
    path.write_text(yaml.safe_dump({**grid, "runs_dir": str(study / "runs"),
                                    "figures_dir": str(study / "figures")}))
    assert main(["run", str(path), "--workers", "1", "--progress", "off"]) == 0
    assert "1 run now, 0 failed" in capsys.readouterr().out
    assert (study / "runs" / "results.csv").exists() and (study / "figures" / "outside_auc_vs_p.png").exists()


def test_a_missing_notebook_says_how_to_set_root(tmp_path, monkeypatch):
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({"root": ".", "datasets": ["phantom_cxr"], "confounders": ["tag"],
                                    "prevalences": [0], "sources": ["random"]}))
    # a study folder (root: .) takes the installed compendium's notebooks (tests/test_study.py);
    # here the installed compendium has none either
    monkeypatch.setenv("SM_PROJECT_ROOT", str(tmp_path / "no_compendium"))
    with pytest.raises(GridError, match=r"03_fine_tuning.ipynb does not exist; set `root:` in the grid"):
        load_grid(path)


def test_a_study_folder_takes_the_installed_compendium_s_notebooks(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({"root": ".", "datasets": ["phantom_cxr"], "confounders": ["tag"],
                                    "prevalences": [0], "sources": ["random"],
                                    "notebooks": {"analysis": "my_analysis.ipynb"}}))
    spec = load_grid(path, check_paths=False)
    root = CONFIGS.parent
    assert spec.notebooks["fine_tuning"] == root / "notebooks" / "03_fine_tuning.ipynb"
    assert spec.notebooks["data"] == root / "notebooks" / "01_data_preparation.ipynb"
    assert spec.notebooks["analysis"] == tmp_path / "my_analysis.ipynb"   # named: its own
    assert spec.runs_dir == tmp_path / "runs" / "grid"


def test_runs_per_gpu_shares_each_gpu_and_refuses_what_does_not_fit(monkeypatch):
    from sm_utils.grid import check_runs_fit, worker_environments

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    envs = worker_environments("auto", runs_per_gpu=3)
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["3", "5", "3", "5", "3", "5"]
    gib = 1024 ** 3
    check_runs_fit(4, 3 * gib, {"3": 40 * gib, "5": 40 * gib}, "model")  # 4 x 4.2 GiB fit
    with pytest.raises(GridError) as info:
        check_runs_fit(8, 3 * gib, {"3": 40 * gib, "5": 20 * gib}, "keras_resnet50 at 224 px")
    message = str(info.value)
    assert ("one run needs 4.20 GiB (measured: keras_resnet50 at 224 px, peak 3.00 GiB, plus 15% "
            "and 0.75 GiB for its CUDA context)") in message
    assert "GPU 5 has 20.0 GiB free. Set runs_per_gpu to 4 or less." in message


def test_the_memory_check_measures_every_configuration_in_children(tmp_path, monkeypatch):
    """runs_per_gpu: 2 on two GPUs (a fake nvidia-smi), a grid of two architectures: each
    distinct configuration is measured in a child on the workers' first GPU, each GPU's free
    memory by a child of its own, the largest need decides, and the grid process itself never
    touches CUDA."""
    import contextlib
    from concurrent.futures import Future

    import torch

    from sm_utils.grid import _runs_per_gpu, local

    gib = 1024 ** 3
    measured, children = [], []
    peaks = {"tf_efficientnet_lite0": 1 * gib, "keras_resnet50": 9 * gib}
    free = {"0": 40 * gib, "1": 30 * gib}

    class FakeChild:  # what a spawned child would answer on a GPU
        def __init__(self, gpu):
            self.gpu = gpu

        def submit(self, function, *args):
            future = Future()
            if function is local.measure_run_memory:
                config, device, runs_per_gpu = args
                measured.append((config["arch"], config["image_size"], device, runs_per_gpu))
                future.set_result({"peak_bytes": peaks[config["arch"]], "resident_bytes": 0,
                                   "passes": ["training", "evaluation"],
                                   "free_bytes": free[self.gpu], "total_bytes": 80 * gib})
            else:
                assert function is local.free_gpu_memory
                future.set_result(free[self.gpu])
            return future

    @contextlib.contextmanager
    def fake_spawned_child(device, gpu=None):
        children.append((device, gpu))
        yield FakeChild(gpu)

    def no_cuda_here(*args, **kwargs):
        raise AssertionError("CUDA used in the grid process")

    monkeypatch.setattr(local, "spawned_child", fake_spawned_child)
    for name in ("mem_get_info", "init", "max_memory_reserved", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, no_cuda_here)
    monkeypatch.setenv("PATH", fake_nvidia_smi(tmp_path)["PATH"])
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    sources = [{"name": "random", "arch": "tf_efficientnet_lite0"},
               {"name": "random", "arch": "keras_resnet50"}]
    spec = load_grid(write_grid(tmp_path, sources=sources, run={"runs_per_gpu": 2}),
                     check_names=False)
    cells = expand_cells(spec)
    spec.runs_dir.mkdir(parents=True)
    assert _runs_per_gpu(spec, cells, print) == 2  # 2 x (9 x 1.15 + 0.75) GiB < 30.75 GiB
    assert sorted(measured) == [("keras_resnet50", 32, "cuda", 2),
                                ("tf_efficientnet_lite0", 32, "cuda", 2)]  # 16 cells, 2 configs
    assert children == [("cuda", "0"), ("cuda", "0"), ("cuda", "1")]
    recorded = json.loads((spec.runs_dir / "memory_check.json").read_text())
    assert recorded["need_bytes"] == 9 * gib and recorded["free_bytes"] == {
        "0": 40 * gib + local.CONTEXT_ALLOWANCE, "1": 30 * gib + local.CONTEXT_ALLOWANCE}
    (tmp_path / "three").mkdir()
    spec = load_grid(write_grid(tmp_path / "three", sources=sources, run={"runs_per_gpu": 3}),
                     check_names=False)
    spec.runs_dir.mkdir(parents=True)
    with pytest.raises(GridError, match=r"measured: keras_resnet50 at 32 px, batch 32, training "
                                        r"\+ evaluation.*GPU 1 has 30\.8 GiB free\. Set "
                                        r"runs_per_gpu to 2 or less"):
        _runs_per_gpu(spec, expand_cells(spec), print)


@pytest.mark.numerics
def test_the_memory_measurement_runs_every_pass_a_run_makes():
    """The child's measurement, on the CPU (peak resident memory instead of the GPU
    allocator's): training, the evaluation pass and, when the grid attributes, attribution;
    a bigger model and input need more."""
    from sm_utils.grid import measure_run_memory, spawned_child

    small = {"source": "random", "arch": "tf_efficientnet_lite0", "weights": None,
             "image_size": 32, "batch_size": 4, "optimizer": "adam", "precision": "auto",
             "deterministic": False, "attribution": True, "num_workers": 0, "n_images": 100}
    large = {**small, "arch": "keras_resnet50", "image_size": 64, "batch_size": 8,
             "attribution": False}
    results = []
    for config in (small, large):
        with spawned_child("cpu") as child:  # a fresh process each: its own peak
            results.append(child.submit(measure_run_memory, config, "cpu").result())
    assert results[0]["passes"] == ["training", "evaluation", "attribution"]
    assert results[1]["passes"] == ["training", "evaluation"]
    assert 0 < results[0]["peak_bytes"] < results[1]["peak_bytes"] - 100 * 2**20


def test_runs_per_gpu_is_ignored_without_a_gpu_with_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    spec = load_grid(write_grid(tmp_path, confounders=["tag"], folds=[0],
                                run={"runs_per_gpu": 4, "cells_per_kernel": 100}),
                     check_names=False)
    lines = []
    report = run_grid(spec, workers=1, analyse=False, progress=False, check=False,
                      log=lines.append)
    assert report.succeeded == 4
    assert [line for line in lines if "runs_per_gpu" in line] == [
        "run.runs_per_gpu=4 ignored: no GPU here (CPU cells run one per worker; set run.workers)"]


@pytest.mark.numerics
def test_one_or_two_concurrent_runs_on_cpu_give_identical_results(tmp_path):
    """Real fine-tuning cells, run one at a time and two at a time (one thread each)."""
    from sm_utils.datasets import build_dataset

    build_dataset("phantom_cxr", tmp_path / "data", n_patients=24, image_size=64, n_folds=2,
                  seed=1)
    tables = []
    for workers in (1, 2):
        grid = {"name": f"w{workers}", "runs_dir": str(tmp_path / f"runs/w{workers}"),
                "datasets": [{"name": "phantom_cxr",
                              "manifest": str(tmp_path / "data/manifest.csv")}],
                "confounders": ["tag"], "prevalences": [0, 1], "folds": [0],
                "sources": ["imagenet_lite0", {"name": "random", "arch": "tf_efficientnet_lite0"}],
                "training": {"image_size": 32, "epochs": 1, "batch_size": 16},
                "run": {"threads_per_worker": 1, "device": "cpu"}}  # on CPU on a GPU machine too
        path = tmp_path / f"w{workers}.yaml"
        path.write_text(yaml.safe_dump(grid))
        spec = load_grid(path)
        report = run_grid(spec, workers=workers, analyse=False, progress=False)
        assert report.succeeded == 4, report.summary()
        tables.append(collect_results(spec.runs_dir).drop(columns=["train_seconds",
                                                                   "eval_seconds"]))
    pd.testing.assert_frame_equal(tables[0], tables[1])


@pytest.mark.slow
def test_two_launches_at_once_build_the_data_set_once(tmp_path):
    """Two `sm run` of one grid at once: one builds the data set, the other waits for it."""
    path = write_grid(tmp_path, datasets=[{"name": "phantom_cxr", "manifest": "data/ph/manifest.csv",
                                           "params": {"n_patients": 7}}],
                      confounders=["tag"], prevalences=[1], folds=[0], sources=["random"],
                      notebooks={"data": str(FIXTURES / "fake_data_preparation.ipynb"),
                                 "fine_tuning": str(FAKE_NOTEBOOK)})
    env = {**os.environ, "SM_FAKE_SLEEP_S": "4"}
    sm = Path(sys.executable).with_name("sm")
    launches = [subprocess.Popen([str(sm), "run", str(path), "--no-check-names", "--no-check-paths",
                                  "--workers", "1", "--no-analysis", "--progress", "off"],
                                 env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
                for _ in range(2)]
    outputs = [launch.communicate(timeout=240)[0] for launch in launches]
    assert [launch.returncode for launch in launches] == [0, 0], outputs
    assert len((tmp_path / "data" / "builds.log").read_text().split()) == 1  # built once
    said = "\n".join(outputs)
    assert said.count("building dataset 'phantom_cxr'") == 1
    assert said.count("waiting for dataset 'phantom_cxr', claimed by process") == 1
    assert (tmp_path / "data/ph/manifest.csv").read_text() == "image_id\n# phantom_cxr 7\n"
    assert not list((tmp_path / "data" / ".claims").glob("*.json"))  # the claim released
    # and the grid's one cell ran once, in one of them (the other found it claimed)
    assert all(c.done for c in expand_cells(load_grid(path, check_names=False)))
    assert said.count("1 left to another launch that holds them") == 1
