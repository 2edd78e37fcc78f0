"""Grids of fine-tuning runs: YAML specification, cells, and resumable execution.

A grid is datasets x confounders (x strengths) x prevalences x folds x sources x
architectures x seeds. Each combination is a *cell*: one execution of notebook 03 with the
parameters of ``docs/RUNS.md``, writing ``runs_dir/<run_id>/``. A cell is done when its run
directory holds ``metrics.json`` (written last, atomically), so a grid killed at any moment and
launched again skips finished cells and redoes only the others.

Execution keeps papermill's cost small by reusing one warm Jupyter kernel for a batch of cells
(torch and timm are imported once per kernel, not once per cell) while still keeping one
executed notebook per cell. Executors: ``local`` (a pool of worker processes, one per GPU on a
GPU machine) and ``slurm`` (submitit job arrays; ``cluster="local"`` runs the same path on this
machine, which is how it is tested).

Modules: :mod:`.spec` (grid files: parsing, overrides, validation, the ``root`` that relative
paths resolve against), :mod:`.cells` (cells and their run ids), :mod:`.runner` (warm-kernel
execution of cells), :mod:`.local` and :mod:`.executor_slurm` (the executors), :mod:`.prepare`
(datasets and weights built before the cells), :mod:`.report` (what a launch did). This module
runs a grid and re-exports their public names.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from ..paths import CELLS_FILE, ERROR_FILE, METRICS_FILE, NOTEBOOK_FILE
from .cells import (
    Cell,
    cells_table,
    expand_cells,
    failed_cells,
    run_id_for,
    source_archs,
    write_cells_index,
)
from .errors import GridError, describe_error, error_headline
from .executor_slurm import run_slurm
from .local import (
    check_gpus_usable,
    check_runs_fit,
    detect_gpus,
    measure_grid_memory,
    measure_run_memory,
    memory_configurations,
    run_local,
    spawned_child,
    visible_gpus,
    worker_environments,
)
from .memos import prefill
from .prepare import PreparationError, execute_once, prepare
from .report import GridReport, progress_bar, write_report
from .runner import CellResult, CellRunner, RunnerSettings, run_batch
from .spec import (
    DEFAULT_NOTEBOOKS,
    ENTRY_KEYS,
    NAMED_LISTS,
    ROOT_HINT,
    RUN_DEFAULTS,
    SLURM_DEFAULTS,
    TOP_LEVEL_KEYS,
    TRAINING_DEFAULTS,
    ConfounderSpec,
    DatasetSpec,
    GridSpec,
    SourceSpec,
    _registry_names,  # noqa: F401  (sm_utils.cli looks the registries up through here)
    load_grid,
    load_grid_plugins,
    merge_grid,
    parse_grid,
    validate_grid,
)

__all__ = [
    "CELLS_FILE",
    "DEFAULT_NOTEBOOKS",
    "ENTRY_KEYS",
    "ERROR_FILE",
    "METRICS_FILE",
    "NAMED_LISTS",
    "NOTEBOOK_FILE",
    "ROOT_HINT",
    "RUN_DEFAULTS",
    "SLURM_DEFAULTS",
    "TOP_LEVEL_KEYS",
    "TRAINING_DEFAULTS",
    "Cell",
    "CellResult",
    "CellRunner",
    "ConfounderSpec",
    "DatasetSpec",
    "GridError",
    "GridReport",
    "GridSpec",
    "PreparationError",
    "RunnerSettings",
    "SourceSpec",
    "cells_table",
    "check_gpus_usable",
    "check_slurm_gpus",
    "detect_gpus",
    "dry_run",
    "error_headline",
    "expand_cells",
    "failed_cells",
    "iter_run_dirs",
    "load_grid",
    "load_grid_plugins",
    "measure_grid_memory",
    "measure_run_memory",
    "memory_configurations",
    "merge_grid",
    "parse_grid",
    "prepare",
    "probe_sources",
    "refuse_unrunnable",
    "run_batch",
    "run_grid",
    "run_id_for",
    "source_archs",
    "spawned_child",
    "validate_grid",
    "visible_gpus",
    "worker_environments",
    "write_cells_index",
    "write_report",
]


def refuse_unrunnable(spec: GridSpec, cells: Sequence[Cell], *, load_weights: bool) -> None:
    """Raise GridError listing every cell that cannot run (see :mod:`sm_utils.preflight`)."""
    from ..preflight import check_cells

    report = check_cells(spec, cells, load_weights=load_weights)
    if report.problems:
        raise GridError(f"grid {spec.name!r} refused before any cell started: {report.text()}")


def dry_run(spec: GridSpec, cells: Sequence[Cell] | None = None) -> str:
    """A listing of the cells and what is already done."""
    import pandas as pd

    cells = expand_cells(spec) if cells is None else cells
    table = cells_table(cells)
    counts = table["status"].value_counts().to_dict()
    with pd.option_context("display.max_rows", None, "display.width", 200):
        text = table.to_string(index=False)
    summary = ", ".join(f"{counts.get(k, 0)} {k}" for k in ("done", "failed", "partial", "pending"))
    if counts.get("waiting"):
        summary += f", {counts['waiting']} waiting for their manifest or weights to be built"
    failures = "".join(f"\n  FAILED {cell.label()}: {headline}\n    full traceback: "
                       f"{cell.run_dir / NOTEBOOK_FILE}" for cell, headline in failed_cells(cells))
    return (f"grid {spec.name!r}: {len(cells)} cells ({summary}); runs in {spec.runs_dir}\n{text}"
            + failures)


def probe_sources(spec: GridSpec, cells: Sequence[Cell], log=print) -> Path | None:
    """A grid with ``probe: true``: each source's encodedness of each confounder before
    fine-tuning (:func:`sm_utils.mechanisms.probe_source`, with the cells' seed, input size and
    resize), once per (dataset, source, arch, seed, confounder, strength), kept in
    ``runs_dir/source_probes.csv`` (resumable) for the results table's ``source_probe_auc``."""
    if not spec.probe:
        return None
    import pandas as pd

    from ..io import atomic_write_csv
    from ..paths import SOURCE_PROBES_FILE

    path = spec.runs_dir / SOURCE_PROBES_FILE
    done = pd.read_csv(path) if path.exists() else pd.DataFrame()
    keys = ["dataset", "source", "arch", "seed", "confounder", "strength"]
    have = set(map(tuple, done[keys].astype(str).to_numpy())) if len(done) else set()
    rows = done.to_dict("records")
    todo = []
    for cell in cells:
        p = cell.params
        key = (cell.dataset, p["source"], p["arch"] or "default", p["seed"], p["confounder"],
               float(p["strength"]))
        if p["confounder"] == "none" or tuple(map(str, key)) in have:
            continue
        have.add(tuple(map(str, key)))
        todo.append((key, cell))
    if not todo:
        return path
    # On the grid's device, in a child process (no CUDA context left in the grid process)
    with spawned_child(spec.run["device"]) as child:
        for key, cell in todo:
            p = cell.params
            log(f"probing source {p['source']!r} for {p['confounder']!r} ({cell.dataset})")
            out = child.submit(_probe_source_on, spec.run["device"], p).result()
            rows.append({**dict(zip(keys, key)), "source_probe_auc": out["probe_auc"],
                         "source_probe_auc_ci_low": out["probe_auc_ci_low"],
                         "source_probe_auc_ci_high": out["probe_auc_ci_high"],
                         "device": out["device"]})
            atomic_write_csv(path, pd.DataFrame(rows))  # after each, so a killed grid resumes
    return path


def _probe_source_on(device: str, params: dict) -> dict:
    """One source probe of :func:`probe_sources`, in its child process."""
    from ..confounders import get_confounder
    from ..mechanisms import probe_source
    from ..training import resolve_device

    resolved = resolve_device(device)
    conf = get_confounder(params["confounder"], strength=params["strength"],
                          **params["confounder_params"])
    out = probe_source(params["source"], weights=params["weights"], arch=params["arch"],
                       manifest=params["manifest"], confounder=conf, init_seed=params["seed"],
                       image_size=int(params["image_size"]), resize=params["resize"],
                       device=resolved)
    return {**out, "device": resolved.type}


def check_slurm_gpus(spec: GridSpec, log=print) -> None:
    """Refuse runs_per_gpu > 1, which the slurm executor would not honour, and say that extra
    GPUs of a job would idle: each job runs its cells one after another on its first GPU."""
    runs_per_gpu, gpus = int(spec.run["runs_per_gpu"]), int(spec.slurm["gpus_per_task"])
    if runs_per_gpu > 1:
        raise GridError(
            f"run.runs_per_gpu={runs_per_gpu} is not honoured by the slurm executor: a job runs "
            "its cells one after another on one GPU. Set run.runs_per_gpu: 1 and raise "
            "slurm.array_parallelism for more runs at once, or run the local executor on a GPU "
            "node (sm run CONFIG inside the job).")
    if gpus > 1:
        log(f"slurm.gpus_per_task={gpus}: a job runs its cells on its first GPU only, so "
            f"{gpus - 1} will sit idle; set slurm.gpus_per_task: 1 and raise "
            "slurm.array_parallelism for more runs at once")


def _runs_per_gpu(spec: GridSpec, todo: Sequence[Cell], log) -> int:
    """The grid's run.runs_per_gpu, checked against the GPUs' free memory before anything
    starts (the need measured on the grid's own model); 1 on a machine without a GPU."""
    runs_per_gpu = int(spec.run["runs_per_gpu"])
    if runs_per_gpu < 1:
        raise GridError(f"run.runs_per_gpu must be a positive integer; found {runs_per_gpu}")
    if runs_per_gpu == 1:
        return 1
    if not detect_gpus():
        log(f"run.runs_per_gpu={runs_per_gpu} ignored: no GPU here (CPU cells run one per "
            "worker; set run.workers)")
        return 1
    need, free, what = measure_grid_memory(todo, runs_per_gpu)
    from ..io import atomic_write_json

    # kept for comparison with the runs' own peaks (metrics.json ran_on.peak_memory_bytes)
    atomic_write_json(spec.runs_dir / "memory_check.json",
                      {"runs_per_gpu": runs_per_gpu, "need_bytes": need, "measured_on": what,
                       "free_bytes": free})
    check_runs_fit(runs_per_gpu, need, free, what)
    return runs_per_gpu


def run_grid(
    spec: GridSpec,
    executor: str = "local",
    workers: int | str | None = None,
    analyse: bool = True,
    progress: bool | None = None,
    slurm_cluster: str | None = None,
    slurm_timeout_s: float | None = None,
    log=print,
    check: bool = True,
) -> GridReport:
    """Run every cell of ``spec`` that is not done, then the analysis notebook.

    executor "local" uses ``workers`` processes ("auto": one per GPU, or a share of the CPU
    cores); "slurm" submits job arrays with submitit (``slurm_cluster="local"`` runs them on this
    machine, "debug" in-process; None requires SLURM). Failures are recorded in the run directories and listed in the
    report; they do not stop the grid. With ``check`` every cell is first resolved against the
    registries (before anything is built) and then against the manifests and weights (after
    preparation, before any cell starts); a grid with cells that cannot run is refused with
    every problem listed (:mod:`sm_utils.preflight`).
    """
    start = time.perf_counter()
    if executor not in ("local", "slurm"):
        raise GridError(f"unknown executor {executor!r}; valid: local, slurm")
    if executor == "local":  # SLURM jobs run on nodes with GPUs of their own
        check_gpus_usable(spec.run["device"], log)
    else:
        check_slurm_gpus(spec, log)
    load_grid_plugins(spec)  # (again, for a spec not made by load_grid): before any cell
    if check:
        refuse_unrunnable(spec, expand_cells(spec), load_weights=False)
    report_prepare = prepare(spec, log=log)
    # Named now: ids are made from the content of the manifests and weights prepare built.
    cells = expand_cells(spec)
    unnamed = [c for c in cells if c.run_id is None]
    if unnamed:
        raise GridError(f"{len(unnamed)} cell(s) have no manifest or weights file after "
                        f"preparation, e.g. {unnamed[0].label()} (manifest "
                        f"{unnamed[0].params['manifest']}, weights {unnamed[0].params['weights']})")
    if check:
        refuse_unrunnable(spec, [c for c in cells if not c.done], load_weights=True)
    spec.runs_dir.mkdir(parents=True, exist_ok=True)
    write_cells_index(spec, cells)
    probe_sources(spec, cells, log)
    todo = [c for c in cells if not c.done]
    if executor == "local" and todo:  # CT dose noise of every cell's slices at once, batched
        memos = prefill(todo, spec.run["device"], log)
        report_prepare += 0.0 if memos is None else memos["seconds"]
    report = GridReport(total=len(cells), already_done=len(cells) - len(todo), prepare_seconds=report_prepare)
    log(f"grid {spec.name!r}: {len(cells)} cells, {report.already_done} already done, {len(todo)} to run")
    from ..plugins import ENV, export

    settings = RunnerSettings(
        notebook=spec.notebooks["fine_tuning"], kernel_name=spec.run["kernel_name"],
        cells_per_kernel=int(spec.run["cells_per_kernel"]), cell_timeout_s=int(spec.run["cell_timeout_s"]),
        # the grid's plugins, by absolute path, for kernels and jobs wherever they start
        env={ENV: export(spec.plugins)} if (spec.plugins or os.environ.get(ENV)) else {},
    )
    if todo:
        bar = progress_bar(len(todo), disable=None if progress is None else not progress)
        try:
            if executor == "local":
                runs_per_gpu = _runs_per_gpu(spec, todo, log)
                envs = worker_environments(workers if workers is not None else spec.run["workers"],
                                           spec.run["threads_per_worker"], runs_per_gpu)
                log(f"local executor: {len(envs)} worker(s)"
                    + (f", {runs_per_gpu} per GPU" if runs_per_gpu > 1 else ""))
                run_local(todo, settings, envs, report, bar)
            else:
                run_slurm(todo, settings, spec, report, bar, slurm_cluster, slurm_timeout_s)
        finally:
            bar.close()
    # runs_dir/.executing stays, even empty: another launch of this grid may be about to write
    # a live notebook there (removing it failed that launch's cell)
    if analyse and spec.notebooks["analysis"].exists():
        analysis_start = time.perf_counter()
        # notebook 04 reads the runs itself; 05 (probe/attribution grids) the table 04 wrote
        steps = [("analysis", "04_analysis.ipynb", "")]
        if spec.probe or spec.attribution:
            steps.append(("mechanisms", "05_mechanisms.ipynb", str(spec.runs_dir / "results.csv")))
        for step, name, results_csv in steps:
            notebook = spec.notebooks.get(step)
            if notebook is None or not notebook.exists():
                continue
            output = spec.runs_dir / name
            log(f"{step}: {notebook} -> {output}")
            try:
                execute_once(notebook, output,
                             {"grid_config": str(spec.path) if spec.path else "",
                              "runs_dir": str(spec.runs_dir), "figures_dir": str(spec.figures_dir),
                              "results_csv": results_csv},
                             spec.run["kernel_name"], int(spec.run["cell_timeout_s"]))
            except Exception as err:  # noqa: BLE001 (a failed analysis must not hide the grid's report)
                report.failures.append((f"{step} notebook", describe_error(err)))
        report.analysis_seconds = time.perf_counter() - analysis_start
    report.wall_seconds = time.perf_counter() - start
    return report


def iter_run_dirs(runs_dir: str | os.PathLike) -> Iterable[Path]:
    """Complete run directories (those with metrics.json) under ``runs_dir``."""
    runs_dir = Path(runs_dir)
    if not runs_dir.exists():
        return []
    return sorted(p.parent for p in runs_dir.glob(f"*/{METRICS_FILE}"))
