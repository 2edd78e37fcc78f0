"""On a real one-node SLURM cluster (slurm_cluster.py; no accounting, as on many small clusters):
sm_utils.slurm.JobWatcher against squeue/scancel, and a tiny grid through
run_grid(executor="slurm") with real sbatch, srun and submitit.

Run with `make test-slurm` (installs the Debian packages, then pytest -m slurm).
"""

from __future__ import annotations

import time

import pytest
from tiny_grid import (
    GridThread,
    array_tasks,
    expand_cells,
    run,
    tiny_grid,
    wait_for,
    wait_for_job_state,
)

from sm_utils.slurm import JobWatcher, queue_states

pytestmark = pytest.mark.slurm

def test_the_cluster_has_no_accounting(slurm_jobs):
    out = slurm_jobs.command("sacct", "--noheader", check=False)
    assert out.returncode != 0   # what submitit relies on is missing here


def test_watcher_sees_scancel_within_seconds(slurm_jobs, tmp_path):
    job = slurm_jobs.sbatch("--cpus-per-task=1", f"--output={tmp_path}/%j.out", "--wrap", "sleep 300")
    array = slurm_jobs.sbatch("--cpus-per-task=1", "--array=0-2%1",
                              f"--output={tmp_path}/%A_%a.out", "--wrap", "sleep 300")
    ids = [job, f"{array}_0", f"{array}_1", f"{array}_2"]
    logs = {job: tmp_path / f"{job}.out", **{i: tmp_path / f"{i}.out" for i in ids[1:]}}
    watcher = JobWatcher(ids, min_interval_s=1.0, result_exists=lambda j: False,
                         log_file=logs.get)
    wait_for_job_state(watcher, job, lambda s: s.state == "RUNNING")
    wait_for_job_state(watcher, f"{array}_0", lambda s: s.state == "RUNNING")
    assert watcher.poll()[f"{array}_2"].state == "PENDING"

    start = time.monotonic()
    slurm_jobs.command("scancel", job)
    slurm_jobs.command("scancel", f"{array}_2")   # a pending task: gone from squeue at once
    state = wait_for_job_state(watcher, job, lambda s: s.done)
    assert time.monotonic() - start < 10
    assert state.state == "CANCELLED" and state.reason == "cancelled (squeue: CANCELLED)"
    pending = wait_for_job_state(watcher, f"{array}_2", lambda s: s.done, timeout=30)
    assert time.monotonic() - start < 20   # within the result grace (10 s) and one poll
    assert "cancelled" in pending.reason and "accounting storage is disabled" in pending.reason
    states = watcher.poll()
    assert not states[f"{array}_0"].done and not states[f"{array}_1"].done
    assert watcher.squeue_calls <= (time.monotonic() - start) / 1.0 + 10   # spaced calls


def test_queue_states_of_finished_jobs(slurm_jobs, tmp_path):
    ok = slurm_jobs.sbatch(f"--output={tmp_path}/%j.out", "--wrap", "true")
    bad = slurm_jobs.sbatch(f"--output={tmp_path}/%j.out", "--wrap", "exit 3")
    wait_for(lambda: all(s.done for s in queue_states([ok, bad]).values()), 60, "end of both")
    states = queue_states([ok, bad, "999999"])
    assert states[ok].state == "COMPLETED" and states[ok].ok
    assert states[bad].state == "FAILED" and states[bad].reason.startswith("failed (squeue: FAILED")
    assert states["999999"].state == "LEFT_QUEUE"


@pytest.mark.parametrize("cells_per_job", [1, 2])
def test_a_grid_runs_on_slurm_and_a_relaunch_resumes(slurm_jobs, tmp_path, cells_per_job):
    spec = tiny_grid(tmp_path, cells_per_job=cells_per_job, array_parallelism=2)
    cells = expand_cells(spec)
    report = run(spec, slurm_timeout_s=300)
    assert report.succeeded == 3 and not report.failures, report.summary()
    assert all(c.done and (c.run_dir / "notebook.ipynb").exists() for c in cells)
    tasks = array_tasks(spec)
    assert len(tasks) == -(-3 // cells_per_job)
    assert len({name.split("_")[0] for name in tasks}) == 1   # one job array

    again = run(spec, slurm_timeout_s=120)
    assert again.already_done == 3 and again.succeeded == 0 and not again.failures
    assert array_tasks(spec) == tasks   # nothing submitted


def test_a_cancelled_array_job_is_reported_within_a_minute(slurm_jobs, tmp_path, monkeypatch):
    spec = tiny_grid(tmp_path, prevalences=[0.0, 1.0], cells_per_job=1, array_parallelism=2)
    cells = expand_cells(spec)
    hang = cells[1]
    # sbatch exports the submitting environment (--export=ALL): the job's kernel sees this
    monkeypatch.setenv("SM_FAKE_HANG_RUN_ID", hang.run_id)
    grid = GridThread(spec, slurm_timeout_s=75)
    grid.start()
    wait_for(lambda: (hang.run_dir / "predictions.csv").exists() and cells[0].done, 120,
             "the hanging cell", grid)
    array = array_tasks(spec)[0].split("_")[0]
    cancelled_at = time.monotonic()
    slurm_jobs.command("scancel", array)   # the whole array, as a user would
    report = grid.result(timeout=120)
    assert grid.ended_at - cancelled_at < 60, report.summary()
    assert report.succeeded == 1
    [(label, message)] = report.failures
    assert label == hang.label() and message.startswith(f"job {array}_1")
    assert "cancelled" in message.lower(), message
