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
