"""A tiny grid run by the stand-in notebook (tests/fixtures/fake_fine_tuning.ipynb), and a way
to run a grid in a thread while a test acts on its jobs."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import yaml

from sm_utils.grid import GridSpec, expand_cells, load_grid, run_grid

FAKE_NOTEBOOK = Path(__file__).resolve().parents[1] / "fixtures" / "fake_fine_tuning.ipynb"
# What a one-node test cluster (or the fake) can give: no GPU, little memory, 1 CPU per task.
SMALL_TASKS = {"time_min": 5, "mem_gb": 0.5, "cpus_per_task": 1, "gpus_per_task": 0,
               "array_parallelism": 4}


def tiny_grid(folder: Path, prevalences=(0.0, 0.5, 1.0), sources=("random",),
              **slurm: Any) -> GridSpec:
    """len(prevalences) x len(sources) cells (confounder tag, fold 0)."""
    (folder / "manifest.csv").write_text("image_id\n")
    raw = {
        "name": "fake",
        "root": ".",
        "runs_dir": "runs/fake",
        "datasets": [{"name": "phantom_cxr", "manifest": "manifest.csv"}],
        "confounders": ["tag"],
        "prevalences": list(prevalences),
        "folds": [0],
        "sources": list(sources),
        "training": {"image_size": 32, "epochs": 1},
        "notebooks": {"fine_tuning": str(FAKE_NOTEBOOK), "analysis": "no_analysis.ipynb"},
        "run": {"cells_per_kernel": 100},
        "slurm": {**SMALL_TASKS, **slurm},
    }
    path = folder / "grid.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_grid(path, check_names=False)


def run(spec: GridSpec, **kwargs: Any):
    """run_grid on SLURM as `sm run --executor slurm` does, minus preflight and analysis."""
    kwargs = {"executor": "slurm", "analyse": False, "progress": False, "check": False,
              "log": lambda message: None, **kwargs}
    return run_grid(spec, **kwargs)


class GridThread(threading.Thread):
    """run(spec, **kwargs) in the background; ``report`` / ``error`` once it has ended."""

    def __init__(self, spec: GridSpec, **kwargs: Any):
        super().__init__(daemon=True)
        self.spec, self.kwargs = spec, kwargs
        self.report = None
        self.error: BaseException | None = None
        self.ended_at: float | None = None

    def run(self) -> None:
        try:
            self.report = run(self.spec, **self.kwargs)
        except BaseException as err:  # noqa: BLE001 (handed to the test)
            self.error = err
        finally:
            self.ended_at = time.monotonic()

    def result(self, timeout: float):
        self.join(timeout)
        assert not self.is_alive(), f"the grid still waits after {timeout:g} s"
        if self.error is not None:
            raise self.error
        return self.report


def wait_for(predicate, timeout: float, what: str, thread: GridThread | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if thread is not None and not thread.is_alive():
            raise AssertionError(f"the grid ended before {what}: {thread.error or thread.report}")
        assert time.monotonic() < deadline, f"no {what} after {timeout:g} s"
        time.sleep(0.2)


def wait_for_job_state(watcher, job_id: str, predicate, timeout: float = 60):
    """Poll a :class:`sm_utils.slurm.JobWatcher` until ``predicate(state)`` holds for ``job_id``;
    return that state."""
    deadline = time.monotonic() + timeout
    while True:
        state = watcher.poll()[job_id]
        if predicate(state):
            return state
        assert time.monotonic() < deadline, f"job {job_id} stayed {state}"
        time.sleep(0.2)


def array_tasks(spec: GridSpec) -> list[str]:
    """The array task ids submitit made folders for (``<job>_<task>``), sorted by task."""
    folders = [p.name for p in (spec.runs_dir / "_submitit").glob("*_*") if p.is_dir()]
    return sorted(folders, key=lambda name: tuple(int(x) for x in name.split("_")))


__all__ = ["FAKE_NOTEBOOK", "GridThread", "array_tasks", "expand_cells", "run", "tiny_grid",
           "wait_for", "wait_for_job_state"]
