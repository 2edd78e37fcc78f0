"""Your own data: any table of images (CSV or Parquet) -> a binary-task manifest.

Builder ``table``: a table with an image path column, a label rule (a column and the values
that make a positive and a negative, after an optional pandas query), a patient column (or one
patient per image, said loudly), and provider columns mapped to the standard attribute names
(``sex`` as F/M, ``age`` in years, ``view`` upper-case, any other column as it is), then
patient-grouped, label-stratified splits (:func:`sm_utils.splits.make_splits`). A flat folder
of images with a labels file works with the defaults (columns ``path`` and ``label``, labels
1/0). DICOM images are converted once to 8-bit PNG (modality and VOI LUT, MONOCHROME1
inverted). Every row removed, and why, is counted in the manifest's meta and printed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..manifest import Manifest, ManifestError
from ..progress import parallel_map
from ..splits import make_splits
from . import register_dataset
from .image_check import drop_unreadable
from .nih import fixed_test_folds, parse_age

# Sex as researchers' tables write it -> F/M (case-insensitive)
SEX_VALUES = {"f": "F", "female": "F", "w": "F", "woman": "F", "m": "M", "male": "M",
              "man": "M"}
DICOM_SUFFIXES = (".dcm", ".dicom")
TABLE_SUFFIXES = (".csv", ".tsv", ".parquet", ".pq")


class TableInputError(ManifestError):
    """A user's table that cannot be turned into a manifest as it is."""


def read_table(path: Path) -> pd.DataFrame:
    """A CSV (TSV) or Parquet table, every column as read."""
    if not path.is_file():
        raise TableInputError(f"table {path} does not exist. Pass table= a CSV or Parquet file "
                              "(relative to the data root or absolute).")
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        return pd.read_parquet(path)
    if suffix in (".csv", ".tsv"):
        return pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", low_memory=False)
    raise TableInputError(f"table {path}: expected one of {list(TABLE_SUFFIXES)}; "
                          f"found {suffix or 'no suffix'}.")


def _values(value: Any) -> list:
    return list(value) if isinstance(value, list | tuple | set) else [value]


def _require(frame: pd.DataFrame, column: str, what: str, path: Path) -> None:
    if column not in frame.columns:
        raise TableInputError(f"{path}: no {what} column {column!r}; the table has "
                              f"{list(frame.columns)}. Pass the column's name as {what}_column=.")


def apply_label_rule(frame: pd.DataFrame, column: str, positive: Any, negative: Any,
                     other_labels: str, path: Path) -> tuple[pd.DataFrame, int]:
    """Label 1 where ``column`` is one of ``positive``, 0 where one of ``negative`` (None: any
    other value). Other values: an error listing them, or dropped (``other_labels="drop"``)."""
    values = frame[column]
    text = values.astype(str).str.strip()
    pos = text.isin([str(v).strip() for v in _values(positive)])
    if negative is None:
        neg = ~pos & values.notna()
    else:
        neg = text.isin([str(v).strip() for v in _values(negative)])
    both = pos & neg
    if both.any():
        raise TableInputError(f"label values {sorted(set(text[both]))} are both positive and "
                              "negative; make positive= and negative= disjoint.")
    other = ~(pos | neg)
    if other.any() and other_labels != "drop":
        counts = text[other].value_counts(dropna=False)
        raise TableInputError(
            f"{path}: {int(other.sum())} row(s) have {column} values outside the label rule "
            f"(positive={positive!r}, negative={negative!r}): "
            + ", ".join(f"{v!r} x{n}" for v, n in counts.head(8).items())
            + ". Add them to positive= or negative=, or pass other_labels='drop' to drop them "
            "(counted in the manifest's meta).")
    out = frame[~other].copy()
    out["label"] = pos[~other].astype(int)
    return out, int(other.sum())


def standard_sex(values: pd.Series, unknown_sex: str, path: Path) -> tuple[pd.Series, pd.Series]:
    """F/M from F, M, female, male, w (any case); (sex, rows whose sex is not recognised)."""
    mapped = values.astype(str).str.strip().str.lower().map(SEX_VALUES)
    unknown = mapped.isna()
    if unknown.any() and unknown_sex != "drop":
        shown = values[unknown].astype(str).value_counts(dropna=False).head(8)
        raise TableInputError(
            f"{path}: {int(unknown.sum())} row(s) have a sex that is not recognised: "
            + ", ".join(f"{v!r} x{n}" for v, n in shown.items())
            + f". Recognised (any case): {sorted(SEX_VALUES)}. Map them in the table, or pass "
            "unknown_sex='drop' to drop those rows (counted in the manifest's meta).")
    return mapped, unknown


def standard_age(values: pd.Series, age_unit: str, path: Path) -> pd.Series:
    """Age in years from numbers in ``age_unit`` (years, months, days) or DICOM age strings
    ("054Y", "006M"); empty stays NaN."""
    scale = {"years": 1.0, "months": 1.0 / 12.0, "days": 1.0 / 365.25}
    if age_unit not in scale:
        raise TableInputError(f"age_unit must be one of {list(scale)}; got {age_unit!r}.")

    def convert(value):
        try:
            number = float(value)
        except (TypeError, ValueError):
            try:
                return parse_age(value)  # "054Y", "006M": the unit is in the string
            except ManifestError as err:
                raise TableInputError(f"{path}: {err}") from None
        return number * scale[age_unit]

    return values.map(convert).astype(float)


def keep_views(frame: pd.DataFrame, views, removed: dict[str, int]
               ) -> tuple[pd.DataFrame, list[str] | None]:
    """The rows whose ``view`` column is one of ``views`` (any case; None keeps all), the
    others counted in ``removed``; returns the rows and the views as upper case."""
    if views is None:
        return frame, None
    wanted = [v.upper() for v in ([views] if isinstance(views, str) else views)]
    inside = frame["view"].isin(wanted)
    removed["view not in " + "/".join(wanted)] = int((~inside).sum())
    return frame[inside], wanted


def _save_stretched(pixels: np.ndarray, target: Path, invert: bool = False) -> None:
    """``pixels`` stretched from their minimum to their maximum to 8-bit grey, as PNG."""
    from PIL import Image

    pixels = np.asarray(pixels, dtype=float)
    low, high = float(pixels.min()), float(pixels.max())
    grey = (pixels - low) / (high - low) if high > low else np.zeros_like(pixels)
    if invert:
        grey = 1.0 - grey
    target.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.round(grey * 255).astype(np.uint8)).save(target)


def _is_dicom(path: str) -> bool:
    return path.lower().endswith(DICOM_SUFFIXES)


def dicom_to_png(source: Path, target: Path) -> None:
    """One DICOM image as 8-bit grey PNG: modality LUT (rescale), VOI LUT or window, stretched
    to 0..255, MONOCHROME1 inverted so that bone is bright."""
    import pydicom
    try:
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError:  # pydicom 2.4
        from pydicom.pixel_data_handlers.util import apply_modality_lut, apply_voi_lut

    dataset = pydicom.dcmread(source)
    pixels = apply_voi_lut(apply_modality_lut(dataset.pixel_array, dataset), dataset)
    _save_stretched(pixels, target,
                    invert=getattr(dataset, "PhotometricInterpretation", "") == "MONOCHROME1")


def _is_sixteen_bit(path: Path) -> bool:
    from PIL import Image

    if path.suffix.lower() != ".png" or not path.is_file():
        return False
    with Image.open(path) as image:   # reads the header only
        return image.mode in ("I;16", "I;16B", "I;16L", "I")


def _convert(job: tuple[bool, Path, Path]) -> None:
    is_dicom, source, target = job
    (dicom_to_png if is_dicom else png16_to_png8)(source, target)


def png16_to_png8(source: Path, target: Path) -> None:
    """A 16-bit grey PNG (PadChest's) as 8-bit: stretched from its own minimum to maximum,
    as a DICOM image is (``load_grey`` would clip every value above 255)."""
    from PIL import Image

    with Image.open(source) as image:
        pixels = np.asarray(image, dtype=float)
    _save_stretched(pixels, target)


@register_dataset("table")
def build_table(
    out_dir: str | Path,
    root: str | Path,
    table: str | Path = "labels.csv",
    path_column: str = "path",
    label_column: str = "label",
    positive: Any = 1,
    negative: Any = 0,
    query: str | None = None,
    other_labels: str = "error",
    patient_column: str | None = None,
    image_id_column: str | None = None,
    attributes: dict[str, str] | None = None,
    unknown_sex: str = "error",
    age_unit: str = "years",
    name: str = "table",
    n_folds: int = 5,
    test_fraction: float = 0.2,
    val_fraction: float = 0.1,
    seed: int = 0,
    missing_images: str = "error",
    unreadable_images: str = "error",
) -> Manifest:
    """A binary task from ``table`` (CSV/TSV/Parquet; relative to ``root``, the folder the
    image paths are relative to).

    ``positive``/``negative``: the ``label_column`` value(s) of each class (``negative=None``:
    every other value); values outside both are an error unless ``other_labels="drop"``.
    ``query``: a pandas query run first (e.g. ``"view == 'PA'"``, in the table's own column
    names). ``patient_column``: None gives each image its own patient (a warning: images of one
    patient may then straddle the splits). ``attributes``: table column -> manifest column
    (``{"Sex": "sex", "Age": "age", "ViewPosition": "view"}``); ``sex`` becomes F/M
    (``unknown_sex="drop"`` drops what is not recognised), ``age`` years (numbers in
    ``age_unit``, or DICOM strings such as "054Y"), ``view`` upper-case. ``missing_images``:
    "error" lists absent files, "drop" drops them. DICOM files are converted to PNG under
    ``out_dir/images``.
    """
    root, out_dir = Path(root), Path(out_dir)
    if not root.is_dir():
        raise TableInputError(f"data root {root} is not a directory; pass root= (data_root in "
                              "a grid's params) the folder the table's image paths start from.")
    table_path = Path(table) if Path(table).is_absolute() else root / table
    frame = read_table(table_path)
    removed: dict[str, int] = {}
    if query:
        try:
            kept = frame.query(query)
        except (ValueError, KeyError, NameError, SyntaxError, TypeError) as err:
            raise TableInputError(f"query {query!r} cannot run on {table_path} (columns "
                                  f"{list(frame.columns)}): {err}") from None
        removed["query"] = len(frame) - len(kept)
        frame = kept
    _require(frame, path_column, "path", table_path)
    _require(frame, label_column, "label", table_path)
    frame, removed["label outside the rule"] = apply_label_rule(
        frame, label_column, positive, negative, other_labels, table_path)

    out = pd.DataFrame({"path": frame[path_column].astype(str).str.strip(),
                        "label": frame["label"]})
    if patient_column is None:
        print("table: no patient_column: every image counts as its own patient, so images of "
              "one patient may land in both training and test. Name the table's patient "
              "column (patient_column=) if it has one.")
        out["patient_id"] = out["path"]
    else:
        _require(frame, patient_column, "patient", table_path)
        if frame[patient_column].isna().any():
            raise TableInputError(f"{table_path}: {int(frame[patient_column].isna().sum())} "
                                  f"row(s) have no {patient_column}; every image needs a patient.")
        out["patient_id"] = frame[patient_column].astype(str).str.strip()
    if image_id_column is not None:
        _require(frame, image_id_column, "image_id", table_path)
        out["image_id"] = frame[image_id_column].astype(str)
    else:
        out["image_id"] = out["path"].map(lambda p: Path(p).with_suffix("").as_posix())
    for column, standard in (attributes or {}).items():
        _require(frame, column, f"attribute ({standard})", table_path)
        values = frame[column]
        if standard == "sex":
            values, unknown = standard_sex(values, unknown_sex, table_path)
            removed["sex not recognised"] = int(unknown.sum())
        elif standard == "age":
            values = standard_age(values, age_unit, table_path)
        elif standard == "view":
            values = values.astype(str).str.strip().str.upper()
        out[standard] = values.to_numpy()
    if "sex" in out:
        out = out[out["sex"].notna()]

    meta = {
        "dataset": name,
        "builder": "table",
        "table": table_path.name,
        "label_rule": {"column": label_column, "positive": _values(positive),
                       "negative": None if negative is None else _values(negative),
                       "query": query},
        "patients": (f"column {patient_column}" if patient_column
                     else "one per image (no patient column)"),
        "attributes": dict(attributes or {}),
    }
    return finish_manifest(out, root, out_dir, meta, removed, what=table_path.name,
                           n_folds=n_folds, test_fraction=test_fraction,
                           val_fraction=val_fraction, seed=seed, missing_images=missing_images,
                           unreadable_images=unreadable_images)


def finish_manifest(out: pd.DataFrame, root: Path, out_dir: Path, meta: dict,
                    removed: dict[str, int], *, what: str, n_folds: int, test_fraction: float,
                    val_fraction: float, seed: int, missing_images: str,
                    unreadable_images: str = "error",
                    sixteen_bit: bool = False, fixed_roles: pd.Series | None = None) -> Manifest:
    """The common end of the table builders: ``out`` (image_id, path, label, patient_id and
    attributes; paths relative to ``root``) with absent images listed or dropped, DICOM (and,
    with ``sixteen_bit``, 16-bit PNG) converted to 8-bit PNG under ``out_dir/images``,
    patient-grouped splits (or, with ``fixed_roles`` "test"/"dev" per row, that test set and
    folds of the rest), and the meta completed with the rows removed (also printed) and the
    counts."""
    if missing_images not in ("error", "drop"):
        raise TableInputError(f"missing_images must be 'error' or 'drop'; got {missing_images!r}.")
    present = out["path"].map(lambda p: (Path(p) if Path(p).is_absolute() else root / p).is_file())
    absent = out.loc[~present, "path"].tolist()
    if absent and missing_images != "drop":
        shown = ", ".join(absent[:5]) + (f", ... ({len(absent) - 5} more)" if len(absent) > 5 else "")
        raise TableInputError(
            f"{len(absent)} of {len(out)} images listed in {what} are absent under "
            f"{root}: {shown}. Check the data root and the paths, or pass missing_images='drop'.")
    removed["image missing"] = len(absent)
    out = out[present]
    # every image checked once, in parallel (DICOM files are read, and checked, as converted)
    readable = out[~out["path"].map(_is_dicom)]
    _, unreadable = drop_unreadable(readable, root, unreadable_images=unreadable_images)
    removed["image unreadable"] = len(unreadable)
    out = out[~out["path"].astype(str).isin(unreadable)]

    image_root = root.resolve()
    source = out["path"].map(lambda p: Path(p) if Path(p).is_absolute() else root / p)
    dicom = out["path"].map(_is_dicom)
    wide = source.map(_is_sixteen_bit) & ~dicom if sixteen_bit else dicom & False
    if dicom.any() or wide.any():  # converted once beside the manifest; the rest linked from there
        image_root = out_dir.resolve()
        converted, jobs = [], []
        for path, file, is_dicom, is_wide in zip(out["path"], source, dicom, wide):
            if not (is_dicom or is_wide):
                converted.append(Path(os.path.relpath(file.resolve(), image_root)).as_posix())
                continue
            target = Path("images") / Path(path.lstrip("/")).with_suffix(".png")
            if not (image_root / target).is_file():
                jobs.append((is_dicom, file, image_root / target))
            converted.append(target.as_posix())
        parallel_map(_convert, jobs, desc="converting DICOM / 16-bit images", unit="image",
                     chunksize=16)  # on every core, one bar
        out = out.assign(path=converted)
    if out["image_id"].duplicated().any():
        raise TableInputError(f"{what}: image ids repeat (e.g. "
                              f"{out['image_id'][out['image_id'].duplicated()].iloc[0]!r}); "
                              "each row must be one image. Pass image_id_column= a unique column.")
    if out["label"].nunique() < 2:
        raise TableInputError(f"{what}: after the label rule only label(s) "
                              f"{sorted(out['label'].unique())} remain; both classes are needed.")
    if fixed_roles is None:
        splits = make_splits(out.reset_index(drop=True), n_folds=n_folds,
                             test_fraction=test_fraction, val_fraction=val_fraction, seed=seed)
    else:
        splits = fixed_test_folds(out, fixed_roles.loc[out.index], n_folds=n_folds,
                                  val_fraction=val_fraction, seed=seed)
    removed = {why: n for why, n in removed.items() if n}
    if removed:
        print(f"{meta['dataset']}: rows removed: "
              + ", ".join(f"{n} ({why})" for why, n in removed.items()))
    meta = {**meta, "rows_removed": removed, "dicom_converted": int(dicom.sum()),
            "sixteen_bit_converted": int(wide.sum()),
            "splits": {"n_folds": n_folds, "test_fraction": test_fraction,
                       "val_fraction": val_fraction, "seed": seed},
            "n_images": len(splits), "n_positive": int(splits["label"].sum()),
            "n_patients": int(splits["patient_id"].nunique())}
    columns = ["image_id", "path", "label", "patient_id",
               *[c for c in splits.columns if c not in ("image_id", "path", "label", "patient_id")
                 and not c.startswith("fold_")],
               *[c for c in splits.columns if c.startswith("fold_")]]
    return Manifest(table=splits[columns], root=image_root, meta=meta)

