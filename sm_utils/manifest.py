"""The manifest: one table per dataset, one row per image.

Columns
- ``image_id``   unique id of the image
- ``path``       image file, relative to the data root
- ``label``      binary target, 0 or 1
- ``patient_id`` the patient the image belongs to (splits are grouped by it)
- ``fold_<k>``   role of the image in fold k: ``train``, ``val``, ``test`` (or ``test_<name>``
                 for extra test sets, e.g. ``test_ood``), or ``unused``
- anything else is an attribute (``sex`` as ``F``/``M``, ``age`` in years, ``view``, ...)

A manifest is saved as ``<name>.csv`` with a sidecar ``<name>.meta.json`` that records the
data root and how the table was made. Loading validates it (see :func:`validate_manifest`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from .io import atomic_write_csv, atomic_write_json

REQUIRED_COLUMNS = ("image_id", "path", "label", "patient_id")
FOLD_PATTERN = re.compile(r"^fold_(\d+)$")
ROLES = ("train", "val", "test", "unused")
MAX_LISTED = 5


class ManifestError(ValueError):
    """A manifest or split table that cannot be used as it is."""


def fold_columns(table: pd.DataFrame) -> list[str]:
    """The ``fold_<k>`` columns of a table, in fold order."""
    cols = [c for c in table.columns if FOLD_PATTERN.match(str(c))]
    return sorted(cols, key=lambda c: int(FOLD_PATTERN.match(c).group(1)))


def role_group(role: str) -> str:
    """Map a role to the group that must not share patients: train, val or test."""
    return "test" if role.startswith("test") else role


def _listing(values: Any, limit: int = MAX_LISTED) -> str:
    values = list(values)
    shown = ", ".join(map(str, values[:limit]))
    return shown + (f", ... ({len(values) - limit} more)" if len(values) > limit else "")


@dataclass
class Manifest:
    """A validated manifest table and the root its paths are relative to."""

    table: pd.DataFrame
    root: Path
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def folds(self) -> list[int]:
        return [int(FOLD_PATTERN.match(c).group(1)) for c in fold_columns(self.table)]

    def rows(self, fold: int, role: str) -> pd.DataFrame:
        """Rows with ``role`` (``train``, ``val``, ``test``, ``test_ood``, ...) in ``fold``."""
        column = f"fold_{fold}"
        if column not in self.table.columns:
            raise ManifestError(
                f"fold {fold} does not exist: the manifest has folds {self.folds}. "
                "Choose one of those or rebuild the splits with more folds."
            )
        return self.table[self.table[column] == role]

    def image_path(self, relative: str) -> Path:
        return self.root / relative

    @property
    def attributes(self) -> list[str]:
        fixed = set(REQUIRED_COLUMNS) | set(fold_columns(self.table))
        return [c for c in self.table.columns if c not in fixed]


def validate_manifest(
    table: pd.DataFrame, root: str | Path | None = None, *, check_files: bool = True,
    source: str = "manifest", check_leakage: bool = True,
) -> pd.DataFrame:
    """Check a manifest table; return it with normalised dtypes or raise ManifestError.

    Checks: required columns, binary labels, unique image ids, fold roles, no patient in
    more than one of train/val/test within any fold (unless ``check_leakage`` is False, for a
    tool that reports leakage itself), and (if ``check_files``) that every image file exists
    under ``root``.
    """
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise ManifestError(
            f"{source}: missing required column(s) {missing}. Expected at least "
            f"{list(REQUIRED_COLUMNS)}; found {list(table.columns)}. Rename or add the columns."
        )
    table = table.copy()
    table["image_id"] = table["image_id"].astype(str)
    table["patient_id"] = table["patient_id"].astype(str)
    table["path"] = table["path"].astype(str)

    labels = pd.to_numeric(table["label"], errors="coerce")
    bad = table.loc[labels.isna() | ~labels.isin([0, 1]), "label"]
    if len(bad):
        raise ManifestError(
            f"{source}: labels must be binary (0 or 1); found {len(bad)} other value(s): "
            f"{_listing(pd.unique(bad))}. Map class names to 0/1 before saving the manifest."
        )
    table["label"] = labels.astype(int)

    dup = table["image_id"][table["image_id"].duplicated()]
    if len(dup):
        raise ManifestError(
            f"{source}: image_id must be unique; {len(dup)} duplicate(s): "
            f"{_listing(pd.unique(dup))}. Drop repeated rows or make the ids unique."
        )

    for column in fold_columns(table):
        values = table[column].fillna("unused").astype(str)
        unknown = sorted(v for v in values.unique() if role_group(v) not in ROLES)
        if unknown:
            raise ManifestError(
                f"{source}: column {column} has unknown role(s) {unknown}; expected one of "
                f"{list(ROLES)} or 'test_<name>'."
            )
        table[column] = values

    leaks = find_leakage(table) if check_leakage else []
    if leaks:
        raise ManifestError(f"{source}: patient leakage between splits.\n" + format_leakage(leaks))

    if check_files:
        if root is None:
            raise ManifestError(f"{source}: cannot check image files without a data root.")
        root = Path(root)
        absent = [p for p in table["path"] if not (root / p).is_file()]
        if absent:
            raise ManifestError(
                f"{source}: {len(absent)} of {len(table)} image file(s) are missing under "
                f"{root}: {_listing(absent)}. Check the data root, or rebuild the manifest."
            )
    return table


# --- leakage -------------------------------------------------------------------------

@dataclass(frozen=True)
class Leak:
    """A patient found in more than one split group of one fold."""

    fold: str
    patient_id: str
    groups: tuple[str, ...]


def find_leakage(
    table: pd.DataFrame, *, patient_column: str = "patient_id", split_columns: list[str] | None = None,
) -> list[Leak]:
    """Patients that appear in more than one of train/val/test within a split column."""
    split_columns = fold_columns(table) if split_columns is None else split_columns
    leaks = []
    for column in split_columns:
        groups = table[column].fillna("unused").astype(str).map(role_group)
        used = groups != "unused"
        per_patient = (
            pd.DataFrame({"pid": table.loc[used, patient_column].astype(str), "g": groups[used]})
            .drop_duplicates()
            .groupby("pid")["g"]
            .agg(lambda s: tuple(sorted(s)))
        )
        for pid, g in per_patient.items():
            if len(g) > 1:
                leaks.append(Leak(str(column), str(pid), g))
    return leaks


def format_leakage(leaks: list[Leak]) -> str:
    by_fold: dict[str, list[Leak]] = {}
    for leak in leaks:
        by_fold.setdefault(leak.fold, []).append(leak)
    lines = []
    for fold, items in by_fold.items():
        examples = _listing(f"{x.patient_id} ({'+'.join(x.groups)})" for x in items)
        lines.append(f"  {fold}: {len(items)} patient(s) in more than one split: {examples}")
    lines.append("Split by patient (sm_utils.splits.make_splits) so each patient is in one split.")
    return "\n".join(lines)


def check_split_files(
    files: dict[str, str | Path], *, patient_column: str = "pid",
) -> list[Leak]:
    """Leakage check for split files made elsewhere.

    ``files`` maps a split name to a CSV; names are grouped by prefix, e.g.
    ``{"train": ..., "val": ..., "test": ...}``. Returns the patients found in more
    than one group (empty list: no leakage).
    """
    frames = []
    for name, path in files.items():
        frame = pd.read_csv(path)
        if patient_column not in frame.columns:
            raise ManifestError(
                f"split file {path}: no patient column {patient_column!r}; found "
                f"{list(frame.columns)}. Pass patient_column= the column holding patient ids."
            )
        frames.append(pd.DataFrame({"pid": frame[patient_column].astype(str), "split": name}))
    combined = pd.concat(frames, ignore_index=True)
    return find_leakage(combined, patient_column="pid", split_columns=["split"])


# --- load / save -----------------------------------------------------------------------

def meta_path(csv_path: str | Path) -> Path:
    csv_path = Path(csv_path)
    return csv_path.with_name(csv_path.stem + ".meta.json")


def save_manifest(manifest: Manifest, csv_path: str | Path) -> Path:
    """Validate and write the table (CSV) and its sidecar (root and metadata), atomically."""
    csv_path = Path(csv_path)
    table = validate_manifest(manifest.table, manifest.root, check_files=False)
    try:
        root = manifest.root.resolve().relative_to(csv_path.parent.resolve())
    except ValueError:
        root = manifest.root.resolve()
    atomic_write_csv(csv_path, table)
    atomic_write_json(meta_path(csv_path), {**manifest.meta, "root": str(root)})
    return csv_path


def load_manifest(
    csv_path: str | Path, root: str | Path | None = None, *, check_files: bool = True,
    check_leakage: bool = True,
) -> Manifest:
    """Read and validate a manifest. ``root`` overrides the root recorded beside it."""
    import json

    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise ManifestError(
            f"no manifest at {csv_path}. Build one first (notebooks/01_data_preparation.ipynb "
            "or sm_utils.datasets.build_dataset)."
        )
    meta: dict[str, Any] = {}
    if meta_path(csv_path).is_file():
        meta = json.loads(meta_path(csv_path).read_text())
    if root is None:
        recorded = Path(meta.get("root", "."))
        root = recorded if recorded.is_absolute() else csv_path.parent / recorded
    table = pd.read_csv(csv_path, dtype={"image_id": str, "patient_id": str, "path": str},
                        keep_default_na=False, na_values=[""])
    table = validate_manifest(table, root, check_files=check_files, source=str(csv_path),
                              check_leakage=check_leakage)
    return Manifest(table=table, root=Path(root), meta=meta)
