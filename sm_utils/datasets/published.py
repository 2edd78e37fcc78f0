"""Published split files (the paper's format) -> a manifest with the exact same splits.

The paper ships one test file and, per fold, a train and a val file; CSVs with columns
``path, pid, class`` (class strings such as YES/NO) or ``path, class, pid, Patient Gender``.
Class strings are mapped to 0/1 by ``class_map``. Images are found under ``root``: by the
listed path relative to it, or by file name in the NIH layouts (``images_NNN/images/...``).

Patient overlap between the test set and a fold's train/val files (the paper's sex split has
some) is checked on import and reported: a :class:`SplitOverlapWarning`, an
:class:`OverlapReport` returned by :func:`import_published_splits`, and a summary in the
manifest's meta. A manifest cannot hold leakage, so with ``on_overlap="report"`` (default) the
overlapping patient's rows outside its highest-priority group (test > val > train) are set to
``unused`` in that fold and listed in the report; ``on_overlap="error"`` refuses the import.
"""

from __future__ import annotations

import inspect
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ..manifest import Manifest, ManifestError, find_leakage
from . import register_dataset
from .image_check import drop_unreadable
from .nih import index_images

DEFAULT_CLASS_MAP = {"YES": 1, "NO": 0}
GROUP_PRIORITY = ("test", "val", "train")  # kept first when a patient is in several
REQUIRED = ("path", "pid", "class")
SEX_COLUMNS = ("patient gender", "sex", "gender")
SEX_VALUES = {"M": "M", "F": "F", "MALE": "M", "FEMALE": "F"}


class SplitFileError(ManifestError):
    """A split file that cannot be imported as it is."""


class SplitOverlapWarning(UserWarning):
    """Published split files put a patient in more than one of train/val/test."""


@dataclass
class OverlapReport:
    """Patients the published files place in more than one group of a fold.

    ``table`` has one row per (fold, patient): the groups it was listed in, the group kept,
    and how many of its images were set to ``unused`` in that fold.
    """

    table: pd.DataFrame

    def __bool__(self) -> bool:
        return not self.table.empty

    @property
    def n_patients(self) -> int:
        return int(self.table["patient_id"].nunique()) if len(self.table) else 0

    def summary(self) -> dict:
        if self.table.empty:
            return {"n_patients": 0, "by_fold": {}}
        by_fold = self.table.groupby("fold").agg(
            patients=("patient_id", "nunique"), images_set_unused=("images_set_unused", "sum"))
        return {
            "n_patients": self.n_patients,
            "patients": sorted(self.table["patient_id"].unique().tolist()),
            "by_fold": {f: {k: int(v) for k, v in row.items()}
                        for f, row in by_fold.iterrows()},
        }

    def __str__(self) -> str:
        if self.table.empty:
            return "no patient overlap between the published splits"
        lines = [f"{self.n_patients} patient(s) are in more than one published split:"]
        for fold, part in self.table.groupby("fold", sort=False):
            shown = ", ".join(f"{p} ({g})" for p, g in zip(part["patient_id"][:5], part["groups"][:5]))
            more = f", ... ({len(part) - 5} more)" if len(part) > 5 else ""
            lines.append(f"  {fold}: {len(part)} patient(s): {shown}{more}; "
                         f"{int(part['images_set_unused'].sum())} image(s) outside the kept group")
        return "\n".join(lines)


# --- reading ----------------------------------------------------------------------------

def read_split_file(path: str | Path, class_map: Mapping[str, int]) -> pd.DataFrame:
    """One split file as columns path, patient_id, label (and sex if the file has it)."""
    path = Path(path)
    if not path.is_file():
        raise SplitFileError(f"split file {path} does not exist. Check the file names given.")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise SplitFileError(
            f"split file {path} is not a readable CSV ({err}). Expected columns "
            f"{list(REQUIRED)} (optionally 'Patient Gender')."
        ) from err
    by_lower = {str(c).strip().lower(): c for c in frame.columns}
    missing = [c for c in REQUIRED if c not in by_lower]
    if missing:
        raise SplitFileError(
            f"split file {path} lacks column(s) {missing}: expected {list(REQUIRED)} "
            f"(optionally 'Patient Gender'); found {list(frame.columns)}. Rename the columns."
        )
    if frame.empty:
        raise SplitFileError(f"split file {path} has a header but no rows.")
    out = pd.DataFrame({
        "listed_path": frame[by_lower["path"]].str.strip(),
        "patient_id": frame[by_lower["pid"]].str.strip().map(_patient_id),
        "class": frame[by_lower["class"]].str.strip(),
    })
    empty = out[(out == "").any(axis=1)]
    if len(empty):
        raise SplitFileError(
            f"split file {path}: {len(empty)} row(s) with an empty path, pid or class "
            f"(first at data row {empty.index[0] + 1}). Fill or remove them."
        )
    keys = {str(k): int(v) for k, v in class_map.items()}
    unknown = sorted(set(out["class"]) - set(keys))
    if unknown:
        raise SplitFileError(
            f"split file {path}: class value(s) {unknown} are not in class_map {keys}. "
            f"Pass class_map= mapping every class string found ({sorted(set(out['class']))}) "
            "to 1 (positive) or 0 (negative)."
        )
    out["label"] = out.pop("class").map(keys)
    sex_column = next((by_lower[c] for c in SEX_COLUMNS if c in by_lower), None)
    if sex_column is not None:
        sex = frame[sex_column].str.strip().str.upper()
        bad = sorted(set(sex) - set(SEX_VALUES))
        if bad:
            raise SplitFileError(f"split file {path}: sex values {bad}; expected M or F.")
        out["sex"] = sex.map(SEX_VALUES)
    return out


def _patient_id(value: str) -> str:
    # "00012" and "12" are the same NIH patient
    return str(int(value)) if value.isdigit() else value


def fold_number(path: Path) -> int:
    numbers = re.findall(r"\d+", path.stem)
    if not numbers:
        raise SplitFileError(f"cannot tell the fold of {path}: its name has no number.")
    return int(numbers[-1])


def discover_split_files(
    split_dir: str | Path, test_pattern: str = "*test*.csv", train_pattern: str = "*train*.csv",
    val_pattern: str = "*val*.csv",
) -> tuple[Path, list[Path], list[Path]]:
    """Find the test file and the per-fold train/val files in a folder (fold = last number
    in the file name)."""
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise SplitFileError(f"split folder {split_dir} is not a directory. Check split_dir=.")
    tests = sorted(split_dir.glob(test_pattern))
    trains = sorted((p for p in split_dir.glob(train_pattern) if p not in tests), key=fold_number)
    vals = sorted((p for p in split_dir.glob(val_pattern) if p not in tests and p not in trains),
                  key=fold_number)
    found = sorted(p.name for p in split_dir.glob("*.csv"))
    if len(tests) != 1:
        raise SplitFileError(
            f"expected one test file matching {test_pattern!r} in {split_dir}; found "
            f"{[p.name for p in tests]} among {found}. Pass test_file= explicitly."
        )
    if not trains or [fold_number(p) for p in trains] != [fold_number(p) for p in vals]:
        raise SplitFileError(
            f"expected one train and one val file per fold in {split_dir} (patterns "
            f"{train_pattern!r}, {val_pattern!r}); found train {[p.name for p in trains]} and "
            f"val {[p.name for p in vals]}. Pass train_files= and val_files= explicitly."
        )
    return tests[0], trains, vals


def resolve_paths(listed: pd.Series, root: Path, missing_images: str) -> pd.Series:
    """Listed path -> path relative to ``root`` (as listed, or by file name)."""
    index: dict[str, str] | None = None
    resolved = {}
    for item in listed.unique():
        candidate = Path(item)
        if not candidate.is_absolute() and (root / candidate).is_file():
            resolved[item] = candidate.as_posix()
            continue
        if index is None:
            index = index_images(root) if root.is_dir() else {}
        resolved[item] = index.get(candidate.name)
    absent = [p for p, r in resolved.items() if r is None]
    if absent and missing_images == "error":
        shown = ", ".join(absent[:5]) + (f", ... ({len(absent) - 5} more)" if len(absent) > 5 else "")
        raise SplitFileError(
            f"{len(absent)} of {len(resolved)} image(s) listed in the split files are not "
            f"under {root} (looked for the listed path and for the file name in the NIH "
            f"layouts): {shown}. Pass root= the folder holding the images, or "
            "missing_images='drop'."
        )
    return listed.map(resolved)


# --- import -----------------------------------------------------------------------------

def import_published_splits(
    root: str | Path,
    test_file: str | Path | None = None,
    train_files: Sequence[str | Path] | None = None,
    val_files: Sequence[str | Path] | None = None,
    split_dir: str | Path | None = None,
    class_map: Mapping[str, int] | None = None,
    test_role: str = "test",
    on_overlap: str = "report",
    missing_images: str = "error",
    unreadable_images: str = "error",
) -> tuple[Manifest, OverlapReport]:
    """Import published split files; return the manifest and the overlap report."""
    if on_overlap not in ("report", "error"):
        raise SplitFileError(f"on_overlap must be 'report' or 'error'; got {on_overlap!r}.")
    if missing_images not in ("error", "drop"):
        raise SplitFileError(f"missing_images must be 'error' or 'drop'; got {missing_images!r}.")
    if not (test_role == "test" or test_role.startswith("test_")):
        raise SplitFileError(f"test_role must be 'test' or 'test_<name>'; got {test_role!r}.")
    if split_dir is not None:
        split_dir = _locate(split_dir, Path(root))
        if test_file or train_files or val_files:
            raise SplitFileError("pass either split_dir= or test_file=/train_files=/val_files=, "
                                 "not both.")
        test_file, train_files, val_files = discover_split_files(split_dir)
    if test_file is None or not train_files or not val_files:
        raise SplitFileError(
            "need a test file and per fold a train and a val file: pass test_file=, "
            "train_files=[...], val_files=[...] (fold order) or split_dir=."
        )
    if len(train_files) != len(val_files):
        raise SplitFileError(
            f"got {len(train_files)} train file(s) but {len(val_files)} val file(s); each fold "
            "needs one of each, in the same order."
        )
    class_map = DEFAULT_CLASS_MAP if class_map is None else class_map
    root = Path(root)
    test_file = _locate(test_file, root)
    train_files = [_locate(p, root) for p in train_files]
    val_files = [_locate(p, root) for p in val_files]

    listings = [(test_file, -1, "test")]
    for fold, (train, val) in enumerate(zip(train_files, val_files)):
        listings += [(train, fold, "train"), (val, fold, "val")]
    parts = []
    for path, fold, group in listings:
        part = read_split_file(path, class_map)
        parts.append(part.assign(fold=fold, group=group, file=Path(path).name))
    listed = pd.concat(parts, ignore_index=True)
    listed["path"] = resolve_paths(listed["listed_path"], root, missing_images)
    dropped = sorted(listed.loc[listed["path"].isna(), "listed_path"].unique())
    listed = listed[listed["path"].notna()]
    # every listed image checked once, in parallel: the damaged ones all named, or dropped
    _, unreadable = drop_unreadable(listed.drop_duplicates("path"), root,
                                    unreadable_images=unreadable_images)
    listed = _check_consistent(listed[~listed["path"].isin(unreadable)])

    attributes = ["sex"] if "sex" in listed else []
    images = (listed.drop_duplicates("path")[["path", "patient_id", "label", *attributes]]
              .sort_values("path").reset_index(drop=True))
    names = images["path"].map(lambda p: Path(p).name)
    images.insert(0, "image_id", names if names.is_unique else images["path"])

    n_folds = len(train_files)
    report_rows = []
    for fold in range(n_folds):
        in_fold = listed[(listed["fold"] == fold) | (listed["fold"] == -1)]
        role_of = in_fold.groupby("path")["group"].agg(lambda g: _first(set(g)))
        roles = images["path"].map(role_of).fillna("unused")
        # patient-level: keep the patient's highest-priority group, unset the others
        patient_groups = pd.DataFrame({"pid": images["patient_id"], "g": roles})
        patient_groups = patient_groups[patient_groups["g"] != "unused"]
        per_patient = patient_groups.groupby("pid")["g"].agg(set)
        for pid, groups in per_patient.items():
            if len(groups) < 2:
                continue
            keep = _first(groups)
            drop = (images["patient_id"] == pid) & (roles != keep) & (roles != "unused")
            report_rows.append({"fold": f"fold_{fold}", "patient_id": pid,
                                "groups": "+".join(g for g in GROUP_PRIORITY if g in groups),
                                "kept": keep, "images_set_unused": int(drop.sum())})
            roles = roles.mask(drop, "unused")
        images[f"fold_{fold}"] = roles.replace({"test": test_role})
    report = OverlapReport(pd.DataFrame(
        report_rows, columns=["fold", "patient_id", "groups", "kept", "images_set_unused"]))

    if report:
        if on_overlap == "error":
            raise SplitFileError(
                f"the published split files leak patients across splits:\n{report}\n"
                "Pass on_overlap='report' to import them with the overlapping rows set unused "
                "(and reported), or fix the files."
            )
        warnings.warn(
            f"{report}\nThese rows were set to 'unused' in the fold (the higher-priority group "
            "test > val > train was kept); see the manifest meta 'overlap'.",
            SplitOverlapWarning, stacklevel=2)
    if find_leakage(images):  # cannot happen after the resolution above; guard regressions
        raise SplitFileError("internal error: overlap resolution left leakage.")

    meta = {
        "dataset": "published_splits",
        "files": {"test": Path(test_file).name,
                  "train": [Path(p).name for p in train_files],
                  "val": [Path(p).name for p in val_files]},
        "class_map": {str(k): int(v) for k, v in class_map.items()},
        "test_role": test_role,
        "on_overlap": on_overlap,
        "overlap": report.summary(),
        "overlap_table": report.table.to_dict(orient="records"),
        "images_not_found_dropped": len(dropped),
        "unreadable_images_dropped": len(unreadable),
        "unreadable_images": unreadable,
        "n_images": len(images),
        "n_patients": int(images["patient_id"].nunique()),
    }
    return Manifest(table=images, root=root.resolve(), meta=meta), report


def _locate(path: str | Path, root: Path) -> Path:
    """A split file as given, or relative to the image root when it is not found as given."""
    path = Path(path)
    return root / path if not path.exists() and not path.is_absolute() and (root / path).exists() else path


def _first(groups: set[str]) -> str:
    return next((g for g in GROUP_PRIORITY if g in groups), "unused")


def _check_consistent(listed: pd.DataFrame) -> pd.DataFrame:
    """An image listed in several files must have the same patient, label (and sex)."""
    columns = [c for c in ("patient_id", "label", "sex") if c in listed]
    varying = listed.groupby("path")[columns].nunique()
    bad = varying[(varying > 1).any(axis=1)]
    if len(bad):
        example = bad.index[0]
        rows = listed[listed["path"] == example][["file", "listed_path", *columns]]
        raise SplitFileError(
            f"{len(bad)} image(s) are listed with different {columns} in different split "
            f"files, e.g. {example}:\n{rows.to_string(index=False)}\nFix the files so every "
            "image has one patient and one class."
        )
    return listed


def _builder_of(importer):
    """Give the decorated builder the signature ``(out_dir, <importer's parameters>)``.

    build_dataset checks the parameters it is given against the builder's signature (and
    build_from_notebook reads which are paths from its annotations), so a builder that forwards
    ``**params`` to an importer states the importer's parameters without repeating them.
    """
    def decorate(builder):
        signature = inspect.signature(importer)
        out_dir = inspect.Parameter("out_dir", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                    annotation="str | Path")
        builder.__signature__ = signature.replace(
            parameters=[out_dir, *signature.parameters.values()], return_annotation="Manifest")
        return builder
    return decorate


@register_dataset("published_splits")
@_builder_of(import_published_splits)
def build_published_splits(out_dir: str | Path, *args, **params) -> Manifest:
    """Registered builder: :func:`import_published_splits`'s parameters; the overlap report is
    in ``manifest.meta['overlap']``."""
    manifest, _ = import_published_splits(*args, **params)
    return manifest
