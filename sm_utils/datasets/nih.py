"""NIH ChestX-ray14 as published: metadata CSV + PNGs -> binary-task manifests.

Builder ``nih_cxr14`` (the paper's sex task, ``nih_sex_task``, is in
:mod:`sm_utils.datasets.nih_sex_task` and reads the same files):

- ``nih_cxr14``: any binary task from a positive and a negative finding query
  (e.g. "Atelectasis" vs "No Finding"), with view filter, optional class sizes, and either
  patient-grouped splits (:func:`sm_utils.splits.make_splits`) or the official
  ``train_val_list.txt`` / ``test_list.txt`` as the fixed test set.

The metadata file is read as the provider publishes it: ``Data_Entry_2017.csv`` (ages such as
"060Y" in some copies, a trailing comma on every line) or ``Data_Entry_2017_v2020.csv``
(integer ages). Their bracketed headers ``OriginalImage[Width,Height]`` and
``OriginalImagePixelSpacing[x,y]`` contain commas, so the header is parsed with brackets in mind.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from ..manifest import Manifest, ManifestError, find_leakage, format_leakage
from ..progress import progress_bar
from ..splits import make_splits
from . import register_dataset
from .image_check import drop_unreadable

METADATA_FILES = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv")
OFFICIAL_SPLIT_FILES = ("train_val_list.txt", "test_list.txt")
FINDINGS = (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Emphysema",
    "Fibrosis", "Hernia", "Infiltration", "Mass", "No Finding", "Nodule",
    "Pleural_Thickening", "Pneumonia", "Pneumothorax",
)
VIEWS = ("PA", "AP")
# provider header name -> manifest column
BASE_COLUMNS = {
    "Image Index": "image_index",
    "Finding Labels": "finding_labels",
    "Follow-up #": "follow_up",
    "Patient ID": "patient_id",
    "Patient Age": "age",
    "Patient Gender": "sex",
    "View Position": "view",
}
BRACKET_COLUMNS = {
    "OriginalImage[Width,Height]": ("width", "height"),
    "OriginalImagePixelSpacing[x,y]": ("pixel_spacing_x", "pixel_spacing_y"),
}
AGE_UNITS = {"Y": 1.0, "M": 1.0 / 12.0, "W": 7.0 / 365.25, "D": 1.0 / 365.25}


class NIHInputError(ManifestError):
    """NIH ChestX-ray14 files that cannot be turned into a manifest as they are."""


def split_header(line: str) -> list[str]:
    """Split a header line on commas that are not inside square brackets."""
    names, depth, current = [], 0, []
    for char in line.strip().lstrip("\ufeff"):
        depth += char == "["
        depth -= char == "]"
        if char == "," and depth == 0:
            names.append("".join(current).strip().strip('"'))
            current = []
        else:
            current.append(char)
    names.append("".join(current).strip().strip('"'))
    return names


def parse_age(value: object) -> float:
    """Age in years from ``60``, ``"60"``, ``"060Y"``, ``"006M"``, ``"010D"``; NaN if empty."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return float("nan")
    text = str(value).strip().upper()
    if text == "":
        return float("nan")
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([YMWD]?)", text)
    if not match:
        raise NIHInputError(
            f"cannot read patient age {value!r}: expected years as a number (60) or a "
            f"DICOM age string (060Y, 006M, 010D)."
        )
    return float(match.group(1)) * AGE_UNITS.get(match.group(2) or "Y")


def find_metadata(root: str | Path, metadata_csv: str | Path | None = None) -> Path:
    """The metadata CSV: ``metadata_csv`` if given (relative to ``root`` or absolute), else
    ``Data_Entry_2017_v2020.csv`` or ``Data_Entry_2017.csv`` in ``root``."""
    root = Path(root)
    if not root.is_dir():
        raise NIHInputError(
            f"NIH root {root} is not a directory. Pass root= the folder that holds "
            f"{' or '.join(METADATA_FILES)} and the images_001 ... images_012 folders."
        )
    if metadata_csv is not None:
        path = Path(metadata_csv)
        path = path if path.is_absolute() else root / path
        if not path.is_file():
            raise NIHInputError(f"metadata file {path} does not exist. Check metadata_csv=.")
        return path
    for name in METADATA_FILES:
        if (root / name).is_file():
            return root / name
    raise NIHInputError(
        f"no NIH metadata file in {root}: expected {' or '.join(METADATA_FILES)} (as "
        "downloaded from the NIH Clinical Center). Put it there or pass metadata_csv=."
    )


def read_metadata(path: str | Path) -> pd.DataFrame:
    """Read a ``Data_Entry_2017*.csv`` into tidy columns.

    Columns: image_index, finding_labels, follow_up, patient_id (str), age (years, float),
    sex (M/F), view, width, height, pixel_spacing_x, pixel_spacing_y.
    """
    path = Path(path)
    with open(path, newline="", encoding="utf-8-sig") as fh:
        header = fh.readline()
    names = [n for n in split_header(header) if n != ""]
    missing = [n for n in BASE_COLUMNS if n not in names]
    if missing:
        raise NIHInputError(
            f"{path} is not an NIH ChestX-ray14 metadata file: header lacks {missing}. "
            f"Expected the columns {list(BASE_COLUMNS) + list(BRACKET_COLUMNS)}; found {names}."
        )
    columns: list[str] = []
    for name in names:  # bracketed names stand for several fields
        columns.extend(BRACKET_COLUMNS.get(name, (BASE_COLUMNS.get(name, name),)))

    rows = []
    with (open(path, newline="", encoding="utf-8-sig") as fh,
          progress_bar(None, f"reading {path.name}", "row") as bar):
        reader = csv.reader(fh)
        next(reader)
        for line_no, fields in enumerate(reader, start=2):
            bar.update(1)
            if not fields or all(f.strip() == "" for f in fields):
                continue
            while len(fields) > len(columns) and fields[-1].strip() == "":
                fields = fields[:-1]  # the 2017 file ends every line with a comma
            if len(fields) != len(columns):
                raise NIHInputError(
                    f"{path}, line {line_no}: expected {len(columns)} fields ({columns}), "
                    f"found {len(fields)}: {fields}. The file may be truncated or edited; "
                    "download it again."
                )
            rows.append(fields)
    if not rows:
        raise NIHInputError(f"{path} has a header but no rows. Download the file again.")
    frame = pd.DataFrame(rows, columns=columns)
    known = [*BASE_COLUMNS.values(), *(x for parts in BRACKET_COLUMNS.values() for x in parts)]
    frame = frame[[c for c in columns if c in known]]
    frame["patient_id"] = frame["patient_id"].str.strip().map(
        lambda s: str(int(s)) if s.isdigit() else s)
    frame["age"] = frame["age"].map(parse_age)
    frame["sex"] = frame["sex"].str.strip().str.upper()
    frame["view"] = frame["view"].str.strip().str.upper()
    frame["follow_up"] = pd.to_numeric(frame["follow_up"], errors="coerce").astype("Int64")
    for column in ("width", "height", "pixel_spacing_x", "pixel_spacing_y"):
        if column in frame:
            frame[column] = pd.to_numeric(frame[column], errors="coerce")
    bad_sex = sorted(set(frame["sex"]) - {"M", "F"})
    if bad_sex:
        raise NIHInputError(f"{path}: Patient Gender must be M or F; found {bad_sex}.")
    return frame.reset_index(drop=True)


def finding_sets(frame: pd.DataFrame) -> pd.Series:
    return frame["finding_labels"].map(lambda s: frozenset(x.strip() for x in str(s).split("|")))


def parse_query(query: str | Sequence[str], valid: Iterable[str], *, what: str) -> frozenset[str]:
    """Findings named by a query: "A", "A|B" or a list (any of them matches)."""
    parts = query.split("|") if isinstance(query, str) else list(query)
    names = frozenset(p.strip() for p in parts if p.strip())
    valid = sorted(set(valid))
    unknown = sorted(names - set(valid))
    if not names or unknown:
        raise NIHInputError(
            f"unknown finding name(s) {unknown or [query]} in the {what} query {query!r}. "
            f"Valid findings: {', '.join(valid)}. Join several with '|'."
        )
    return names


def label_task(
    frame: pd.DataFrame, positive: str | Sequence[str], negative: str | Sequence[str],
    views: str | Sequence[str] | None,
) -> pd.DataFrame:
    """Rows matching the positive (label 1) or negative (label 0) query in the chosen views.

    An image matches a query when it carries any of the query's findings; images matching
    both queries are dropped (ambiguous).
    """
    valid = set(FINDINGS) | set().union(*finding_sets(frame))
    pos, neg = (parse_query(q, valid, what=w) for q, w in ((positive, "positive"),
                                                          (negative, "negative")))
    if pos & neg:
        raise NIHInputError(
            f"the positive and negative queries share {sorted(pos & neg)}; make them disjoint."
        )
    findings = finding_sets(frame)
    is_pos = findings.map(lambda s: bool(s & pos))
    is_neg = findings.map(lambda s: bool(s & neg))
    keep = is_pos ^ is_neg
    if views is not None:
        views = [views] if isinstance(views, str) else list(views)
        views = [v.upper() for v in views]
        bad = sorted(set(views) - set(VIEWS))
        if bad:
            raise NIHInputError(f"unknown view(s) {bad}; valid views: {', '.join(VIEWS)}.")
        keep &= frame["view"].isin(views)
    out = frame[keep].copy()
    out["label"] = is_pos[keep].astype(int)
    return out.reset_index(drop=True)


def image_folders(root: Path) -> list[Path]:
    """Where NIH PNGs may lie: images_NNN/images/, images_NNN/, images/, or root itself."""
    folders = sorted(p for p in root.glob("images_*/images") if p.is_dir())
    folders += sorted(p for p in root.glob("images_*") if p.is_dir())
    folders += [p for p in (root / "images", root) if p.is_dir()]
    return folders


def index_images(root: str | Path) -> dict[str, str]:
    """Map PNG file name -> path relative to ``root`` over the provider's layouts."""
    root = Path(root)
    index: dict[str, str] = {}
    folders = image_folders(root)
    with progress_bar(None, "indexing NIH image folders", "folder", total=len(folders)) as bar:
        for folder in folders:
            with os.scandir(folder) as entries:
                for entry in entries:
                    if entry.name.lower().endswith(".png") and entry.name not in index:
                        index[entry.name] = Path(os.path.relpath(entry.path, root)).as_posix()
            bar.set_postfix(images=len(index), refresh=False)
            bar.update(1)
    return index


def attach_paths(
    frame: pd.DataFrame, root: Path, *, missing_images: str = "error", name_column: str = "image_index",
) -> tuple[pd.DataFrame, list[str]]:
    """Add ``path`` (relative to ``root``); handle listed-but-absent images.

    ``missing_images="error"`` raises listing the absent files; ``"drop"`` drops them and
    returns their names (recorded in the manifest's meta).
    """
    if missing_images not in ("error", "drop"):
        raise NIHInputError(f"missing_images must be 'error' or 'drop'; got {missing_images!r}.")
    index = index_images(root)
    paths = frame[name_column].map(index)
    absent = frame.loc[paths.isna(), name_column].tolist()
    if absent and missing_images == "error":
        shown = ", ".join(absent[:5]) + (f", ... ({len(absent) - 5} more)" if len(absent) > 5 else "")
        raise NIHInputError(
            f"{len(absent)} of {len(frame)} images listed in the metadata are absent under "
            f"{root} (searched images_NNN/images/, images_NNN/, images/ and the root): {shown}. "
            "Extract all image archives there, or pass missing_images='drop' to use only the "
            "images present."
        )
    out = frame[paths.notna()].copy()
    out["path"] = paths[paths.notna()]
    return out.reset_index(drop=True), absent


def read_image_list(path: Path) -> set[str]:
    if not path.is_file():
        raise NIHInputError(
            f"official split file {path} does not exist. Put train_val_list.txt and "
            "test_list.txt (from the NIH download) in the root, or pass official_split=False."
        )
    names = {line.strip() for line in path.read_text().splitlines() if line.strip()}
    if not names or not all(n.lower().endswith(".png") for n in names):
        raise NIHInputError(f"{path} should list one image file name (*.png) per line.")
    return names


def grouped_val_folds(
    strata: np.ndarray, groups: np.ndarray, *, n_folds: int, val_fraction: float, seed: int,
) -> list[np.ndarray]:
    """Validation index sets for ``n_folds`` patient-grouped train/val splits of a dev set.

    Same scheme as :func:`sm_utils.splits.make_splits` for the part after the test set:
    disjoint validation sets (k-fold) when ``n_folds * val_fraction <= 1``, else one grouped
    draw per fold with seed ``seed + fold``.
    """
    if not 0 < val_fraction < 1:
        raise NIHInputError(f"val_fraction must be in (0, 1); got {val_fraction}.")
    n_splits = max(2, round(1.0 / val_fraction))
    n_groups = len(set(groups))
    if n_groups < n_splits:
        raise NIHInputError(
            f"{n_groups} development patients are too few for val_fraction={val_fraction} "
            f"(need at least {n_splits}). Use more images or a larger val_fraction."
        )
    x = np.zeros(len(strata))
    if n_folds <= n_splits:
        splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        return [val for _, val in splitter.split(x, strata, groups)][:n_folds]
    folds = []
    for fold in range(n_folds):
        splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed + fold)
        folds.append(next(splitter.split(x, strata, groups))[1])
    return folds


def fixed_test_folds(
    table: pd.DataFrame, fixed_roles: pd.Series, *, n_folds: int, val_fraction: float, seed: int,
    strata: pd.Series | None = None,
) -> pd.DataFrame:
    """Add fold columns: rows whose ``fixed_roles`` is "dev" get train/val per fold, all other
    rows keep their fixed role (e.g. "test", "test_ood", "unused") in every fold."""
    if n_folds < 1:
        raise NIHInputError(f"n_folds must be at least 1; got {n_folds}.")
    out = table.reset_index(drop=True).copy()
    fixed = fixed_roles.reset_index(drop=True).to_numpy(dtype=object)
    dev_idx = np.flatnonzero(fixed == "dev")
    strata = out["label"] if strata is None else strata.reset_index(drop=True)
    val_sets = grouped_val_folds(
        strata.to_numpy()[dev_idx], out["patient_id"].astype(str).to_numpy()[dev_idx],
        n_folds=n_folds, val_fraction=val_fraction, seed=seed)
    for fold, val in enumerate(val_sets):
        roles = fixed.copy()
        roles[dev_idx] = "train"
        roles[dev_idx[val]] = "val"
        out[f"fold_{fold}"] = roles
    return out


def sample_rows(frame: pd.DataFrame, n: int | None, rng: np.random.Generator, what: str) -> pd.DataFrame:
    if n is None:
        return frame
    if n > len(frame):
        raise NIHInputError(
            f"asked for {n} {what} images but only {len(frame)} match the query, views and "
            f"available images. Lower the number or widen the query."
        )
    return frame.iloc[np.sort(rng.choice(len(frame), size=n, replace=False))]


MANIFEST_COLUMNS = ["image_id", "path", "label", "patient_id", "sex", "age", "view",
                    "finding_labels", "follow_up"]


def to_manifest_columns(frame: pd.DataFrame) -> pd.DataFrame:
    out = frame.rename(columns={"image_index": "image_id"}).copy()
    folds = [c for c in out.columns if c.startswith("fold_")]
    return out[MANIFEST_COLUMNS + folds]


@register_dataset("nih_cxr14")
def build_nih_cxr14(
    out_dir: str | Path,
    root: str | Path,
    metadata_csv: str | Path | None = None,
    positive: str | Sequence[str] = "Atelectasis",
    negative: str | Sequence[str] = "No Finding",
    views: str | Sequence[str] | None = ("PA", "AP"),
    n_positive: int | None = None,
    n_negative: int | None = None,
    official_split: bool = False,
    n_folds: int = 5,
    test_fraction: float = 0.2,
    val_fraction: float = 0.1,
    seed: int = 0,
    missing_images: str = "error",
    unreadable_images: str = "error",
) -> Manifest:
    """A binary NIH ChestX-ray14 task; the manifest's root is the image ``root``.

    ``positive``/``negative``: finding names, "A|B" or lists (an image matches when it has any
    of them). ``n_positive``/``n_negative``: sample that many images per class (seeded);
    None keeps all. ``official_split``: the official test_list.txt is the fixed test set and
    train_val_list.txt the development set; otherwise ``make_splits`` draws a grouped one.
    ``missing_images``/``unreadable_images``: "error" (name every one) or "drop" (counted in
    the meta); every listed image is checked once, in parallel (:mod:`.image_check`).
    """
    root = Path(root)
    meta_file = find_metadata(root, metadata_csv)
    frame = label_task(read_metadata(meta_file), positive, negative, views)
    frame, absent = attach_paths(frame, root, missing_images=missing_images)
    frame, unreadable = drop_unreadable(frame, root, name_column="image_index",
                                        unreadable_images=unreadable_images)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 14]))
    frame = pd.concat([sample_rows(frame[frame["label"] == 1], n_positive, rng, "positive"),
                       sample_rows(frame[frame["label"] == 0], n_negative, rng, "negative")])
    if frame["label"].nunique() < 2:
        raise NIHInputError(
            f"the task has only label(s) {sorted(frame['label'].unique())} after filtering "
            f"(positive={positive!r}, negative={negative!r}, views={views!r}); both classes "
            "are needed. Check the queries and views."
        )
    frame = frame.sort_values("image_index").reset_index(drop=True)

    if official_split:
        test_names = read_image_list(root / OFFICIAL_SPLIT_FILES[1])
        dev_names = read_image_list(root / OFFICIAL_SPLIT_FILES[0])
        fixed = frame["image_index"].map(
            lambda n: "test" if n in test_names else "dev" if n in dev_names else "unused")
        table = fixed_test_folds(frame, fixed, n_folds=n_folds, val_fraction=val_fraction, seed=seed)
        leaks = find_leakage(table)
        if leaks:
            raise NIHInputError("the official split lists put a patient on both sides:\n"
                                + format_leakage(leaks))
    else:
        table = make_splits(frame, n_folds=n_folds, test_fraction=test_fraction,
                            val_fraction=val_fraction, seed=seed)
    meta = {
        "dataset": "nih_cxr14",
        "metadata_file": meta_file.name,
        "positive": positive if isinstance(positive, str) else list(positive),
        "negative": negative if isinstance(negative, str) else list(negative),
        "views": views if views is None or isinstance(views, str) else list(views),
        "official_split": official_split,
        "seed": seed,
        "n_images": len(table),
        "n_positive": int(table["label"].sum()),
        "n_patients": int(table["patient_id"].nunique()),
        "absent_images_dropped": len(absent),
        "unreadable_images_dropped": len(unreadable),
        "unreadable_images": unreadable,
    }
    return Manifest(table=to_manifest_columns(table), root=root.resolve(), meta=meta)
