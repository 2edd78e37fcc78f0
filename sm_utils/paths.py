"""Where things are: relative paths in notebooks and configs resolve against the project root,
so a notebook gives the same result whether Jupyter, papermill or nbval starts it."""

from __future__ import annotations

import os
from pathlib import Path


def project_root() -> Path:
    """``SM_PROJECT_ROOT`` if set, else the checkout holding this package (editable install),
    else the current directory."""
    if "SM_PROJECT_ROOT" in os.environ:
        return Path(os.environ["SM_PROJECT_ROOT"])
    checkout = Path(__file__).resolve().parents[1]
    return checkout if (checkout / "pyproject.toml").is_file() else Path.cwd()


def resolve(path: str | os.PathLike) -> Path:
    """An absolute path as given; a relative one under the project root."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else project_root() / path


def shown(path: str | os.PathLike) -> str:
    """``path`` as a notebook prints it: relative to the project root where it lies under it
    (so committed outputs name no machine's folders), else as given."""
    path = Path(path)
    try:
        return path.resolve().relative_to(project_root().resolve()).as_posix()
    except ValueError:
        return str(path)


# The files of a run directory and of a grid's runs folder (docs/RUNS.md), named once.
METRICS_FILE = "metrics.json"            # a run's metrics, written last: the run is complete
ERROR_FILE = "error.txt"                 # a failed cell's error
NOTEBOOK_FILE = "notebook.ipynb"         # the executed notebook of a cell
MODEL_FILE = "model.safetensors"         # a run's fine-tuned weights, where kept
MECHANISMS_FILE = "mechanisms.json"      # mechanisms measured later from a kept model
CELLS_FILE = "cells.csv"                 # a grid's cells and their run ids
SOURCE_PROBES_FILE = "source_probes.csv"  # each source probed before fine-tuning


CACHE_ENV = "SM_CACHE_DIR"


def default_cache_dir() -> Path:
    """``$SM_CACHE_DIR``, else ``cache/images`` in the project checkout, else ``~/.cache``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    project = Path(__file__).resolve().parents[1]
    if (project / "pyproject.toml").is_file() and os.access(project, os.W_OK):
        return project / "cache" / "images"
    return Path.home() / ".cache" / "sm_utils" / "images"
