"""The grid's SLURM path (run_grid(executor="slurm"), real submitit) against fake SLURM commands.

No cluster needed: tests/slurm/fake_slurm.py puts sbatch, srun, squeue, scancel and sacct on
PATH and runs the array tasks on this machine, so these run in every `make test`. What sbatch
received is checked as sbatch reads it: the arguments and the script's #SBATCH lines.
With accounting off (no sacct), the grid learns that a job ended from the queue
(sm_utils.slurm.JobWatcher).
"""

from __future__ import annotations

import math
import os
import subprocess
import time
from pathlib import Path

import fake_slurm as fake
import pytest
from submitit.core.utils import DelayedSubmission
from tiny_grid import GridThread, array_tasks, expand_cells, run, tiny_grid, wait_for

from sm_utils.grid import GridError


def _path_without(*programs: str) -> str:
    keep = [d for d in os.environ["PATH"].split(os.pathsep)
            if not any(Path(d, p).exists() for p in programs)]
    return os.pathsep.join(keep)


def test_missing_sbatch_says_to_use_slurm_local(tmp_path, monkeypatch):
    spec = tiny_grid(tmp_path)
    monkeypatch.setenv("PATH", _path_without("sbatch"))
    with pytest.raises(GridError, match=r"needs SLURM's sbatch.*--slurm-local"):
        run(spec)


def test_sbatch_without_srun_is_refused_not_run_locally(tmp_path, monkeypatch, fake_slurm):
    (fake_slurm.parent / "fake-bin" / "srun").unlink()
    monkeypatch.setenv("PATH", _path_without("srun"))
    spec = tiny_grid(tmp_path, prevalences=[0.0])
    try:
        report = run(spec, slurm_timeout_s=60)
    except GridError as err:
        assert "srun" in str(err)
        return
    assert fake.submissions(fake_slurm), (
        f"nothing reached sbatch, yet {report.succeeded} cell(s) ran (on this machine)")


def test_sbatch_refusal_is_reported_with_its_message(tmp_path, monkeypatch, fake_slurm):
    monkeypatch.setenv("FAKE_SLURM_REJECT", "Requested node configuration is not available")
    with pytest.raises(Exception, match="Requested node configuration is not available"):
        run(tiny_grid(tmp_path))


@pytest.mark.slow
@pytest.mark.parametrize("cells_per_job", [1, 2])
def test_slurm_block_becomes_sbatch_options_and_cells_group_into_array_tasks(
        tmp_path, fake_slurm, cells_per_job):
    spec = tiny_grid(tmp_path, time_min=7, mem_gb=1.5, cpus_per_task=3, gpus_per_task=2,
                     partition="gpu", array_parallelism=2, cells_per_job=cells_per_job,
                     additional_parameters={"qos": "high", "account": "lab"})
    cells = expand_cells(spec)
    report = run(spec, slurm_timeout_s=120)
    assert report.succeeded == 3 and not report.failures, report.summary()
    assert all(c.done for c in cells)

    [submission] = fake.submissions(fake_slurm)   # one sbatch call: one job array
    assert submission["argv"] == [submission["script"]]   # every option is in the script
    tasks = math.ceil(len(cells) / cells_per_job)
    options = submission["options"]
    assert {k: options.get(k) for k in ("time", "mem", "cpus-per-task", "gpus-per-node",
                                        "partition", "array", "qos", "account", "job-name",
                                        "nodes", "ntasks-per-node")} == {
        "time": "7", "mem": "1536MB", "cpus-per-task": "3", "gpus-per-node": "2",
        "partition": "gpu", "array": f"0-{tasks - 1}%{min(tasks, 2)}", "qos": "high",
        "account": "lab", "job-name": "sm-fake", "nodes": "1", "ntasks-per-node": "1"}

    # array task i runs cells [i*k, (i+1)*k) in the grid's order, threads set to the CPUs asked
    names = array_tasks(spec)
    assert names == [f"{submission['job_id']}_{i}" for i in range(tasks)]
    for i, name in enumerate(names):
        delayed = DelayedSubmission.load(spec.runs_dir / "_submitit" / name / f"{name}_submitted.pkl")
        batch, settings = delayed.args
        expected = cells[i * cells_per_job:(i + 1) * cells_per_job]
        assert [c.run_id for c in batch] == [c.run_id for c in expected]
        assert settings.env["OMP_NUM_THREADS"] == "3" == settings.env["MKL_NUM_THREADS"]
    wait_for(lambda: set(fake.task_states(fake_slurm).values()) == {"COMPLETED"}, 10,
             "every task COMPLETED")   # the grid may see the result before the task has exited

    again = run(spec, slurm_timeout_s=60)   # resumed: all done, nothing submitted
    assert again.already_done == 3 and again.succeeded == 0 and not again.failures
    assert len(fake.submissions(fake_slurm)) == 1


def test_a_failing_cell_inside_an_array_task_is_reported_alone(tmp_path, fake_slurm, monkeypatch):
    monkeypatch.setenv("SM_FAKE_FAIL_SOURCE", "random")
    spec = tiny_grid(tmp_path, prevalences=[0.0, 1.0], sources=["random", "imagenet_lite0"],
                     cells_per_job=2)
    report = run(spec, slurm_timeout_s=120)
    failed = [c for c in expand_cells(spec) if c.params["source"] == "random"]
    assert report.succeeded == 2
    assert sorted(label for label, _ in report.failures) == sorted(c.label() for c in failed)
    assert all("fake failure for source random" in message for _, message in report.failures)
    assert all(c.status == "failed" for c in failed)


@pytest.mark.slow
@pytest.mark.parametrize("accounting", [
    True, False])
def test_a_failed_array_task_is_reported_for_each_of_its_cells(tmp_path, fake_slurm, monkeypatch,
                                                                 accounting):
    if accounting:
        monkeypatch.setenv("FAKE_SLURM_ACCOUNTING", "1")
    monkeypatch.setenv("FAKE_SLURM_FAIL_TASKS", "1")   # task 1 dies before Python starts
    spec = tiny_grid(tmp_path, prevalences=[0.0, 0.2, 0.5, 1.0], cells_per_job=2)
    cells = expand_cells(spec)
    start = time.monotonic()
    report = run(spec, slurm_timeout_s=40)
    assert time.monotonic() - start < 35, report.summary()
    job = array_tasks(spec)[1]
    assert report.succeeded == 2, report.summary()
    assert sorted(label for label, _ in report.failures) == sorted(c.label() for c in cells[2:])
    for _, message in report.failures:
        assert message.startswith(f"job {job}") and "timed out" not in message, message
        assert "FAILED" in message or "failed" in message


@pytest.mark.slow
def test_a_timed_out_grid_cancels_its_jobs_and_reports_each_unfinished_cell(
        tmp_path, fake_slurm, monkeypatch):
    spec = tiny_grid(tmp_path, cells_per_job=2)
    cells = expand_cells(spec)
    monkeypatch.setenv("SM_FAKE_HANG_RUN_ID", cells[0].run_id)   # task 0: [hang, cell 1]
    report = run(spec, slurm_timeout_s=15)
    job = array_tasks(spec)[0]
    assert report.succeeded == 1 and cells[2].done
    assert report.failures == [(c.label(), f"timed out after 15 s (job {job})") for c in cells[:2]]
    assert [job] in fake.calls(fake_slurm, "scancel")
    assert fake.task_states(fake_slurm)[job] == "CANCELLED"


@pytest.mark.parametrize("accounting", [
    True, False])
def test_a_cancelled_array_task_is_reported_within_a_minute(tmp_path, fake_slurm, monkeypatch,
                                                            accounting):
    if accounting:
        monkeypatch.setenv("FAKE_SLURM_ACCOUNTING", "1")
    spec = tiny_grid(tmp_path, prevalences=[0.0, 1.0], cells_per_job=1)
    cells = expand_cells(spec)
    hang = cells[1]
    monkeypatch.setenv("SM_FAKE_HANG_RUN_ID", hang.run_id)
    grid = GridThread(spec, slurm_timeout_s=45)
    grid.start()
    wait_for(lambda: (hang.run_dir / "predictions.csv").exists() and cells[0].done, 60,
             "hanging cell", grid)
    job = array_tasks(spec)[1]
    cancelled_at = time.monotonic()
    subprocess.run(["scancel", job], check=True)
    report = grid.result(timeout=90)
    assert grid.ended_at - cancelled_at < 30, report.summary()
    assert report.succeeded == 1
    [(label, message)] = report.failures
    assert label == hang.label() and message.startswith(f"job {job}")
    assert "cancelled" in message.lower(), message
