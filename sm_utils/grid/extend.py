"""What lets a grid live in a study folder of its own: its plugins, and the compendium's
notebooks found from a folder that has none.

``plugins: [my_study.confounders, ./plugins.py]`` names modules, or .py files relative to the
grid file (made absolute, so a kernel, a worker or a SLURM job elsewhere loads the same file);
:func:`load_grid_plugins` imports them and exports them in ``SM_PLUGINS`` to every process the
grid starts (:mod:`sm_utils.plugins`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import GridError


def plugins_block(raw: dict[str, Any], path: Path | None, problems: list[str]) -> list[str]:
    """The grid's ``plugins:`` as references any process can load (paths made absolute)."""
    from ..plugins import resolve_ref

    given = raw.get("plugins") or []
    given = list(given) if isinstance(given, (list, tuple)) else [given]
    bad = [p for p in given if not isinstance(p, str) or not p.strip()]
    if bad:
        problems.append(f"plugins: each entry must be a module name or a .py path (relative to "
                        f"the grid file); found {bad}")
        return []
    base = path.resolve().parent if path else Path.cwd()
    return [resolve_ref(p, base) for p in given]


def load_grid_plugins(spec: Any) -> None:
    """Import the plugins of ``spec`` (a GridSpec) here and export them (``SM_PLUGINS``) to every process this
    one starts; a plugin that fails stops with its file, line and error (GridError)."""
    from ..plugins import PluginError, export, load_plugins

    try:
        load_plugins(spec.plugins, where=f"grid file {spec.path}" if spec.path else "the grid")
    except PluginError as err:
        raise GridError(f"grid {spec.name!r}: {err}") from err
    export(spec.plugins)


def notebook_paths(raw: dict[str, Any], root: Path, notebooks: dict[str, Any]) -> dict[str, Path]:
    """Each notebook under ``root``; one the grid does not name that ``root`` lacks (a study
    folder with ``root: .``) is the installed compendium's."""
    from ..paths import project_root

    named = set(raw.get("notebooks") or {}) if isinstance(raw.get("notebooks"), dict) else set()
    out = {}
    for key, value in notebooks.items():
        path = Path(str(value)).expanduser()
        here = path if path.is_absolute() else root / path
        installed = project_root() / path
        use_installed = (key not in named and not path.is_absolute() and not here.exists()
                         and installed.exists())
        out[key] = installed if use_installed else here
    return out
