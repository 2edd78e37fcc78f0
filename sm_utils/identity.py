"""What makes two runs the same run: the content of their inputs, never where they live.

A run id is a stable hash of every parameter that changes a result (all of notebook 03's, see
docs/RUNS.md, except where and how it runs: ``runs_dir``, ``device``, ``precision``,
``deterministic`` and ``num_workers``), with the two files a run
reads named by their content:

- the manifest by a digest of its table (the CSV bytes) and of its meta sidecar without the
  keys that only say where the data are (``root``, ``exported_from``);
- the weights file, if any, by its SHA-256;
- a confounder or source registered by a plugin (not sm_utils itself) by a SHA-256 of its
  code (:func:`sm_utils.plugins.code_digest`), so editing the plugin gives its runs new ids.

So the same grid gives the same ids in two clones at different paths (or on a cluster that
mounts the project elsewhere), and a manifest rebuilt with other content, or weights retrained
in place, give new ids: their cells run again. The images themselves are named through the
manifest (paths, ids, labels), not hashed: change image files in place and rebuild the
manifest's image cache yourself.

This module does not import torch: the grid and its worker kernels name run directories with it
cheaply, and notebook 03 (``sm_utils.runs.RunConfig.run_id``) uses the same
rule, so both always agree.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from . import plugins
from .io import stable_hash

# Parameters of a run that do not change its result.
NON_IDENTITY_FIELDS = ("runs_dir", "device", "precision", "deterministic", "num_workers")
FLOAT_FIELDS = ("strength", "p", "lr", "weight_decay", "drop_rate")
INT_FIELDS = ("fold", "image_size", "epochs", "batch_size", "patience", "seed", "num_workers")
# Extra measurements a run can be asked for (sm_utils.mechanisms); only when on are they part of
# its identity, so every run without them keeps its id.
OPTIONAL_OUTPUTS = ("probe", "attribution")
# How a run trains: every layer (the paper) or only the head on a frozen backbone. Only a mode
# other than the default is in the identity, so runs from before modes keep their ids.
MODES = ("finetune", "linear_probe")
DEFAULT_MODE = MODES[0]
# Manifest meta keys that say where the data are, not what they are.
LOCATION_META_KEYS = ("root", "exported_from")


class IdentityError(ValueError):
    """A run whose inputs cannot be named (e.g. its manifest does not exist yet)."""


@functools.lru_cache(maxsize=256)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file, computed once per (path, size, modification time) in a process."""
    stat = os.stat(path)
    return _sha256(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


def manifest_digest(path: str | os.PathLike) -> str:
    """Digest of a manifest's content: its table and its meta without location keys."""
    path = Path(path)
    if not path.is_file():
        raise IdentityError(
            f"manifest {path} does not exist, so runs on it have no id yet (an id is made from "
            "the manifest's content). Build it first (notebook 01, or `sm run`, which builds "
            "missing manifests)."
        )
    meta_path = path.with_name(path.stem + ".meta.json")
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    meta = {k: v for k, v in meta.items() if k not in LOCATION_META_KEYS}
    return stable_hash({"table": file_sha256(path), "meta": meta}, length=64)


def weights_digest(weights: str | os.PathLike | None) -> str | None:
    """SHA-256 of a weights file; None without one. A folder (a ``transformers`` model, an
    open_clip checkpoint with its config) is named by every file in it, by relative path and
    SHA-256. A missing file cannot be named."""
    if weights in (None, ""):
        return None
    path = Path(weights)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        return stable_hash({p.relative_to(path).as_posix(): file_sha256(p) for p in files},
                           length=64)
    if not path.is_file():
        raise IdentityError(f"weights file {weights} does not exist, so runs with it have no id "
                            "yet; put the file there (or let the grid build it) first.")
    return file_sha256(weights)


def run_identity(params: dict[str, Any], *, manifest: str | None = None) -> dict[str, Any]:
    """The fields that determine a run's result, types normalised and files named by content.

    ``params`` are notebook 03's parameters (or ``dataclasses.asdict(RunConfig)``).
    ``manifest``: the manifest's digest when the caller has it, else it is computed from the
    file. Without a confounder, ``p``, ``strength`` and its parameters do not matter.
    """
    identity = {k: v for k, v in params.items() if k not in NON_IDENTITY_FIELDS}
    for name in FLOAT_FIELDS:
        if name in identity:
            identity[name] = float(identity[name])
    for name in INT_FIELDS:
        if name in identity:
            identity[name] = int(identity[name])
    if "augment" in identity:
        identity["augment"] = bool(identity["augment"])
    identity["confounder_params"] = dict(identity.get("confounder_params") or {})
    if identity.get("confounder") == "none":
        identity.update(p=0.0, strength=0.0, confounder_params={})
    if identity.get("mode", DEFAULT_MODE) == DEFAULT_MODE:
        identity.pop("mode", None)
    for extra in OPTIONAL_OUTPUTS:  # asked for, they make another run; off, they change no id
        if not identity.get(extra):
            identity.pop(extra, None)
    identity["manifest"] = manifest if manifest is not None else manifest_digest(params["manifest"])
    identity["weights"] = weights_digest(identity.get("weights"))
    # plugins' code; the package's own names add nothing, so their runs keep their ids
    code = {kind: digest for kind, digest in (
        ("confounder", plugins.code_digest("confounder", identity.get("confounder"))),
        ("source", plugins.code_digest("source", identity.get("source")))) if digest}
    if code:
        identity["plugin_code"] = code
    return identity


def run_id(params: dict[str, Any], *, manifest: str | None = None) -> str:
    """The run id of notebook 03's parameters (12 hex characters)."""
    return stable_hash(run_identity(params, manifest=manifest))
