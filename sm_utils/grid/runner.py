"""Executing cells: a warm Jupyter kernel runs one cell after another, one executed notebook each.

Papermill's cost stays small because one kernel serves a batch of cells (torch and timm are
imported once per kernel, not once per cell). A cell runs only under its claim
(:mod:`sm_utils.grid.locks`), so two launches of one grid never run it twice.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..io import atomic_write_text
from ..paths import ERROR_FILE, METRICS_FILE, NOTEBOOK_FILE
from .cells import Cell
from .errors import describe_error
from .locks import CellClaim


@dataclass
class CellResult:
    run_id: str
    label: str
    ok: bool
    wall_seconds: float          # papermill execution of the notebook, kernel start excluded
    train_seconds: float = 0.0   # from metrics.json (training + evaluation inside the notebook)
    error: str = ""
    elsewhere: str = ""          # not run here: another launch holds the cell (its claim)
    notebook: str = ""           # the executed notebook, with the full traceback of a failure


@dataclass
class RunnerSettings:
    """What a worker needs to execute cells (picklable, sent to worker processes and jobs)."""

    notebook: Path
    kernel_name: str = "python3"
    cells_per_kernel: int = 16
    cell_timeout_s: int = 3600
    env: dict[str, str] = field(default_factory=dict)   # extra environment for the kernel
    kernel_cwd: Path | None = None


class CellRunner:
    """Executes cells one after another in a warm Jupyter kernel, one executed notebook each."""

    def __init__(self, settings: RunnerSettings):
        self.settings = settings
        self.km = None
        self.cells_in_kernel = 0
        self.kernel_start_seconds = 0.0

    def _start_kernel(self) -> None:
        # The async manager: nbclient then polls the kernel with timeouts and notices when it
        # dies mid-cell (with a blocking client it waits for output forever). IPC transport:
        # the kernel's sockets are files in a private folder, not TCP ports on this machine.
        import tempfile

        from jupyter_client.manager import AsyncKernelManager
        from jupyter_core.utils import run_sync

        start = time.perf_counter()
        env = {**os.environ, **self.settings.env}
        cwd = self.settings.kernel_cwd or self.settings.notebook.parent
        self._sockets = tempfile.mkdtemp(prefix="sm-kernel-")
        self.km = AsyncKernelManager(kernel_name=self.settings.kernel_name, transport="ipc",
                                     ip=os.path.join(self._sockets, "k"))
        run_sync(self.km.start_kernel)(cwd=str(cwd), env=env)
        client = self.km.client()
        client.start_channels()
        run_sync(client.wait_for_ready)(timeout=120)
        client.stop_channels()
        self.cells_in_kernel = 0
        self.kernel_start_seconds += time.perf_counter() - start

    def close(self) -> None:
        from jupyter_core.utils import run_sync

        if self.km is not None:
            with contextlib.suppress(Exception):  # a dead kernel cannot be shut down; no matter
                run_sync(self.km.shutdown_kernel)(now=True)
            self.km = None
            shutil.rmtree(self._sockets, ignore_errors=True)

    def _alive(self) -> bool:
        from jupyter_core.utils import run_sync

        return bool(run_sync(self.km.is_alive)())

    def ensure_kernel(self) -> None:
        recycle = self.cells_in_kernel >= self.settings.cells_per_kernel
        if self.km is None or recycle or not self._alive():
            self.close()
            self._start_kernel()

    def run(self, cell: Cell) -> CellResult:
        """Run ``cell`` unless it is done or another launch holds its claim (sm_utils.grid.locks)."""
        run_dir = cell.run_dir
        if cell.done:
            return CellResult(cell.run_id, cell.label(), True, 0.0, _train_seconds(run_dir))
        claim = CellClaim(run_dir.parent, cell.run_id)
        if not claim.acquire():
            return CellResult(cell.run_id, cell.label(), False, 0.0, elsewhere=claim.describe())
        try:
            if cell.done:  # finished by another launch between the check and the claim
                return CellResult(cell.run_id, cell.label(), True, 0.0, _train_seconds(run_dir))
            return self._execute(cell)
        finally:
            claim.release()

    def _execute(self, cell: Cell) -> CellResult:
        import papermill

        run_dir = cell.run_dir
        if run_dir.exists():  # left by an interrupted or failed attempt: start clean
            shutil.rmtree(run_dir)
        executing = run_dir.parent / ".executing"
        executing.mkdir(parents=True, exist_ok=True)
        live_notebook = executing / f"{cell.run_id}.ipynb"
        self.ensure_kernel()
        self.cells_in_kernel += 1
        start = time.perf_counter()
        error = ""
        try:
            papermill.execute_notebook(
                str(self.settings.notebook), str(live_notebook), parameters=cell.params,
                km=self.km, progress_bar=False, execution_timeout=self.settings.cell_timeout_s,
                log_output=False,
            )
        except Exception as err:  # noqa: BLE001 (recorded per cell; the rest of the grid goes on)
            error = describe_error(err)
        wall = time.perf_counter() - start
        run_dir.mkdir(parents=True, exist_ok=True)
        if live_notebook.exists():
            os.replace(live_notebook, run_dir / NOTEBOOK_FILE)
        if not error and not cell.done:
            error = (f"notebook {self.settings.notebook} finished without writing "
                     f"{run_dir / METRICS_FILE}; it must call sm_utils.runs.execute_run")
        if error:
            # a fresh kernel for the next cell: this one's last traceback (sys.last_traceback)
            # keeps the failed cell's model, optimizer and resident images, on a GPU too
            self.close()
            atomic_write_text(run_dir / ERROR_FILE, f"{cell.label()}\n\n{error}\n")
            executed = run_dir / NOTEBOOK_FILE
            return CellResult(cell.run_id, cell.label(), False, wall, error=error,
                              notebook=str(executed) if executed.exists() else "")
        return CellResult(cell.run_id, cell.label(), True, wall, _train_seconds(run_dir))


def _train_seconds(run_dir: Path) -> float:
    try:
        metrics = json.loads((run_dir / METRICS_FILE).read_text())
    except (OSError, ValueError):
        return 0.0
    return float(metrics.get("train_seconds") or 0.0) + float(metrics.get("eval_seconds") or 0.0)


def run_batch(cells: Sequence[Cell], settings: RunnerSettings) -> tuple[list[CellResult], float]:
    """Run ``cells`` in one warm kernel; returns the results and the kernel start-up seconds.

    This is what a SLURM array task executes. The grid's plugins (``SM_PLUGINS`` in
    ``settings.env``) are imported here first: where one does not resolve or import on this
    node, every cell fails with that error (the path named), and no kernel starts.
    """
    from .. import plugins

    refs = [r for r in settings.env.get(plugins.ENV, "").split(os.pathsep) if r]
    try:
        plugins.load_plugins(refs, where="the grid's plugins (SM_PLUGINS)")
    except plugins.PluginError as err:
        error = f"{type(err).__name__} on node {os.uname().nodename}: {err}"
        return [CellResult(c.run_id, c.label(), False, 0.0, error=error) for c in cells], 0.0
    runner = CellRunner(settings)
    try:
        results = [runner.run(cell) for cell in cells]
    finally:
        runner.close()
    return results, runner.kernel_start_seconds
