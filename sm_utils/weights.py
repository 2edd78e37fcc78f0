"""Safe loading of weight files and checked loading into a model.

Weights are read only from safetensors files or with ``torch.load(weights_only=True)``: a
pickle can run arbitrary code, so a file that needs more than tensors to unpickle is refused.
Every failure raises one :class:`WeightsError` whose message says what was expected, what was
found and how to fix it: a wrong architecture lists the missing and unexpected keys and the
shape mismatches; a corrupt or truncated file says so.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .io import atomic_write_bytes

# How many names each list in an error message shows before "... and N more".
_MAX_LISTED = 12
_MAX_SHAPES = 6  # shape mismatches: longer lines


class SourceError(ValueError):
    """A pretraining source cannot be built: unknown name, wrong arguments, bad weights."""


class WeightsError(SourceError):
    """A weights file cannot be read, or does not fit the model it is loaded into."""


def _listing(names: Iterable[str], limit: int = _MAX_LISTED) -> str:
    names = list(names)
    shown = ", ".join(names[:limit])
    more = len(names) - limit
    return shown + (f", ... and {more} more" if more > 0 else "")


def mismatch_lines(groups: Iterable[tuple[str, Sequence[str], int]]) -> list[str]:
    """``"<what> (<count>): a, b, ... and N more"`` for each non-empty group ``(what, names,
    how many to show)``: the missing, unused and mismatched tensors of weights that do not fit
    (:func:`load_checked`, :func:`sm_utils.keras_resnet.convert_keras_arrays`)."""
    return [f"{what} ({len(names)}): {_listing(names, limit)}" for what, names, limit in groups
            if names]


# ---------------------------------------------------------------------------- reading files

_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


def detect_format(path: str | os.PathLike) -> str:
    """Return 'safetensors', 'torch_zip', 'torch_legacy', 'hdf5' or 'unknown' from the bytes."""
    with open(path, "rb") as fh:
        head = fh.read(16)
    if head.startswith(_HDF5_MAGIC):
        return "hdf5"
    if head.startswith(b"PK\x03\x04"):
        return "torch_zip"
    if head[:1] == b"\x80" and len(head) > 1 and head[1] in range(2, 6):
        return "torch_legacy"  # a bare pickle (protocol 2-5): torch.save's legacy format
    if len(head) >= 9:
        (header_len,) = struct.unpack("<Q", head[:8])
        if 0 < header_len < 100_000_000 and head[8:9] == b"{":
            return "safetensors"
    return "unknown"


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        tensors = {}
        with safe_open(str(path), framework="pt") as fh:
            metadata = dict(fh.metadata() or {})
            for key in fh.keys():  # noqa: SIM118 - safe_open is not a dict
                tensors[key] = fh.get_tensor(key)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise WeightsError(
            f"{path} looks like a safetensors file but cannot be read ({exc}); it is probably "
            "truncated or corrupt (an interrupted download or copy). Fetch or copy it again "
            "and compare its sha256 with the published one."
        ) from exc
    return tensors, metadata


def _read_torch(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # weights_only=True refuses any global that is not a tensor/container type.
        raise WeightsError(
            f"{path} is a pickle that holds more than tensors (for example a whole model object "
            "or custom classes), so it is refused: unpickling it could run arbitrary code. "
            "Save a plain state dict instead: torch.save(model.state_dict(), path) or "
            f"safetensors.torch.save_file(model.state_dict(), path). Details: "
            f"{str(exc).splitlines()[0]}"
        ) from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise WeightsError(
            f"{path} cannot be read as a PyTorch weights file ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'no details'}); it is probably "
            "truncated or corrupt. Copy or download it again and compare its sha256."
        ) from exc


def _as_state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """Accept a flat {name: tensor} mapping, or one nested under a usual checkpoint key."""
    if isinstance(obj, Mapping):
        for wrapper in ("state_dict", "model_state_dict", "model"):
            inner = obj.get(wrapper)
            if (
                isinstance(inner, Mapping)
                and inner
                and all(isinstance(v, torch.Tensor) for v in inner.values())
            ):
                obj = inner
                break
    if not isinstance(obj, Mapping):
        raise WeightsError(
            f"{path} holds a {type(obj).__name__}, not a state dict (a mapping of parameter "
            "names to tensors). Save model.state_dict() instead."
        )
    not_tensors = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors or not obj:
        raise WeightsError(
            f"{path} is not a plain state dict: expected a non-empty mapping of names to "
            f"tensors, found non-tensor entries: {_listing(not_tensors) or '(empty mapping)'}. "
            "Save model.state_dict() (optionally under the key 'state_dict')."
        )
    return {str(k): v for k, v in obj.items()}


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a weights file safely; return (state dict, safetensors metadata or {}).

    Accepts safetensors files and torch.save files of a state dict (zip or legacy format),
    read with ``weights_only=True``. Keras .h5 files are pointed to the sources that convert
    them.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"Weights file not found: {path}. Give the path of an existing file.")
    if path.stat().st_size == 0:
        raise WeightsError(f"Weights file {path} is empty (0 bytes); copy or download it again.")
    kind = detect_format(path)
    if kind == "safetensors":
        return _read_safetensors(path)
    if kind in ("torch_zip", "torch_legacy"):
        return _as_state_dict(_read_torch(path), path), {}
    if kind == "hdf5":
        raise WeightsError(
            f"{path} is a Keras/HDF5 file, which this loader does not read. Use the source "
            "'radimagenet' (RadImageNet .h5) or 'imagenet_keras' (Keras ImageNet .h5), which "
            "convert it into the Keras-layout PyTorch ResNet50."
        )
    raise WeightsError(
        f"{path} is not a recognised weights file: expected safetensors or a torch.save state "
        "dict, but its first bytes match neither (the file may be corrupt, truncated, or of "
        "another format)."
    )


def save_state_dict(
    path: str | os.PathLike,
    state_dict: Mapping[str, torch.Tensor],
    metadata: Mapping[str, object] | None = None,
) -> Path:
    """Write a state dict atomically as safetensors; non-string metadata values become JSON.

    The same tensors and metadata always give the same bytes (and so the same sha256).
    """
    from safetensors.torch import save

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    text_meta = {
        str(k): v if isinstance(v, str) else json.dumps(v, sort_keys=True)
        for k, v in (metadata or {}).items()
    }
    return atomic_write_bytes(path, canonical_safetensors(save(tensors, metadata=text_meta)))


def canonical_safetensors(blob: bytes) -> bytes:
    """The same safetensors file with its JSON header's keys sorted.

    safetensors writes the header from a hash map, so the key order, and with it the file's
    bytes, change from one save to the next. Tensor offsets count from the end of the header,
    so reordering (and re-padding) it leaves the tensors valid.
    """
    (length,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + length])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header to 8-byte alignment
    return struct.pack("<Q", len(text)) + text + blob[8 + length:]


# ------------------------------------------------------------------ loading into a model


def strip_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Remove ``prefix`` from every key that has it (keys without it are kept as they are)."""
    return {k.removeprefix(prefix): v for k, v in state_dict.items()}


@dataclass
class LoadReport:
    """What a checked load did: the keys it set and the ones it deliberately left out."""

    loaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # e.g. the source's own classifier
    kept_init: list[str] = field(default_factory=list)  # model keys left at initialisation


def load_checked(
    model: torch.nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    skip_prefixes: tuple[str, ...] = (),
    init_prefixes: tuple[str, ...] = (),
    what: str = "weights",
) -> LoadReport:
    """Load ``state_dict`` into ``model``, refusing any mismatch with one clear error.

    ``skip_prefixes``: keys of the file that are ignored (the pretrained classifier).
    ``init_prefixes``: model keys that may stay at their initialisation (the new head).
    Everything else must match exactly: same keys, same shapes.
    """

    def has_prefix(key: str, prefixes: tuple[str, ...]) -> bool:
        return any(key == p or key.startswith(p + ".") for p in prefixes)

    target = model.state_dict()
    incoming = {k: v for k, v in state_dict.items() if not has_prefix(k, skip_prefixes)}
    skipped = sorted(k for k in state_dict if has_prefix(k, skip_prefixes))
    # BatchNorm's step counter is unused with a fixed momentum and absent from Keras/TF files.
    missing = [
        k
        for k in target
        if k not in incoming
        and not has_prefix(k, init_prefixes)
        and not k.endswith("num_batches_tracked")
    ]
    unexpected = [k for k in incoming if k not in target]
    mismatched = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(target[k].shape)}"
        for k, v in incoming.items()
        if k in target and tuple(v.shape) != tuple(target[k].shape)
    ]
    if missing or unexpected or mismatched:
        arch = type(model).__name__
        parts = [
            f"The {what} do not fit the model ({arch}): is the file for this architecture?",
            *mismatch_lines([
                ("missing keys", missing, _MAX_LISTED),
                ("unexpected keys", unexpected, _MAX_LISTED),
                ("shape mismatches", mismatched, _MAX_SHAPES),
            ]),
        ]
        parts.append(
            "Choose the architecture the weights were trained with (arch=...), or a weights "
            "file made for this architecture."
        )
        raise WeightsError("\n  ".join(parts))
    to_load = {k: v.to(dtype=target[k].dtype) for k, v in incoming.items()}
    model.load_state_dict(to_load, strict=False)
    kept = [k for k in target if k not in incoming]
    return LoadReport(loaded=sorted(incoming), skipped=skipped, kept_init=kept)
