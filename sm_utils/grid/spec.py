"""Grid files: the specification's dataclasses and defaults, parsing, overrides, validation.

Relative paths in a grid file are resolved against its ``root``: by default the project the
file belongs to (the nearest folder above it holding pyproject.toml and notebooks/), or, for a
file outside any checkout (e.g. in the user's own study folder), the project of the installed
sm_utils; ``root:`` in the file sets it explicitly (relative to the file).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..identity import MODES
from .errors import GridError
from .extend import load_grid_plugins, notebook_paths, plugins_block

DEFAULT_NOTEBOOKS = {
    "data": "notebooks/01_data_preparation.ipynb",
    "fine_tuning": "notebooks/03_fine_tuning.ipynb",
    "analysis": "notebooks/04_analysis.ipynb",
    "mechanisms": "notebooks/05_mechanisms.ipynb",  # after 04, for a grid with probe/attribution
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
    # finetune (every layer, the paper) | linear_probe (the head on a frozen backbone), or a
    # list of both: an axis of the grid, each source run each way
    "mode": "finetune",
}
TOP_LEVEL_KEYS = {
    "name", "description", "root", "runs_dir", "figures_dir", "datasets", "confounders",
    "prevalences", "folds", "sources", "architectures", "seeds", "training", "run", "slurm",
    "notebooks", "reference", "probe", "attribution", "claims", "plugins",
}
RUN_DEFAULTS: dict[str, Any] = {
    "device": "auto",          # passed to notebook 03
    "precision": "auto",       # of training, passed to notebook 03: auto (bf16 on GPUs) | fp32 | bf16
    "deterministic": False,    # GPU runs without autotuning or TF32 (slower, repeatable)
    "num_workers": 0,          # data-loader workers inside a run
    "workers": "auto",         # parallel cells on a local machine
    "cells_per_kernel": 16,    # cells executed in one warm kernel before it is restarted
    "cell_timeout_s": 3600,    # per notebook cell (papermill execution_timeout)
    "kernel_name": "python3",
    "threads_per_worker": None,  # CPU threads per worker; None = cores / workers
    "runs_per_gpu": 1,         # concurrent cells per GPU (workers = GPUs x this); no effect on CPU
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
# Keys an entry of a named list may have besides ``name``, in the order error messages list them.
ENTRY_KEYS = {
    "datasets": ("manifest", "params", "builder"),
    "confounders": ("strength", "strengths", "params", "datasets"),
    "sources": ("weights", "build", "arch"),
}


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
    claims: dict[str, Any] = field(default_factory=dict)   # {roles: {imagenet: src, ...}}
    path: Path | None = None
    probe: bool = False          # every run probes its model; each source is probed before
    attribution: bool = False    # every run measures attribution inside the confounder's mask
    description: str | None = None
    # modules or .py files (absolute) that register names; loaded by load_grid in every process
    plugins: list[str] = field(default_factory=list)
    modes: list[str] = field(default_factory=lambda: ["finetune"])  # training.mode, as a list


def _is_project(folder: Path) -> bool:
    return (folder / "pyproject.toml").is_file() and (folder / DEFAULT_NOTEBOOKS["fine_tuning"]).is_file()


def _default_root(config_path: Path) -> Path:
    """The project a grid file belongs to: the nearest folder above it holding this compendium
    (pyproject.toml and notebooks/), else the project of the installed sm_utils."""
    from ..paths import project_root

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
            from ..datasets import list_datasets
            return list(list_datasets())
        if kind == "confounders":
            from ..confounders import list_confounders
            return list(list_confounders())
        if kind == "sources":
            from ..sources import list_sources
            return list(list_sources())
        if kind == "metrics":
            from ..metrics import list_metrics
            return list(list_metrics())
    except ImportError:
        return None
    raise ValueError(f"unknown registry {kind!r}")


def _unknown_keys(where: str, given: Iterable[str], valid: Iterable[str], problems: list[str],
                  listed: str | None = None) -> None:
    """Report the keys of ``given`` that are not in ``valid`` (named ``listed``, else as a
    sorted list) as one problem of ``where``."""
    valid = list(valid)
    extra = sorted(set(given) - set(valid))
    if extra:
        problems.append(f"{where}: unknown key(s) {extra}; valid: "
                        f"{sorted(valid) if listed is None else listed}")


def _settings_block(raw: dict[str, Any], key: str, defaults: dict[str, Any],
                    problems: list[str]) -> dict[str, Any]:
    """``defaults`` updated by the mapping ``raw[key]``; unknown keys are reported."""
    given = raw.get(key) or {}
    if not isinstance(given, dict):
        problems.append(f"{key}: must be a mapping of settings; found {given!r}")
        return dict(defaults)
    _unknown_keys(key, given, defaults, problems)
    return {**defaults, **given}


def _parse_entries(raw: Any, kind: str, problems: list[str]) -> list[dict[str, Any]]:
    """Entries may be plain names or mappings with a ``name`` key (and the keys of
    ``ENTRY_KEYS[kind]``; others are reported)."""
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
    for entry in entries:
        _unknown_keys(f"{kind}[{entry['name']}]", entry, ("name", *ENTRY_KEYS[kind]), problems,
                      listed=", ".join(ENTRY_KEYS[kind]))
    return entries


def resolve_path(root: Path, value: Any) -> Path:
    """``value`` as a path (``~`` expanded); a relative one lies under ``root``."""
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
        root = resolve_path(base, raw["root"]).resolve()
    name = str(raw.get("name") or (path.stem if path else "grid"))

    datasets = []
    for entry in _parse_entries(raw.get("datasets"), "datasets", problems):
        manifest = entry.get("manifest", f"data/{entry['name']}/manifest.csv")
        datasets.append(DatasetSpec(entry["name"], resolve_path(root, manifest),
                                    dict(entry.get("params") or {}), builder=entry.get("builder")))

    confounders = []
    for entry in _parse_entries(raw.get("confounders"), "confounders", problems):
        strengths = _as_list(entry.get("strengths", entry.get("strength", 1.0)))
        if entry["name"] == "none":
            strengths = [0.0]
        only = entry.get("datasets")
        confounders.append(ConfounderSpec(entry["name"], [float(s) for s in strengths],
                                          dict(entry.get("params") or {}),
                                          None if only is None else [str(d) for d in _as_list(only)]))

    sources = []
    for entry in _parse_entries(raw.get("sources"), "sources", problems):
        weights = entry.get("weights")
        sources.append(SourceSpec(entry["name"], resolve_path(root, weights) if weights else None,
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
    modes = [str(m) for m in _as_list(training.pop("mode"))]
    if not modes or set(modes) - set(MODES) or len(set(modes)) < len(modes):
        problems.append(f"training.mode: one of {list(MODES)} or a list of them (each once); "
                        f"found {modes!r}")
    run = _settings_block(raw, "run", RUN_DEFAULTS, problems)
    slurm = _settings_block(raw, "slurm", SLURM_DEFAULTS, problems)
    notebooks = _settings_block(raw, "notebooks", DEFAULT_NOTEBOOKS, problems)

    dataset_names = [d.name for d in datasets]
    for confounder in confounders:
        unknown = sorted(set(confounder.datasets or []) - set(dataset_names))
        if unknown:
            problems.append(f"confounders[{confounder.name}].datasets names {unknown}, which are not "
                            f"datasets of this grid; valid: {dataset_names}")
    claims = _claims_block(raw, [s.name for s in sources], modes, problems)
    plugin_refs = plugins_block(raw, path, problems)
    if problems and not collect:
        raise GridError(_problem_text(path, problems))
    runs_dir = str(raw.get("runs_dir", "runs/{name}")).replace("{name}", name)
    figures_dir = str(raw.get("figures_dir", "figures")).replace("{name}", name)
    return GridSpec(
        name=name,
        root=root,
        runs_dir=resolve_path(root, runs_dir),
        figures_dir=resolve_path(root, figures_dir),
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
        notebooks=notebook_paths(raw, root, notebooks),
        reference=dict(raw.get("reference") or {}),
        claims=claims,
        probe=bool(raw.get("probe", False)),
        attribution=bool(raw.get("attribution", False)),
        path=path,
        description=" ".join(str(raw.get("description") or "").split()) or None,
        plugins=plugin_refs,
        modes=modes,
    )


def _claims_block(raw: dict[str, Any], source_names: list[str], modes: list[str],
                  problems: list[str]) -> dict:
    """``claims: {roles: {imagenet: ..., in_domain: ..., random: ...}}``: which of the grid's
    arms (its sources, and their linear probes where it probes) play the paper's roles in its
    claims (sm_utils.analysis.claims)."""
    from ..analysis.claims import ROLES
    from ..analysis.results import arm_name

    # each source, and each source's linear probe where the grid probes
    probing = "linear_probe" in modes
    arms = [*source_names, *(arm_name(s, "linear_probe") for s in source_names if probing)]

    block = raw.get("claims") or {}
    if not isinstance(block, dict) or set(block) - {"roles"}:
        problems.append(f"claims: a mapping with 'roles' only; found {block!r}")
        return {}
    roles = block.get("roles") or {}
    if not isinstance(roles, dict):
        problems.append(f"claims.roles: a mapping of role to source; found {roles!r}")
        return {}
    for role, source in roles.items():
        if role not in ROLES:
            problems.append(f"claims.roles: unknown role {role!r}; the roles are {list(ROLES)}")
        elif source not in arms:
            problems.append(f"claims.roles.{role}: {source!r} is not an arm of this grid; "
                            f"its arms: {arms}")
    return {"roles": dict(roles)}


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
    for source in spec.sources:
        makers = sorted({"notebook", "function"} & set(source.build or {}))
        if source.build and (len(makers) != 1 or not isinstance(source.build, dict)):
            problems.append(
                f"source {source.name!r}: build must name one 'notebook' (a path) or one "
                "'function' ('package.module:name', called with the build's parameters); found "
                f"{source.build!r}")
        elif source.build and source.weights is None:
            problems.append(f"source {source.name!r}: a build needs 'weights', the path it writes")
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
                        "paper_ct.yaml, foundation_cxr.yaml, foundation_demo.yaml and the smoke "
                        "override smoke.yaml")
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
    load_grid_plugins(spec)  # before the names are checked: plugins register some of them
    validate_grid(spec, check_names=check_names, check_paths=check_paths, problems=problems)
    return spec
