"""Preparation before the cells: notebook 01 builds each missing dataset, a source's build
notebook its missing weights; a file an earlier grid built with other parameters is refused.
Each build is claimed like a cell (:mod:`.locks`): of two launches at once, one builds and the
other waits for it, then uses what it built."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from ..io import atomic_write_json
from .errors import GridError, describe_error, error_headline
from .locks import CellClaim
from .runner import CellRunner, RunnerSettings
from .spec import GridSpec, resolve_path


class PreparationError(GridError):
    """A step before the cells (building a dataset or a source) failed; ``__cause__`` holds the
    notebook's error and ``notebook`` the executed notebook with its full traceback."""

    def __init__(self, message: str, notebook: Path):
        super().__init__(message)
        self.notebook = notebook


def execute_once(notebook: Path, output: Path, parameters: dict[str, Any], kernel_name: str,
                 timeout_s: int, cwd: Path | None = None, step: str | None = None) -> None:
    """Execute a one-off notebook (data preparation, source build, analysis) with papermill,
    in a kernel started as the cells' are (IPC transport, dead kernels noticed). With a
    ``step`` name, a failure is raised as one PreparationError naming the step, the cause's
    type and message and the executed notebook."""
    import papermill

    output.parent.mkdir(parents=True, exist_ok=True)
    runner = CellRunner(RunnerSettings(notebook=notebook, kernel_name=kernel_name,
                                       kernel_cwd=cwd or notebook.parent))
    runner.ensure_kernel()
    try:
        papermill.execute_notebook(str(notebook), str(output), parameters=parameters,
                                   km=runner.km, progress_bar=sys.stderr.isatty(),
                                   execution_timeout=timeout_s)
    except Exception as err:
        if step is None:
            raise
        raise PreparationError(f"{step} failed: {error_headline(describe_error(err))} "
                               f"(full traceback: {output})", output) from err
    finally:
        runner.close()


def _check_built_with(recorded: Path, params: dict[str, Any], built: Path, fix: str) -> None:
    """Refuse a file an earlier grid built with other parameters (it would silently be reused)."""
    if not recorded.exists():
        return
    built_with = json.loads(recorded.read_text())
    if built_with != params:
        raise GridError(f"{built} was built with {built_with}, but the grid asks for {params}; {fix}")


def _dataset_record(dataset) -> dict[str, Any]:
    """What a manifest is built with: the grid's params and, for a builder from a plugin, the
    hash of its code (so an edited builder does not silently reuse the old manifest)."""
    from ..plugins import code_digest

    code = code_digest("dataset", dataset.builder_name)
    return {**dataset.params, **({"builder_code_sha256": code} if code else {})}


# What a grid's dataset gets where its params say nothing: 5 folds and the builder's own
# defaults, as before notebook 01's defaults became the demo's (3 folds, easy phantoms).
GRID_DATA_DEFAULTS = {"n_folds": 5, "dataset_params": {}}


WAIT_POLL_S = 2.0


def claimed_build(target: Path, claim: CellClaim, what: str, build, log, *,
                  poll_s: float = WAIT_POLL_S) -> None:
    """Run ``build()``, which checks ``target`` or makes it. Where ``target`` is missing, hold
    ``claim`` for it; while another launch holds it, wait (saying so once), then run it, which
    finds what that launch built. A launch that died leaves its claim abandoned: taken over."""
    if target.exists():  # built: only checked (nothing written beside read-only data)
        build()
        return
    waiting = False
    while not claim.acquire():
        if not waiting:
            log(f"waiting for {what}, {claim.describe()}")
            waiting = True
        time.sleep(poll_s)
    try:
        build()
    finally:
        claim.release()


def prepare(spec: GridSpec, log=print) -> float:
    """Notebook 01 once per dataset whose manifest is missing; source builds whose weights are."""
    start = time.perf_counter()
    for dataset in spec.datasets:
        # claimed beside the dataset's folder: two grids sharing a data set share the claim
        folder = dataset.manifest.parent
        claimed_build(dataset.manifest, CellClaim(folder.parent, f"build-{folder.name}"),
                      f"dataset {dataset.name!r}", lambda d=dataset: _build_dataset(spec, d, log),
                      log)
    for source in spec.sources:
        if source.weights is None or not source.build:
            continue
        claimed_build(source.weights,
                      CellClaim(source.weights.parent, f"build-{source.weights.name}"),
                      f"the weights of source {source.name!r}",
                      lambda s=source: _build_source(spec, s, log), log)
    return time.perf_counter() - start


def _build_dataset(spec: GridSpec, dataset, log) -> None:
    prepare_dir = spec.runs_dir / "_prepare"
    recorded = dataset.manifest.parent / "grid_dataset_params.json"
    built_with = _dataset_record(dataset)
    if dataset.manifest.exists():
        _check_built_with(recorded, built_with, dataset.manifest,
                          f"delete {dataset.manifest.parent} to rebuild it (its runs then get "
                          "new ids; the old ones stay), or give this grid another manifest path")
        return
    log(f"building dataset {dataset.name!r} ({dataset.builder_name}) with "
        f"{spec.notebooks['data']} -> {dataset.manifest}")
    execute_once(
        spec.notebooks["data"], prepare_dir / f"01_{dataset.name}.ipynb",
        {"dataset": dataset.builder_name, "out_dir": str(dataset.manifest.parent),
         **GRID_DATA_DEFAULTS, **dataset.params},
        spec.run["kernel_name"], int(spec.run["cell_timeout_s"]),
        step=f"building dataset {dataset.name!r}",
    )
    if not dataset.manifest.exists():
        raise GridError(f"{spec.notebooks['data']} ran for {dataset.name!r} but wrote no manifest "
                        f"at {dataset.manifest}; see {prepare_dir}")
    atomic_write_json(recorded, built_with)


def build_function(reference: str):
    """The callable a source's ``build: {function: "package.module:name"}`` names."""
    import importlib

    module, _, name = str(reference).partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise GridError(f"build function {reference!r}: expected 'package.module:function' that "
                        f"can be imported; {type(err).__name__}: {err}") from err


def _build_source(spec: GridSpec, source, log) -> None:
    prepare_dir = spec.runs_dir / "_prepare"
    build = dict(source.build)
    recorded = source.weights.with_name(source.weights.name + ".grid_build.json")
    if source.weights.exists():
        _check_built_with(recorded, build, source.weights,
                          f"delete {source.weights} to rebuild it, or give this source "
                          "another weights path")
        return
    # "{weights}" in a parameter stands for the absolute weights path (one truth, no cwd doubt)
    params = {k: str(source.weights) if v == "{weights}" else v
              for k, v in dict(source.build.get("parameters") or {}).items()}
    if "function" in source.build:  # e.g. sm_utils.sources.stand_ins:save_random_source
        maker = source.build["function"]
        log(f"building weights of source {source.name!r} with {maker} -> {source.weights}")
        make = build_function(maker)
        try:
            make(**params)
        except Exception as err:
            raise GridError(f"building the weights of source {source.name!r} with {maker}"
                            f"(**{params}) failed: {type(err).__name__}: {err}") from err
    else:
        notebook = resolve_path(spec.root, source.build["notebook"])
        log(f"building weights of source {source.name!r} with {notebook} -> {source.weights}")
        execute_once(notebook, prepare_dir / f"source_{source.name}.ipynb", params,
                     spec.run["kernel_name"], int(spec.run["cell_timeout_s"]),
                     step=f"building the weights of source {source.name!r}")
    if not source.weights.exists():
        raise GridError(f"the build of source {source.name!r} ran but wrote no weights at "
                        f"{source.weights}; see {prepare_dir}")
    atomic_write_json(recorded, build)
