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

Relative paths in a grid file are resolved against its ``root``: by default the project the
file belongs to (the nearest folder above it holding pyproject.toml and notebooks/), or, for a
file outside any checkout (e.g. in the user's own study folder), the project of the installed
sm_utils; ``root:`` in the file sets it explicitly (relative to the file).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import shutil
import sys
import time
import traceback
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .claims import CellClaim
from .io import atomic_write_csv, atomic_write_json, atomic_write_text, stable_hash
from .slurm import JobWatcher

METRICS_FILE = "metrics.json"
ERROR_FILE = "error.txt"
NOTEBOOK_FILE = "notebook.ipynb"
CELLS_FILE = "cells.csv"
DEFAULT_NOTEBOOKS = {
    "data": "notebooks/01_data_preparation.ipynb",
    "fine_tuning": "notebooks/03_fine_tuning.ipynb",
    "analysis": "notebooks/04_analysis.ipynb",
}
# Training knobs of notebook 03 (docs/RUNS.md) that a grid may set in its `training` block.
TRAINING_DEFAULTS: dict[str, Any] = {
    "image_size": 64,
    "resize": "bilinear",
    "epochs": 4,
    "batch_size": 32,
    "lr": 1e-3,
    "optimizer": "adam",
    "weight_decay": 0.0,
    "patience": 3,
    "augment": True,
    "drop_rate": 0.5,
}
TOP_LEVEL_KEYS = {
    "name", "description", "root", "runs_dir", "figures_dir", "datasets", "confounders",
    "prevalences", "folds", "sources", "architectures", "seeds", "training", "run", "slurm",
    "notebooks", "reference",
}
RUN_DEFAULTS: dict[str, Any] = {
    "device": "auto",          # passed to notebook 03
    "num_workers": 0,          # data-loader workers inside a run
    "workers": "auto",         # parallel cells on a local machine
    "cells_per_kernel": 16,    # cells executed in one warm kernel before it is restarted
    "cell_timeout_s": 3600,    # per notebook cell (papermill execution_timeout)
    "kernel_name": "python3",
    "threads_per_worker": None,  # CPU threads per worker; None = cores / workers
}
SLURM_DEFAULTS: dict[str, Any] = {
    "partition": None,
    "time_min": 120,           # wall time per array task
    "mem_gb": 32,
    "cpus_per_task": 8,
    "gpus_per_task": 1,
    "array_parallelism": 32,   # array tasks running at once
    "cells_per_job": 4,        # cells per array task (they share a warm kernel)
    "additional_parameters": {},
}


class GridError(ValueError):
    """A grid specification that cannot be run as it is."""


# --------------------------------------------------------------------------- specification


@dataclass
class DatasetSpec:
    name: str                   # the grid's name for it (results, figures, reference lines)
    manifest: Path
    params: dict[str, Any] = field(default_factory=dict)   # builder parameters for notebook 01
    builder: str | None = None  # the registered builder (default: the name)

    @property
    def builder_name(self) -> str:
        return self.builder or self.name


@dataclass
class ConfounderSpec:
    name: str
    strengths: list[float] = field(default_factory=lambda: [1.0])
    params: dict[str, Any] = field(default_factory=dict)
    datasets: list[str] | None = None   # restrict to these datasets (e.g. sex: the sex task only)


@dataclass
class SourceSpec:
    name: str
    weights: Path | None = None
    arch: str | None = None     # this source's architecture; overrides the grid-level list
    # How to make missing weights: {"notebook": path, "parameters": {...}}, run once before the
    # cells; its parameters must make it write the file named by `weights` (a parameter whose
    # value is "{weights}" receives that path).
    build: dict[str, Any] | None = None


@dataclass
class GridSpec:
    name: str
    root: Path
    runs_dir: Path
    figures_dir: Path
    datasets: list[DatasetSpec]
    confounders: list[ConfounderSpec]
    prevalences: list[float]
    folds: list[int]
    sources: list[SourceSpec]
    architectures: list[str | None]
    seeds: list[int]
    training: dict[str, Any]
    run: dict[str, Any]
    slurm: dict[str, Any]
    notebooks: dict[str, Path]
    reference: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None


def _is_project(folder: Path) -> bool:
    return (folder / "pyproject.toml").is_file() and (folder / DEFAULT_NOTEBOOKS["fine_tuning"]).is_file()


def _default_root(config_path: Path) -> Path:
    """The project a grid file belongs to: the nearest folder above it holding this compendium
    (pyproject.toml and notebooks/), else the project of the installed sm_utils."""
    from .paths import project_root

    folder = config_path.resolve().parent
    for candidate in (folder, *folder.parents):
        if _is_project(candidate):
            return candidate
    return project_root().resolve()


ROOT_HINT = ("set `root:` in the grid file to the project folder that holds notebooks/ (paths in "
             "the file are relative to it), or give the notebook's path in the grid's `notebooks:` "
             "block (keys data, fine_tuning, analysis)")


def _as_list(value: Any) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _registry_names(kind: str) -> list[str] | None:
    """Names registered for ``kind`` (datasets, confounders, sources), or None if unavailable."""
    try:
        if kind == "datasets":
            from .datasets import list_datasets
            return list(list_datasets())
        if kind == "confounders":
            from .confounders import list_confounders
            return list(list_confounders())
        if kind == "sources":
            from .sources import list_sources
            return list(list_sources())
    except ImportError:
        return None
    raise ValueError(f"unknown registry {kind!r}")


def _settings_block(raw: dict[str, Any], key: str, defaults: dict[str, Any],
                    problems: list[str]) -> dict[str, Any]:
    """``defaults`` updated by the mapping ``raw[key]``; unknown keys are reported."""
    given = raw.get(key) or {}
    if not isinstance(given, dict):
        problems.append(f"{key}: must be a mapping of settings; found {given!r}")
        return dict(defaults)
    extra = sorted(set(given) - set(defaults))
    if extra:
        problems.append(f"{key}: unknown key(s) {extra}; valid: {sorted(defaults)}")
    return {**defaults, **given}


def _parse_entries(raw: Any, kind: str, problems: list[str]) -> list[dict[str, Any]]:
    """Entries may be plain names or mappings with a ``name`` key."""
    entries = []
    for item in _as_list(raw):
        if isinstance(item, str):
            entries.append({"name": item})
        elif isinstance(item, dict) and isinstance(item.get("name"), str):
            entries.append(dict(item))
        else:
            problems.append(f"{kind}: each entry must be a name or a mapping with 'name'; found {item!r}")
    if not entries:
        problems.append(f"{kind}: at least one entry is required")
    return entries


def _resolve(root: Path, value: Any) -> Path:
    path = Path(str(value)).expanduser()
    return path if path.is_absolute() else root / path


def parse_grid(raw: dict[str, Any], root: Path, path: Path | None = None,
               problems: list[str] | None = None) -> GridSpec:
    """Turn the mapping of a grid file into a :class:`GridSpec` (structure checks only).

    Raises GridError listing every structural problem; with a ``problems`` list, appends them
    to it instead and returns the spec as far as it could be read (for a caller that checks
    more before reporting everything at once).
    """
    collect = problems is not None
    if not isinstance(raw, dict):
        raise GridError(f"a grid file must be a YAML mapping; found {type(raw).__name__}")
    problems = [] if problems is None else problems
    unknown = sorted(set(raw) - TOP_LEVEL_KEYS)
    if unknown:
        problems.append(f"unknown top-level key(s) {unknown}; valid keys: {sorted(TOP_LEVEL_KEYS)}")
    if "root" in raw:
        base = path.resolve().parent if path else Path.cwd()
        root = _resolve(base, raw["root"]).resolve()
    name = str(raw.get("name") or (path.stem if path else "grid"))

    datasets = []
    for entry in _parse_entries(raw.get("datasets"), "datasets", problems):
        manifest = entry.get("manifest", f"data/{entry['name']}/manifest.csv")
        extra = sorted(set(entry) - {"name", "manifest", "params", "builder"})
        if extra:
            problems.append(f"datasets[{entry['name']}]: unknown key(s) {extra}; valid: manifest, "
                            "params, builder")
        datasets.append(DatasetSpec(entry["name"], _resolve(root, manifest),
                                    dict(entry.get("params") or {}), builder=entry.get("builder")))

    confounders = []
    for entry in _parse_entries(raw.get("confounders"), "confounders", problems):
        extra = sorted(set(entry) - {"name", "strength", "strengths", "params", "datasets"})
        if extra:
            problems.append(
                f"confounders[{entry['name']}]: unknown key(s) {extra}; "
                "valid: strength, strengths, params, datasets"
            )
        strengths = _as_list(entry.get("strengths", entry.get("strength", 1.0)))
        if entry["name"] == "none":
            strengths = [0.0]
        only = entry.get("datasets")
        confounders.append(ConfounderSpec(entry["name"], [float(s) for s in strengths],
                                          dict(entry.get("params") or {}),
                                          None if only is None else [str(d) for d in _as_list(only)]))

    sources = []
    for entry in _parse_entries(raw.get("sources"), "sources", problems):
        extra = sorted(set(entry) - {"name", "weights", "build", "arch"})
        if extra:
            problems.append(f"sources[{entry['name']}]: unknown key(s) {extra}; valid: weights, "
                            "build, arch")
        weights = entry.get("weights")
        sources.append(SourceSpec(entry["name"], _resolve(root, weights) if weights else None,
                                  arch=entry.get("arch"), build=entry.get("build")))

    prevalences = []
    for value in _as_list(raw.get("prevalences")):
        try:
            prevalences.append(float(value))
        except (TypeError, ValueError):
            problems.append(f"prevalences must be numbers in [0, 1]; found {value!r}")
    if not prevalences:
        problems.append("prevalences: at least one value in [0, 1] is required, e.g. [0, 0.5, 1]")
    bad = [v for v in prevalences if not 0.0 <= v <= 1.0]
    if bad:
        problems.append(f"prevalences must lie in [0, 1]; found {bad}")

    folds_raw = raw.get("folds", [0])
    folds = list(range(folds_raw)) if isinstance(folds_raw, int) else [int(f) for f in _as_list(folds_raw)]
    if not folds or any(f < 0 for f in folds):
        problems.append(f"folds: a count (e.g. 5) or a list of fold indices >= 0; found {folds_raw!r}")

    architectures = _as_list(raw.get("architectures")) or [None]
    seeds = [int(s) for s in _as_list(raw.get("seeds", 812))]

    training = _settings_block(raw, "training", TRAINING_DEFAULTS, problems)
    run = _settings_block(raw, "run", RUN_DEFAULTS, problems)
    slurm = _settings_block(raw, "slurm", SLURM_DEFAULTS, problems)
    notebooks = _settings_block(raw, "notebooks", DEFAULT_NOTEBOOKS, problems)

    dataset_names = [d.name for d in datasets]
    for confounder in confounders:
        unknown = sorted(set(confounder.datasets or []) - set(dataset_names))
        if unknown:
            problems.append(f"confounders[{confounder.name}].datasets names {unknown}, which are not "
                            f"datasets of this grid; valid: {dataset_names}")
    if problems and not collect:
        raise GridError(_problem_text(path, problems))
    return GridSpec(
        name=name,
        root=root,
        runs_dir=_resolve(root, str(raw.get("runs_dir", "runs/{name}")).replace("{name}", name)),
        figures_dir=_resolve(root, str(raw.get("figures_dir", "figures")).replace("{name}", name)),
        datasets=datasets,
        confounders=confounders,
        prevalences=prevalences,
        folds=folds,
        sources=sources,
        architectures=architectures,
        seeds=seeds,
        training=training,
        run=run,
        slurm=slurm,
        notebooks={k: _resolve(root, v) for k, v in notebooks.items()},
        reference=dict(raw.get("reference") or {}),
        path=path,
    )


def _problem_text(path: Path | None, problems: list[str]) -> str:
    where = f"grid file {path}" if path else "grid specification"
    return f"{where} has {len(problems)} problem(s):\n  - " + "\n  - ".join(problems)


def validate_grid(spec: GridSpec, check_names: bool = True, check_paths: bool = True,
                  problems: list[str] | None = None) -> None:
    """Check names against the registries and (optionally) that files exist; list every problem.

    ``check_paths=False`` skips the filesystem (weights, manifests, notebooks), e.g. to validate
    a paper grid on a machine that has not downloaded the data and weights. With a
    ``problems`` list, appends to it and raises with everything found so far.
    """
    problems = [] if problems is None else problems
    if check_names:
        for kind, names in (
            ("datasets", [d.builder_name for d in spec.datasets]),
            ("confounders", [c.name for c in spec.confounders if c.name != "none"]),
            ("sources", [s.name for s in spec.sources]),
        ):
            valid = _registry_names(kind)
            if valid is None:
                continue
            unknown = [n for n in names if n not in valid]
            if unknown:
                problems.append(f"unknown {kind} {unknown}; valid names: {', '.join(valid)}")
    if check_paths:
        for source in spec.sources:
            if source.weights is not None and not source.weights.exists() and not source.build:
                problems.append(
                    f"source {source.name!r}: weights file {source.weights} does not exist; put the "
                    "weights there, change 'weights', or add a 'build' notebook that makes them"
                )
        for dataset in spec.datasets:
            if not dataset.manifest.exists() and not spec.notebooks["data"].exists():
                problems.append(
                    f"dataset {dataset.name!r}: no manifest at {dataset.manifest} and no data "
                    f"notebook at {spec.notebooks['data']} to build it; {ROOT_HINT}"
                )
        if not spec.notebooks["fine_tuning"].exists():
            problems.append(f"fine-tuning notebook {spec.notebooks['fine_tuning']} does not exist; "
                            f"{ROOT_HINT}")
    workers = spec.run["workers"]
    if workers != "auto" and (not isinstance(workers, int) or workers < 1):
        problems.append(f"run.workers must be 'auto' or a positive integer; found {workers!r}")
    if int(spec.run["cells_per_kernel"]) < 1:
        problems.append("run.cells_per_kernel must be >= 1")
    if problems:
        raise GridError(_problem_text(spec.path, problems))


NAMED_LISTS = ("datasets", "confounders", "sources")


def merge_grid(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``override`` laid over it (a grid file plus e.g. configs/smoke.yaml).

    Mappings merge key by key; the named lists (datasets, confounders, sources) merge entry by
    entry on ``name``: an override changes the entries the grid has and ignores the others (so
    one override, e.g. configs/smoke.yaml, serves several grids); any other value is replaced.
    """
    out = dict(base)
    for key, value in override.items():
        old = out.get(key)
        if isinstance(old, dict) and isinstance(value, dict):
            out[key] = merge_grid(old, value)
        elif key in NAMED_LISTS and isinstance(old, list) and isinstance(value, list):
            def named(entry):
                return {"name": entry} if isinstance(entry, str) else entry
            merged = [named(e) for e in old]
            index = {e.get("name"): i for i, e in enumerate(merged) if isinstance(e, dict)}
            for entry in map(named, value):
                name = entry.get("name") if isinstance(entry, dict) else None
                if name in index:
                    merged[index[name]] = merge_grid(merged[index[name]], entry)
            out[key] = merged
        else:
            out[key] = value
    return out


def _read_yaml(path: Path, what: str) -> dict[str, Any]:
    if not path.exists():
        raise GridError(f"no {what} at {path}; configs/ holds demo.yaml, paper_cxr.yaml, "
                        "paper_ct.yaml and the smoke override smoke.yaml")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise GridError(f"{what} {path} is not valid YAML: {err}") from err
    if raw is not None and not isinstance(raw, dict):
        raise GridError(f"{what} {path} must be a YAML mapping; found {type(raw).__name__}")
    return raw or {}


def load_grid(path: str | os.PathLike, check_names: bool = True, check_paths: bool = True,
              overrides: Sequence[str | os.PathLike | dict[str, Any]] = ()) -> GridSpec:
    """Read, parse and validate a grid YAML file, with override files/mappings laid over it.

    Relative paths, the overrides' included, resolve against the grid file's ``root``.
    """
    path = Path(path)
    raw = _read_yaml(path, "grid file")
    for override in overrides:
        if not isinstance(override, dict):
            override = _read_yaml(Path(override), "override file")
        raw = merge_grid(raw, override)
    problems: list[str] = []  # every problem at once: structure, names and files
    spec = parse_grid(raw, _default_root(path), path.resolve(), problems=problems)
    validate_grid(spec, check_names=check_names, check_paths=check_paths, problems=problems)
    return spec


# --------------------------------------------------------------------------- cells


def run_id_for(params: dict[str, Any], manifest: str | None = None) -> str:
    """Run id of notebook 03's parameters: :func:`sm_utils.identity.run_id`, the rule notebook 03
    (``sm_utils.runs.RunConfig.run_id``) uses too, without importing torch."""
    from .identity import run_id

    return run_id(params, manifest=manifest)


@dataclass(frozen=True)
class Cell:
    """One run of notebook 03: its parameters and where its run directory goes.

    ``run_id`` is None while an input the id is made from (the manifest, a weights file) does
    not exist yet: the grid builds it, then names the cell.
    """

    dataset: str
    params: dict[str, Any]
    run_id: str | None

    @property
    def run_dir(self) -> Path | None:
        return None if self.run_id is None else Path(self.params["runs_dir"]) / self.run_id

    @property
    def done(self) -> bool:
        return self.run_id is not None and (self.run_dir / METRICS_FILE).exists()

    @property
    def status(self) -> str:
        if self.run_id is None:
            return "waiting"  # for its manifest or weights to be built
        if self.done:
            return "done"
        if (self.run_dir / ERROR_FILE).exists():
            return "failed"
        if self.run_dir.exists():
            return "partial"
        return "pending"

    def label(self) -> str:
        p = self.params
        return (f"{self.dataset} {p['confounder']}(s={p['strength']:g}) p={p['p']:g} fold={p['fold']} "
                f"{p['source']}" + (f"/{p['arch']}" if p.get("arch") else "") + f" seed={p['seed']}")


def _accepted_archs(kind: str) -> tuple[str, ...] | None:
    """Architectures the registered source ``kind`` can fill (None: any, or unknown source)."""
    try:
        from .sources import SourceError, get_source
    except ImportError:
        return None
    try:
        return get_source(kind).archs
    except SourceError:
        return None  # an unknown name is reported by validation


def source_archs(spec: GridSpec, source: SourceSpec) -> list[str | None]:
    """The architectures ``source`` runs with: its own ``arch``, else the grid-level ones it
    accepts, else its default (None)."""
    if source.arch:
        return [source.arch]
    accepted = _accepted_archs(source.name)
    archs = [a for a in spec.architectures if a is None or accepted is None or a in accepted]
    return archs or [None]


def expand_cells(spec: GridSpec) -> list[Cell]:
    """Every cell of the grid, in a stable order (datasets, confounders, p, folds, sources, ...).

    A source with its own ``arch`` uses it; the grid-level ``architectures`` apply only to the
    sources that accept them (e.g. not to ``radimagenet``, which takes only keras_resnet50);
    a source that accepts none of them runs with its default architecture.
    """
    from .identity import IdentityError, manifest_digest, run_identity

    cells = []
    seen: set[str] = set()
    digests: dict[str, str | None] = {}
    pairs = [(source, arch) for source in spec.sources for arch in source_archs(spec, source)]
    for dataset, confounder in itertools.product(spec.datasets, spec.confounders):
        if confounder.datasets is not None and dataset.name not in confounder.datasets:
            continue
        for strength, p, fold, (source, arch), seed in itertools.product(
            confounder.strengths, spec.prevalences, spec.folds, pairs, spec.seeds,
        ):
            params = {
                "manifest": str(dataset.manifest),
                "confounder": confounder.name,
                "strength": float(strength),
                "confounder_params": dict(confounder.params),
                "p": float(p),
                "fold": int(fold),
                "source": source.name,
                "weights": str(source.weights) if source.weights else None,
                "arch": arch,
                **spec.training,
                "seed": int(seed),
                "device": spec.run["device"],
                "num_workers": int(spec.run["num_workers"]),
                "runs_dir": str(spec.runs_dir),
            }
            # e.g. confounder "none" at several p: one run suffices
            key = stable_hash([run_identity({**params, "weights": None}, manifest=params["manifest"]),
                               params["weights"]])
            if key in seen:
                continue
            seen.add(key)
            if params["manifest"] not in digests:
                try:
                    digests[params["manifest"]] = manifest_digest(params["manifest"])
                except IdentityError:
                    digests[params["manifest"]] = None
            try:
                run_id = (None if digests[params["manifest"]] is None
                          else run_id_for(params, manifest=digests[params["manifest"]]))
            except IdentityError:  # its weights are built by the grid
                run_id = None
            cells.append(Cell(dataset.name, params, run_id))
    return cells


def cells_table(cells: Sequence[Cell]):
    """One row per cell: run id, dataset, the grid axes and the current status."""
    import pandas as pd

    rows = [
        {"run_id": c.run_id, "dataset": c.dataset, "confounder": c.params["confounder"],
         "strength": c.params["strength"], "p": c.params["p"], "fold": c.params["fold"],
         "source": c.params["source"], "arch": c.params["arch"], "seed": c.params["seed"],
         "status": c.status}
        for c in cells
    ]
    return pd.DataFrame(rows)


def failed_cells(cells: Sequence[Cell]) -> list[tuple[Cell, str]]:
    """Each failed cell with its error's type and message (from its run directory)."""
    out = []
    for cell in cells:
        if cell.status == "failed":
            text = (cell.run_dir / ERROR_FILE).read_text()
            out.append((cell, error_headline(text.split("\n\n", 1)[-1])))
    return out


def write_cells_index(spec: GridSpec, cells: Sequence[Cell]) -> Path:
    """``runs_dir/cells.csv``: the grid's cells (lets the analysis map run ids to datasets)."""
    table = cells_table(cells).drop(columns=["status"])
    return atomic_write_csv(spec.runs_dir / CELLS_FILE, table)


# --------------------------------------------------------------------------- execution


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

    def _ensure_kernel(self) -> None:
        recycle = self.cells_in_kernel >= self.settings.cells_per_kernel
        if self.km is None or recycle or not self._alive():
            self.close()
            self._start_kernel()

    def run(self, cell: Cell) -> CellResult:
        """Run ``cell`` unless it is done or another launch holds its claim (sm_utils.claims)."""
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
        self._ensure_kernel()
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
            error = _describe_error(err)
        wall = time.perf_counter() - start
        run_dir.mkdir(parents=True, exist_ok=True)
        if live_notebook.exists():
            os.replace(live_notebook, run_dir / NOTEBOOK_FILE)
        if not error and not cell.done:
            error = (f"notebook {self.settings.notebook} finished without writing "
                     f"{run_dir / METRICS_FILE}; it must call sm_utils.runs.execute_run")
        if error:
            atomic_write_text(run_dir / ERROR_FILE, f"{cell.label()}\n\n{error}\n")
            executed = run_dir / NOTEBOOK_FILE
            return CellResult(cell.run_id, cell.label(), False, wall, error=error,
                              notebook=str(executed) if executed.exists() else "")
        return CellResult(cell.run_id, cell.label(), True, wall, _train_seconds(run_dir))


def _describe_error(err: BaseException) -> str:
    """The exception's type and message on the first line, then its traceback."""
    name = type(err).__name__
    if name == "PapermillExecutionError":  # the traceback from inside the notebook
        return f"{err.ename}: {err.evalue}\n" + "\n".join(getattr(err, "traceback", []) or [])
    return f"{name}: {err}\n" + "".join(traceback.format_exception(err))


def error_headline(error: str) -> str:
    """The first non-empty line of an error text (its exception type and message)."""
    return next((line.strip() for line in error.splitlines() if line.strip()), "unknown error")


def _train_seconds(run_dir: Path) -> float:
    try:
        metrics = json.loads((run_dir / METRICS_FILE).read_text())
    except (OSError, ValueError):
        return 0.0
    return float(metrics.get("train_seconds") or 0.0) + float(metrics.get("eval_seconds") or 0.0)


def run_batch(cells: Sequence[Cell], settings: RunnerSettings) -> tuple[list[CellResult], float]:
    """Run ``cells`` in one warm kernel; returns the results and the kernel start-up seconds.

    This is what a SLURM array task executes.
    """
    runner = CellRunner(settings)
    try:
        results = [runner.run(cell) for cell in cells]
    finally:
        runner.close()
    return results, runner.kernel_start_seconds


def _local_worker(settings: RunnerSettings, tasks, results, parent_pid: int) -> None:
    """Worker process: pull cells from ``tasks``, push ("start"/"done", ...) to ``results``."""
    import queue as queue_module

    runner = CellRunner(settings)
    try:
        while True:
            try:
                cell = tasks.get(timeout=2.0)
            except queue_module.Empty:
                if os.getppid() != parent_pid:  # the grid process is gone: stop
                    return
                continue
            if cell is None or os.getppid() != parent_pid:  # done, or the grid process is gone
                return
            results.put(("start", os.getpid(), cell.run_id))
            results.put(("done", os.getpid(), runner.run(cell)))
    finally:
        runner.close()
        results.put(("kernel", os.getpid(), runner.kernel_start_seconds))


def detect_gpus() -> int:
    """Number of visible NVIDIA GPUs (0 without a GPU or nvidia-smi)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([v for v in visible.split(",") if v.strip() not in ("", "-1")])
    if shutil.which("nvidia-smi") is None:
        return 0
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20,
                             check=False)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))


def worker_environments(workers: int | str, threads_per_worker: int | None = None) -> list[dict[str, str]]:
    """Environment per local worker: a GPU each on a GPU machine, else a share of the cores."""
    gpus = detect_gpus()
    if workers == "auto":
        workers = gpus if gpus else max(1, (os.cpu_count() or 1) // max(1, threads_per_worker or 1))
        if not gpus and threads_per_worker is None:
            workers = 1 if (os.cpu_count() or 1) < 2 else min(workers, 4)
    workers = int(workers)
    threads = threads_per_worker or max(1, (os.cpu_count() or 1) // workers)
    envs = []
    for index in range(workers):
        env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
               "SM_WORKER_INDEX": str(index)}
        if gpus:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            ids = visible.split(",") if visible else [str(i) for i in range(gpus)]
            env["CUDA_VISIBLE_DEVICES"] = ids[index % len(ids)].strip()
        envs.append(env)
    return envs


@dataclass
class GridReport:
    """What a grid launch did; ``failures`` lists (label, first line of the error)."""

    total: int
    already_done: int
    succeeded: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    elsewhere: list[tuple[str, str]] = field(default_factory=list)  # run by another launch
    notebooks: dict[str, str] = field(default_factory=dict)  # failed cell -> executed notebook
    wall_seconds: float = 0.0
    cells_wall_seconds: float = 0.0
    train_seconds: float = 0.0
    kernel_start_seconds: float = 0.0
    prepare_seconds: float = 0.0
    analysis_seconds: float = 0.0

    @property
    def overhead_share(self) -> float:
        """Share of the grid's worker time not spent training/evaluating inside run_batch."""
        busy = self.cells_wall_seconds + self.kernel_start_seconds
        return 1.0 - self.train_seconds / busy if busy > 0 else 0.0

    def summary(self) -> str:
        lines = [
            (f"cells: {self.total} in the grid, {self.already_done} already done, "
             f"{self.succeeded} run now, {len(self.failures)} failed"
             + (f", {len(self.elsewhere)} left to another launch that holds them"
                if self.elsewhere else "")),
            (f"wall time {self.wall_seconds:.1f} s (preparation {self.prepare_seconds:.1f} s, "
             f"analysis {self.analysis_seconds:.1f} s); worker time: kernels start-up "
             f"{self.kernel_start_seconds:.1f} s, notebooks {self.cells_wall_seconds:.1f} s, of which "
             f"training+evaluation {self.train_seconds:.1f} s; overhead share "
             f"{100 * self.overhead_share:.1f} %"),
        ]
        for label, error in self.failures:
            lines.append(f"  FAILED {label}: {error_headline(error)}")
            if self.notebooks.get(label):
                lines.append(f"    full traceback: {self.notebooks[label]}")
        return "\n".join(lines)


def _progress(total: int, disable: bool | None):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="grid", unit="cell", disable=disable, dynamic_ncols=True,
                file=sys.stdout)


def _run_local(cells: list[Cell], settings: RunnerSettings, envs: list[dict[str, str]],
               report: GridReport, progress) -> None:
    import multiprocessing as mp
    import queue as queue_module

    ctx = mp.get_context("spawn")
    tasks, results = ctx.Queue(), ctx.Queue()
    for cell in cells:
        tasks.put(cell)
    label_of = {c.run_id: c.label() for c in cells}

    def start_worker(env: dict[str, str]):
        worker_settings = dataclasses.replace(settings, env={**settings.env, **env})
        proc = ctx.Process(target=_local_worker, args=(worker_settings, tasks, results, os.getpid()),
                           daemon=False)
        proc.start()
        return proc

    workers = {}
    for env in envs[: max(1, len(cells))]:
        proc = start_worker(env)
        workers[proc.pid] = (proc, env)
    for _ in workers:
        tasks.put(None)
    in_flight: dict[int, str] = {}
    finished = 0
    closed: set[int] = set()
    while finished < len(cells) or len(closed) < len(workers):
        try:
            kind, pid, payload = results.get(timeout=1.0)
        except queue_module.Empty:
            for pid, (proc, env) in list(workers.items()):
                if pid in closed or proc.is_alive():
                    continue
                closed.add(pid)  # died without saying goodbye (killed, out of memory)
                run_id = in_flight.pop(pid, None)
                if run_id is not None:
                    message = f"worker process {pid} died (exit code {proc.exitcode}) during this cell"
                    report.failures.append((label_of[run_id], message))
                    finished += 1
                    progress.update(1)
                if finished < len(cells):  # replace it so the remaining cells still run
                    new = start_worker(env)
                    workers[new.pid] = (new, env)
                    tasks.put(None)
            continue
        if kind == "start":
            in_flight[pid] = payload
        elif kind == "done":
            in_flight.pop(pid, None)
            _account(payload, report)
            finished += 1
            progress.update(1)
            progress.set_postfix(ok=report.succeeded, failed=len(report.failures))
        elif kind == "kernel":
            report.kernel_start_seconds += payload
            closed.add(pid)
    for proc, _ in workers.values():
        proc.join(timeout=30)


def _account(result: CellResult, report: GridReport) -> None:
    report.cells_wall_seconds += result.wall_seconds
    report.train_seconds += result.train_seconds
    if result.ok:
        report.succeeded += 1
    elif result.elsewhere:
        report.elsewhere.append((result.label, result.elsewhere))
    else:
        report.failures.append((result.label, result.error))
        if result.notebook:
            report.notebooks[result.label] = result.notebook


def _batches(items: Sequence, size: int) -> list[list]:
    return [list(items[i: i + size]) for i in range(0, len(items), size)]


def _run_slurm(cells: list[Cell], settings: RunnerSettings, spec: GridSpec, report: GridReport,
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
                _account(result, report)
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


class PreparationError(GridError):
    """A step before the cells (building a dataset or a source) failed; ``__cause__`` holds the
    notebook's error and ``notebook`` the executed notebook with its full traceback."""

    def __init__(self, message: str, notebook: Path):
        super().__init__(message)
        self.notebook = notebook


def _execute_once(notebook: Path, output: Path, parameters: dict[str, Any], kernel_name: str,
                  timeout_s: int, cwd: Path | None = None, step: str | None = None) -> None:
    """Execute a one-off notebook (data preparation, source build, analysis) with papermill,
    in a kernel started as the cells' are (IPC transport, dead kernels noticed). With a
    ``step`` name, a failure is raised as one PreparationError naming the step, the cause's
    type and message and the executed notebook."""
    import papermill

    output.parent.mkdir(parents=True, exist_ok=True)
    runner = CellRunner(RunnerSettings(notebook=notebook, kernel_name=kernel_name,
                                       kernel_cwd=cwd or notebook.parent))
    runner._ensure_kernel()
    try:
        papermill.execute_notebook(str(notebook), str(output), parameters=parameters,
                                   km=runner.km, progress_bar=sys.stderr.isatty(),
                                   execution_timeout=timeout_s)
    except Exception as err:
        if step is None:
            raise
        raise PreparationError(f"{step} failed: {error_headline(_describe_error(err))} "
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


def prepare(spec: GridSpec, log=print) -> float:
    """Notebook 01 once per dataset whose manifest is missing; source builds whose weights are."""
    start = time.perf_counter()
    prepare_dir = spec.runs_dir / "_prepare"
    for dataset in spec.datasets:
        recorded = dataset.manifest.parent / "grid_dataset_params.json"
        if dataset.manifest.exists():
            _check_built_with(recorded, dataset.params, dataset.manifest,
                              f"delete {dataset.manifest.parent} to rebuild it, or give this grid "
                              "another manifest path")
            continue
        log(f"building dataset {dataset.name!r} ({dataset.builder_name}) with "
            f"{spec.notebooks['data']} -> {dataset.manifest}")
        _execute_once(
            spec.notebooks["data"], prepare_dir / f"01_{dataset.name}.ipynb",
            {"dataset": dataset.builder_name, "out_dir": str(dataset.manifest.parent),
             **dataset.params},
            spec.run["kernel_name"], int(spec.run["cell_timeout_s"]),
            step=f"building dataset {dataset.name!r}",
        )
        if not dataset.manifest.exists():
            raise GridError(f"{spec.notebooks['data']} ran for {dataset.name!r} but wrote no manifest "
                            f"at {dataset.manifest}; see {prepare_dir}")
        atomic_write_json(recorded, dataset.params)
    for source in spec.sources:
        if source.weights is None or not source.build:
            continue
        build = dict(source.build)
        recorded = source.weights.with_name(source.weights.name + ".grid_build.json")
        if source.weights.exists():
            _check_built_with(recorded, build, source.weights,
                              f"delete {source.weights} to rebuild it, or give this source "
                              "another weights path")
            continue
        notebook = _resolve(spec.root, source.build["notebook"])
        log(f"building weights of source {source.name!r} with {notebook} -> {source.weights}")
        # "{weights}" in a parameter stands for the absolute weights path (one truth, no cwd doubt)
        params = {k: str(source.weights) if v == "{weights}" else v
                  for k, v in dict(source.build.get("parameters") or {}).items()}
        _execute_once(notebook, prepare_dir / f"source_{source.name}.ipynb", params,
                      spec.run["kernel_name"], int(spec.run["cell_timeout_s"]),
                      step=f"building the weights of source {source.name!r}")
        if not source.weights.exists():
            raise GridError(f"{notebook} ran for source {source.name!r} but wrote no weights at "
                            f"{source.weights}; see {prepare_dir}")
        atomic_write_json(recorded, build)
    return time.perf_counter() - start


def refuse_unrunnable(spec: GridSpec, cells: Sequence[Cell], *, load_weights: bool) -> None:
    """Raise GridError listing every cell that cannot run (see :mod:`sm_utils.preflight`)."""
    from .preflight import check_cells

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
    todo = [c for c in cells if not c.done]
    report = GridReport(total=len(cells), already_done=len(cells) - len(todo), prepare_seconds=report_prepare)
    log(f"grid {spec.name!r}: {len(cells)} cells, {report.already_done} already done, {len(todo)} to run")
    settings = RunnerSettings(
        notebook=spec.notebooks["fine_tuning"], kernel_name=spec.run["kernel_name"],
        cells_per_kernel=int(spec.run["cells_per_kernel"]), cell_timeout_s=int(spec.run["cell_timeout_s"]),
    )
    if todo:
        bar = _progress(len(todo), disable=None if progress is None else not progress)
        try:
            if executor == "local":
                envs = worker_environments(workers if workers is not None else spec.run["workers"],
                                           spec.run["threads_per_worker"])
                log(f"local executor: {len(envs)} worker(s)")
                _run_local(todo, settings, envs, report, bar)
            else:
                _run_slurm(todo, settings, spec, report, bar, slurm_cluster, slurm_timeout_s)
        finally:
            bar.close()
    executing = spec.runs_dir / ".executing"
    if executing.exists() and not any(executing.iterdir()):
        executing.rmdir()
    if analyse and spec.notebooks["analysis"].exists():
        analysis_start = time.perf_counter()
        output = spec.runs_dir / "04_analysis.ipynb"
        log(f"analysis: {spec.notebooks['analysis']} -> {output}")
        try:
            _execute_once(spec.notebooks["analysis"], output,
                          {"grid_config": str(spec.path) if spec.path else "",
                           "runs_dir": str(spec.runs_dir), "figures_dir": str(spec.figures_dir),
                           "results_csv": ""},
                          spec.run["kernel_name"], int(spec.run["cell_timeout_s"]))
        except Exception as err:  # noqa: BLE001 (a failed analysis must not hide the grid's report)
            report.failures.append(("analysis notebook", _describe_error(err)))
        report.analysis_seconds = time.perf_counter() - analysis_start
    report.wall_seconds = time.perf_counter() - start
    return report


def iter_run_dirs(runs_dir: str | os.PathLike) -> Iterable[Path]:
    """Complete run directories (those with metrics.json) under ``runs_dir``."""
    runs_dir = Path(runs_dir)
    if not runs_dir.exists():
        return []
    return sorted(p.parent for p in runs_dir.glob(f"*/{METRICS_FILE}"))


def write_report(spec: GridSpec, report: GridReport) -> Path:
    """``runs_dir/grid_report.json``: counts, timings and failures of the last launch (each
    with its exception's type and message and the executed notebook holding the traceback)."""
    data = {**dataclasses.asdict(report), "overhead_share": report.overhead_share,
            "failed_cells": [{"cell": label, "error": error_headline(error),
                              "notebook": report.notebooks.get(label)}
                             for label, error in report.failures]}
    return atomic_write_json(spec.runs_dir / "grid_report.json", data)
