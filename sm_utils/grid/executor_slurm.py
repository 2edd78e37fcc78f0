"""The SLURM executor: cells in batches as submitit job arrays, each array task one warm kernel.

``cluster="local"`` runs the same path on this machine (how it is tested), ``"debug"``
in-process; ``None`` requires SLURM, whose job states come from squeue
(:class:`sm_utils.slurm.JobWatcher`), not from sacct.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Sequence
from typing import Any

from ..slurm import JobWatcher
from .cells import Cell
from .errors import GridError
from .report import GridReport
from .runner import CellResult, RunnerSettings, run_batch
from .spec import GridSpec


def _batches(items: Sequence, size: int) -> list[list]:
    return [list(items[i: i + size]) for i in range(0, len(items), size)]


def run_slurm(cells: list[Cell], settings: RunnerSettings, spec: GridSpec, report: GridReport,
              progress, cluster: str | None, timeout_s: float | None) -> None:
    import submitit

    slurm = spec.slurm
    missing = [] if cluster else [p for p in ("sbatch", "srun", "squeue") if shutil.which(p) is None]
    if missing:
        raise GridError(f"the slurm executor needs SLURM's {', '.join(missing)}, not on PATH here; "
                        "run on a cluster login node, or use --slurm-local to try the same path on "
                        "this machine")
    folder = spec.runs_dir / "_submitit" / "%j"
    # "slurm" named, never guessed: without srun submitit would pick its local executor
    executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster or "slurm")
    params: dict[str, Any] = {
        "timeout_min": int(slurm["time_min"]),
        "mem_gb": float(slurm["mem_gb"]),
        "cpus_per_task": int(slurm["cpus_per_task"]),
        "gpus_per_node": int(slurm["gpus_per_task"]),
        "tasks_per_node": 1,
        "nodes": 1,
        "name": f"sm-{spec.name}",
        "slurm_array_parallelism": int(slurm["array_parallelism"]),
    }
    if slurm["partition"]:
        params["slurm_partition"] = slurm["partition"]
    if slurm["additional_parameters"]:
        params["slurm_additional_parameters"] = dict(slurm["additional_parameters"])
    executor.update_parameters(**params)
    batches = _batches(cells, max(1, int(slurm["cells_per_job"])))
    threads = str(max(1, int(slurm["cpus_per_task"])))
    batch_settings = dataclasses.replace(
        settings, env={**settings.env, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads})
    jobs = executor.map_array(run_batch, batches, [batch_settings] * len(batches))
    print(f"submitted {len(jobs)} array task(s) of up to {slurm['cells_per_job']} cell(s); "
          f"logs in {spec.runs_dir / '_submitit'}", flush=True)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    counted: set[str] = set()
    pending_jobs = dict(zip(jobs, batches))
    # On SLURM, job states come from squeue: submitit asks sacct, which fails without accounting
    watcher = JobWatcher.for_submitit(jobs) if cluster is None else None
    while pending_jobs:
        states = watcher.poll() if watcher is not None else None
        for job in [j for j in pending_jobs
                    if (states[j.job_id].done if states is not None else j.done())]:
            batch = pending_jobs.pop(job)
            state = states[job.job_id] if states is not None else None
            try:
                if state is not None and not state.has_result:
                    raise RuntimeError(state.reason)  # nothing to read: cancelled, killed, crashed
                results, kernel_seconds = job.result()
                if state is not None and state.state != "COMPLETED":  # e.g. cancelled mid-cell
                    results = [dataclasses.replace(r, error=f"job {job.job_id} {state.reason}: {r.error}")
                               if r.error else r for r in results]
            except Exception as err:  # noqa: BLE001 (the whole task failed: time limit, node, ...)
                message = f"job {job.job_id} failed: {str(err).strip()[-2000:]}"
                results = [CellResult(c.run_id, c.label(), c.done, 0.0, error="" if c.done else message)
                           for c in batch]
                kernel_seconds = 0.0
            report.kernel_start_seconds += kernel_seconds
            for result in results:
                if result.run_id not in counted:
                    counted.add(result.run_id)
                    progress.update(1)
                report.add(result)
            progress.set_postfix(ok=report.succeeded, failed=len(report.failures))
        if not pending_jobs:
            break
        # Progress between job completions: cells whose run directory is complete.
        newly = [c for b in pending_jobs.values() for c in b if c.run_id not in counted and c.done]
        for cell in newly:
            counted.add(cell.run_id)
            progress.update(1)
        if deadline is not None and time.monotonic() > deadline:
            for job, batch in pending_jobs.items():
                job.cancel(check=False)
                for cell in batch:
                    if not cell.done:
                        report.failures.append((cell.label(), f"timed out after {timeout_s} s (job {job.job_id})"))
            break
        time.sleep(1.0)
