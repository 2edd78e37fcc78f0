"""Optional export of a confounded data set as image folders plus a manifest.

Training never needs this (confounders are applied on the fly); it is for other tools that
want files. One fold of a manifest is written as::

    out_dir/images/<role>/<class>/<image_id>.png     role: train, val, test, test_ood, test_clean
    out_dir/manifest.csv (+ manifest.meta.json)      a valid sm_utils manifest with column fold_0

The rows are exactly those a run of the same fold, confounder, p and seed uses
(:func:`sm_utils.confounding.run_sets`): train + val confounded as one
pool and then split by role; ``test`` is the i.i.d. test set (same confounding as training),
``test_ood`` the reversed one and ``test_clean`` the unconfounded one, each drawn from the
manifest's ``test_ood`` / ``test_clean`` rows where it has them and from ``test`` otherwise.
The same source image can be in several test sets, so test rows get the image id
``<image_id>__<set>``; ``source_image_id`` keeps the original.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from . import imaging
from .confounders import Confounder, ConfounderError, get_confounder
from .confounding import run_sets
from .data import load_stored, row_views
from .hounsfield import ROI_COLUMNS, SPACING_COLUMNS, WINDOW_COLUMNS, read_hu_png
from .imaging import resize_grey
from .io import atomic_path
from .manifest import Manifest, load_manifest, save_manifest

ROLE_OF_TEST_SET = {"iid": "test", "ood": "test_ood", "clean": "test_clean"}


def load_grey(path: Path, size: int | None = None) -> np.ndarray:
    """An 8-bit greyscale image, optionally resized to size x size (bilinear, anti-aliased)."""
    image = imaging.load_grey(path)
    return image if size is None else resize_grey(image, size, "bilinear")


def _write_png(path: Path, image: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")


def export_confounded(
    manifest: Manifest | str | Path,
    confounder: Confounder | str,
    p: float,
    seed: int,
    fold: int,
    out_dir: str | Path,
    *,
    test_sets: tuple[str, ...] | None = None,
    image_size: int | None = None,
    resize: str = "bilinear",
) -> Manifest:
    """Write fold ``fold`` of ``manifest`` with ``confounder`` at prevalence ``p``.

    The rows are those a run uses (:func:`sm_utils.confounding.run_sets`); ``test_sets`` (default: every test
    set a run of this fold has) chooses which test sets to write. A run's confounding is
    checked for all its test sets, so a selection a run could not make is refused here too.
    Every image goes through ``confounder.prepare`` exactly as the training pipeline does: the
    confounder at its resolution (e.g. the tag on the stored image), then resized to
    ``image_size`` with ``resize`` (a run's ``resize``; None keeps the stored size), and X-ray
    dose noise gives every image its baseline noise. Returns the new manifest.
    """
    if not isinstance(manifest, Manifest):
        manifest = load_manifest(manifest)
    conf = get_confounder(confounder) if isinstance(confounder, str) else confounder
    if test_sets is not None:
        unknown = [t for t in test_sets if t not in ROLE_OF_TEST_SET]
        if unknown:
            raise ConfounderError(f"unknown test set(s) {unknown}; valid: {list(ROLE_OF_TEST_SET)}.")
    out_dir = Path(out_dir)

    splits = run_sets(manifest, conf, fold=fold, p=p, seed=seed)
    available = [t for t in ROLE_OF_TEST_SET if t in splits]
    if test_sets is None:
        test_sets = tuple(available)
    missing = [t for t in test_sets if t not in splits]
    if missing:
        raise ConfounderError(
            f"fold {fold} has no rows for test set(s) {missing}, so a run has none either; "
            f"this manifest's fold has {available}. Ask for those or add test rows."
        )
    parts = [splits[role].assign(export_role=role, export_suffix="") for role in ("train", "val")]
    for test_set in test_sets:
        parts.append(splits[test_set].assign(export_role=ROLE_OF_TEST_SET[test_set],
                                             export_suffix=f"__{test_set}"))
    rows = pd.concat(parts, ignore_index=True)

    records = []
    for row, view in zip(rows.itertuples(index=False), row_views(rows)):
        path = manifest.image_path(row.path)
        # a CT slice in HU becomes the 8-bit image of its row (box, window) as in a run
        stored = imaging.load_grey(path) if view is None else read_hu_png(path)
        size = image_size or (stored if view is None else view.cut(stored)).shape[0]
        if conf.kind == "synthetic":
            image = conf.prepare(stored, bool(row.confounded), seed, row.image_id, size=size,
                                 resize=resize, view=view)
        else:
            image = resize_grey(load_stored(path, view), size, resize)
        new_id = f"{row.image_id}{row.export_suffix}"
        relative = Path("images") / row.export_role / str(row.label) / f"{new_id}.png"
        _write_png(out_dir / relative, image)
        records.append({"image_id": new_id, "path": relative.as_posix(),
                        "source_image_id": row.image_id, "fold_0": row.export_role})
    hounsfield = [c for c in (*WINDOW_COLUMNS, *SPACING_COLUMNS, *ROI_COLUMNS) if c in rows]
    table = pd.concat([rows.drop(columns=["export_role", "export_suffix", "image_id", "path",
                                          *hounsfield,
                                          *[c for c in rows.columns if c.startswith("fold_")]]),
                       pd.DataFrame(records)], axis=1)
    first = ["image_id", "path", "label", "patient_id", "fold_0", "confounded", "source_image_id"]
    table = table[first + [c for c in table.columns if c not in first]]
    meta = {"exported_from": str(manifest.root), "fold": fold, "p": p, "seed": seed,
            "confounder": conf.spec(), "test_sets": list(test_sets), "image_size": image_size,
            "resize": resize}
    result = Manifest(table=table, root=out_dir, meta=meta)
    save_manifest(result, out_dir / "manifest.csv")
    return result
