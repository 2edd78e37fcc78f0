"""Plugins: code outside the package that registers confounders, sources, datasets or metrics.

A plugin is a Python module that calls the registries (``register_confounder``,
``register_source``, ``register_dataset``, ``register_metric``) when it is imported. It is
found in one of three ways, and each way ends in :func:`load_plugin`:

- named in a grid file's ``plugins:`` list (an importable module name, or a ``.py`` file
  relative to the grid file): :func:`sm_utils.grid.load_grid` loads them and exports them in
  the environment variable ``SM_PLUGINS`` (absolute paths), so that every process the grid
  starts (notebook kernels, workers, SLURM jobs) loads the same plugins;
- listed in ``SM_PLUGINS`` (``os.pathsep``-separated): loaded the first time a registry or a
  run id is asked for (:func:`ensure_loaded`), e.g. in a notebook run by hand;
- installed as a package that declares an entry point in the group ``sm_utils.plugins`` (as
  pytest finds its plugins): loaded the same way without being named
  (``SM_PLUGINS_AUTOLOAD=0`` turns that off).

Every registration, the package's own included, is recorded here with its origin
(:func:`record`): which plugin made it, and a SHA-256 of the code it came from (the plugin's
file and the file defining the registered function). A run's identity includes that hash for
a confounder or source that does not come from sm_utils itself (:mod:`sm_utils.identity`), so
editing a plugin gives new run ids and never reuses stale results. The package's own code is
not hashed into run ids: it is recorded by version and git commit in every run's config.json.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import os
import sys
import traceback
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ENV = "SM_PLUGINS"
AUTOLOAD_ENV = "SM_PLUGINS_AUTOLOAD"
GROUP = "sm_utils.plugins"
PACKAGE = "sm_utils"


class PluginError(ValueError):
    """A plugin that cannot be found or imported, or registers a name already taken."""


@dataclass(frozen=True)
class Plugin:
    """Where registrations come from: the package itself or one plugin."""

    name: str                        # module name, file path, or entry point name
    how: str                         # built-in | file | module | entry point
    file: str | None = None          # its source file, when it has one
    distribution: str | None = None  # the installed distribution it belongs to
    version: str | None = None       # that distribution's version
    sha256: str | None = None        # of its source file (None: the package itself)

    def label(self) -> str:
        if self.how == "built-in":
            return f"{PACKAGE} (built-in)"
        if self.how == "entry point":
            return f"{self.distribution} {self.version} (entry point {self.name})"
        if self.how == "file":
            return f"plugin file {self.file}"
        return f"plugin module {self.name}" + (f" ({self.file})" if self.file else "")

    def describe(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Registration:
    kind: str            # confounder | source | dataset | metric
    name: str
    plugin: Plugin
    code_sha256: str | None   # the code behind this name; None for the package's own


_LOADED: dict[str, Plugin] = {}          # ref (module name or absolute path) -> plugin
_LOADING: list[Plugin] = []              # the plugins being imported now (innermost last)
_REGISTRATIONS: dict[tuple[str, str], Registration] = {}
_STATE: dict[str, Any] = {"entry_points": False, "env": None, "busy": False}


def _sha256_file(path: str | os.PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@functools.lru_cache(maxsize=1)
def _package_version() -> str | None:
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None


def _builtin() -> Plugin:
    return Plugin(PACKAGE, "built-in", distribution=PACKAGE, version=_package_version())


@functools.lru_cache(maxsize=1)
def _distributions() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


def _module_plugin(module_name: str) -> Plugin:
    """The origin of a registration made outside any plugin load: by the registering module."""
    if module_name == PACKAGE or module_name.startswith(PACKAGE + "."):
        return _builtin()
    module = sys.modules.get(module_name)
    file = getattr(module, "__file__", None)
    dists = _distributions().get(module_name.split(".")[0]) or []
    version = None
    if dists:
        try:
            version = importlib.metadata.version(dists[0])
        except importlib.metadata.PackageNotFoundError:
            pass
    return Plugin(module_name, "module", file=file, distribution=dists[0] if dists else None,
                  version=version, sha256=_sha256_file(file) if file and Path(file).is_file() else None)


def _callables(obj: Any) -> list[Any]:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return [v for v in (getattr(obj, f.name) for f in dataclasses.fields(obj)) if callable(v)]
    return [obj] if callable(obj) else []


def _code_files(obj: Any) -> list[str]:
    """Source files (outside sm_utils) defining ``obj``'s functions."""
    files = set()
    for item in _callables(obj):
        item = inspect.unwrap(getattr(item, "func", item))  # functools.partial
        module = getattr(item, "__module__", None) or ""
        if module == PACKAGE or module.startswith(PACKAGE + "."):
            continue
        try:
            file = inspect.getsourcefile(item)
        except TypeError:
            file = None
        if file and Path(file).is_file():
            files.add(str(Path(file).resolve()))
    return sorted(files)


# Frames of the registries themselves: the registering module is the first frame outside them.
_REGISTRY_MODULES = {__name__, f"{PACKAGE}.confounders.registry", f"{PACKAGE}.sources.registry",
                     f"{PACKAGE}.datasets", f"{PACKAGE}.metrics"}


def _caller_module() -> str:
    frame = sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__") in _REGISTRY_MODULES:
        frame = frame.f_back
    return (frame.f_globals.get("__name__") if frame is not None else None) or PACKAGE


def origin_of(obj: Any = None) -> Plugin:
    """Who registers now: the package when the registering module is its own (even while a
    plugin that imports it loads), else the plugin being loaded, else the registering module."""
    module = _caller_module()
    if module == PACKAGE or module.startswith(PACKAGE + "."):
        return _builtin()
    if _LOADING:
        return _LOADING[-1]
    return _module_plugin(module)


def record(kind: str, name: str, obj: Any) -> Registration:
    """Note who registered ``name`` of ``kind`` (every registry calls this, for its own names
    and for plugins' alike) and the hash of the code behind it: the files (outside sm_utils)
    defining ``obj``'s functions and the registering plugin's own file."""
    plugin = origin_of(obj)
    files = _code_files(obj)
    if plugin.file and plugin.how != "built-in":
        files = sorted({*files, str(Path(plugin.file).resolve())})
    code = None
    if files:
        digest = hashlib.sha256()
        for file in files:
            digest.update(_sha256_file(file).encode())
        code = digest.hexdigest()
    registration = Registration(kind, name, plugin, code)
    _REGISTRATIONS[(kind, name)] = registration
    return registration


def duplicate_message(kind: str, name: str, obj: Any) -> str:
    """The error for a second registration of ``name``: who has it, who asks, and the fix."""
    old = _REGISTRATIONS.get((kind, name))
    had = old.plugin.label() if old else "an earlier registration"
    return (f"{kind} {name!r} is already registered (by {had}); {origin_of(obj).label()} "
            f"registers it again. Expected each {kind} name once. Fix: choose another name, or "
            f"pass replace=True to register_{kind} to replace it on purpose.")


def registration(kind: str, name: str) -> Registration | None:
    return _REGISTRATIONS.get((kind, name))


def registered_by(kind: str, name: str) -> str:
    """Who registered ``name`` (for ``sm list``)."""
    found = _REGISTRATIONS.get((kind, name))
    return found.plugin.label() if found else "unknown"


def code_digest(kind: str, name: str | None) -> str | None:
    """The hash of the code behind a registered name that does not come from sm_utils itself
    (None for the package's own names and unknown ones); loads the plugins first."""
    if not name:
        return None
    ensure_loaded()
    found = _REGISTRATIONS.get((kind, name))
    return None if found is None or found.plugin.how == "built-in" else found.code_sha256


def loaded_plugins() -> list[Plugin]:
    """Every plugin loaded in this process, in load order."""
    return list(_LOADED.values())


def describe_plugins() -> list[dict[str, Any]]:
    """What a run's config.json records of the plugins: name, how found, file or
    distribution, version, hash, and the names each registered."""
    out = []
    for plugin in loaded_plugins():
        names = sorted(f"{r.kind}:{r.name}" for r in _REGISTRATIONS.values() if r.plugin == plugin)
        out.append({**plugin.describe(), "registers": names})
    return out


def is_path(ref: str) -> bool:
    return ref.endswith(".py") or "/" in ref or os.sep in ref


def resolve_ref(ref: str, base: str | os.PathLike | None = None) -> str:
    """A plugin reference as a process elsewhere can load it: a module name unchanged, a path
    made absolute (relative to ``base``, the grid file's folder)."""
    ref = str(ref).strip()
    if not is_path(ref):
        return ref
    path = Path(ref).expanduser()
    if not path.is_absolute():
        path = Path(base or Path.cwd()) / path
    return str(path.resolve())


def _import_failure(ref: str, err: BaseException, file: str | None) -> PluginError:
    """A plugin's import error as file, line and message, with what to do."""
    if isinstance(err, SyntaxError):
        where = f"{err.filename}:{err.lineno}"
        text = f"\n    {err.text.rstrip()}" if err.text else ""
        return PluginError(f"plugin {ref} cannot be imported: SyntaxError at {where}: {err.msg}"
                           f"{text}\nFix the file, then run again (no cell has started).")
    frames = traceback.extract_tb(err.__traceback__)
    mine = [f for f in frames if file and Path(f.filename).resolve() == Path(file).resolve()]
    outside = [f for f in frames if "importlib" not in f.filename and f.filename != __file__]
    frame = (mine or outside or frames or [None])[-1]
    where = f" at {frame.filename}:{frame.lineno}" if frame is not None else ""
    hint = "Fix the plugin, then run again (no cell has started)."
    if isinstance(err, ModuleNotFoundError):
        hint = (f"The plugin needs the module {err.name!r}: install it into this environment "
                f"(pip install ...), or remove the import. No cell has started.")
    return PluginError(f"plugin {ref} failed on import{where}: {type(err).__name__}: {err}\n{hint}")


def _import_file(path: Path) -> tuple[Any, str]:
    name = f"_sm_plugin_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module, name


def load_plugin(ref: str, base: str | os.PathLike | None = None, where: str = "") -> Plugin:
    """Import one plugin (a module name or a .py path) once per process; its registrations are
    recorded as coming from it. Raises PluginError with the file, line and error."""
    ref = resolve_ref(ref, base)
    if ref in _LOADED:
        return _LOADED[ref]
    named = f" (named in {where})" if where else ""
    if is_path(ref):
        path = Path(ref)
        if not path.is_file():
            raise PluginError(
                f"plugin file {path}{named} does not exist on {os.uname().nodename}. Expected a "
                ".py file (relative to the grid file) or an importable module name. Fix the "
                "path in `plugins:`, or make the file reachable at that path on this machine "
                "(a SLURM node must see it at the same absolute path).")
        plugin = Plugin(str(path), "file", file=str(path), sha256=_sha256_file(path))
        _LOADED[ref] = plugin  # now: a registry it asks while it loads must not load it again
        _LOADING.append(plugin)
        try:
            _import_file(path)
        except Exception as err:  # any failure: reported with its file and line
            del _LOADED[ref]
            raise _import_failure(str(path), err, str(path)) from err
        finally:
            _LOADING.pop()
    else:
        spec = None
        try:
            spec = importlib.util.find_spec(ref)
        except (ImportError, ValueError):
            pass
        if spec is None:
            raise PluginError(
                f"plugin module {ref!r}{named} is not importable here: no module of that name. "
                "Expected an importable module name (an installed package, or a module on "
                "PYTHONPATH) or a path ending in .py. Fix: install it (pip install -e .), or "
                "give the .py file's path relative to the grid file.")
        file = spec.origin if spec.origin and Path(spec.origin).is_file() else None
        plugin = dataclasses.replace(_module_plugin(ref), how="module", file=file,
                                     sha256=_sha256_file(file) if file else None)
        _LOADED[ref] = plugin
        _LOADING.append(plugin)
        try:
            importlib.import_module(ref)
        except Exception as err:
            del _LOADED[ref]
            raise _import_failure(ref, err, file) from err
        finally:
            _LOADING.pop()
    return plugin


def load_plugins(refs: Iterable[str], base: str | os.PathLike | None = None,
                 where: str = "") -> list[Plugin]:
    return [load_plugin(ref, base, where) for ref in refs]


def load_entry_points() -> list[Plugin]:
    """Load the installed plugins (entry point group ``sm_utils.plugins``), once."""
    if _STATE["entry_points"]:
        return []
    _STATE["entry_points"] = True
    if os.environ.get(AUTOLOAD_ENV, "1") == "0":
        return []
    out = []
    for point in importlib.metadata.entry_points(group=GROUP):
        key = f"entry point {point.name} = {point.value}"
        if key in _LOADED:
            continue
        dist = getattr(point, "dist", None)
        module = point.value.split(":")[0]
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            spec = None
        file = spec.origin if spec is not None and spec.origin and Path(spec.origin).is_file() else None
        plugin = Plugin(point.name, "entry point", file=file,
                        distribution=getattr(dist, "name", None),
                        version=getattr(dist, "version", None),
                        sha256=_sha256_file(file) if file else None)
        _LOADING.append(plugin)
        try:
            loaded = point.load()
            if callable(loaded) and not inspect.ismodule(loaded):
                loaded()  # an entry point may name a function that registers
        except Exception as err:
            raise _import_failure(f"{plugin.label()}", err, file) from err
        finally:
            _LOADING.pop()
        _LOADED[key] = plugin
        out.append(plugin)
    return out


def env_refs() -> list[str]:
    return [r for r in os.environ.get(ENV, "").split(os.pathsep) if r.strip()]


def export(refs: Iterable[str]) -> str:
    """Add ``refs`` (absolute paths or module names) to ``SM_PLUGINS`` of this process, so
    every process it starts loads them too; returns the variable's new value."""
    current = env_refs()
    value = os.pathsep.join([*current, *(r for r in refs if r not in current)])
    if value:
        os.environ[ENV] = value
    return value


def ensure_loaded() -> None:
    """Load the installed plugins and those in ``SM_PLUGINS`` that are not loaded yet (cheap
    when nothing changed); the registries call this before they answer."""
    env = os.environ.get(ENV, "")
    if _STATE["busy"] or (_STATE["entry_points"] and env == _STATE["env"]):
        return
    _STATE["busy"] = True
    try:
        load_entry_points()
        load_plugins(env_refs(), where=f"the environment variable {ENV}")
        _STATE["env"] = env
    finally:
        _STATE["busy"] = False
