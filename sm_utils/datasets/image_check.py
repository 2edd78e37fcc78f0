"""Every image of a data set checked once, up front, in parallel: unreadable or truncated files
are all named at once (or dropped with ``unreadable_images="drop"``), not met one per run.

A file is checked by reading its header and verifying its encoded data (PIL's ``verify``: a
PNG's chunks and their checksums, so a truncated or overwritten file fails) without decoding
its pixels. Files that passed are remembered by path, size and modification time in a small
JSON file in the cache folder, so a rebuild re-checks only what changed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from ..io import atomic_write_json, stable_hash
from ..paths import default_cache_dir
from ..progress import parallel_map

UNREADABLE_CHOICES = ("error", "drop")
CHUNK = 256  # files per task: large enough that process start-up and pickling are noise
SHOWN = 20   # unreadable files named in the error message (all of them go to a file)


class UnreadableImagesError(ValueError):
    """Images that cannot be read; ``unreadable`` maps each path to its error."""

    def __init__(self, message: str, unreadable: dict[str, str]):
        super().__init__(message)
        self.unreadable = unreadable


def image_error(path: str) -> str | None:
    """Why ``path`` cannot be read as an image, or None when it can."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as err:  # noqa: BLE001  (PIL raises many types for damaged files)
        return f"{type(err).__name__}: {err}"
    return None


def _check_chunk(paths: list[str]) -> list[tuple[str, str | None]]:
    return [(path, image_error(path)) for path in paths]


def _signature(path: Path) -> list[int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return [stat.st_size, stat.st_mtime_ns]


def check_images(paths: Sequence[str | os.PathLike], *, workers: int | None = None,
                 memo: str | os.PathLike | None = None,
                 progress: bool | None = None) -> dict[str, str]:
    """``{path: error}`` for each of ``paths`` that cannot be read (empty: all readable).

    ``workers``: processes (None: every core this process may use; 1, or a pool that cannot
    start: in this process, with the same result; :func:`sm_utils.progress.parallel_map`).
    ``memo``: a JSON file remembering files that passed.
    """
    memo_path = Path(memo) if memo is not None else None
    passed: dict[str, list[int]] = {}
    if memo_path is not None and memo_path.is_file():
        try:
            passed = json.loads(memo_path.read_text())
        except ValueError:
            passed = {}
    todo = [str(p) for p in paths if passed.get(str(p)) != _signature(Path(p))]
    chunks = [todo[i:i + CHUNK] for i in range(0, len(todo), CHUNK)]
    results = [pair for chunk in parallel_map(_check_chunk, chunks, desc="checking images",
                                              unit="chunk", workers=workers, enabled=progress)
               for pair in chunk]
    unreadable = {path: error for path, error in results if error is not None}
    if memo_path is not None and todo:
        passed.update({path: _signature(Path(path)) for path, error in results if error is None})
        atomic_write_json(memo_path, passed)
    return unreadable


def memo_file(root: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the files under ``root`` that passed are remembered (in the image cache folder,
    never beside the data, which may be read-only)."""
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return folder / "image_checks" / f"{stable_hash(str(Path(root).resolve()), length=16)}.json"


def drop_unreadable(frame: pd.DataFrame, root: str | os.PathLike, *, path_column: str = "path",
                    name_column: str | None = None, unreadable_images: str = "error",
                    workers: int | None = None) -> tuple[pd.DataFrame, list[str]]:
    """Check every image of ``frame`` (``path_column``, relative to ``root``). ``"error"``:
    raise naming every unreadable one (all of them listed in a file beside the memo);
    ``"drop"``: return the rows without them and their names (``name_column``, else paths)."""
    if unreadable_images not in UNREADABLE_CHOICES:
        raise ValueError(f"unreadable_images must be one of {list(UNREADABLE_CHOICES)}; got "
                         f"{unreadable_images!r}.")
    root = Path(root)
    full = [str(root / p) for p in frame[path_column]]
    memo = memo_file(root)
    unreadable = check_images(full, workers=workers, memo=memo)
    bad = pd.Series([path in unreadable for path in full], index=frame.index)
    names = frame.loc[bad, name_column or path_column].astype(str).tolist()
    if unreadable and unreadable_images == "error":
        listing = memo.with_name(memo.stem + ".unreadable.txt")
        listing.parent.mkdir(parents=True, exist_ok=True)
        listing.write_text("".join(f"{path}\t{error}\n" for path, error in unreadable.items()))
        shown = "\n".join(f"  {path}: {error}" for path, error in list(unreadable.items())[:SHOWN])
        more = f"\n  ... and {len(unreadable) - SHOWN} more" if len(unreadable) > SHOWN else ""
        raise UnreadableImagesError(
            f"{len(unreadable)} of {len(full)} images under {root} cannot be read:\n{shown}{more}\n"
            f"(all of them in {listing}). Download or extract them again, or pass "
            "unreadable_images='drop' (a grid: the dataset's params) to build without them; "
            "the manifest's meta counts what was dropped.", unreadable)
    return frame.loc[~bad].reset_index(drop=True), names
