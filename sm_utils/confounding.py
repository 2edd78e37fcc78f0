"""How a run confounds its data, and what notebook 02 shows of it.

:func:`run_sets`: the sets one run of a fold trains and tests on (train, val, and the i.i.d.,
o.o.d. and clean test sets), with a ``confounded`` column saying which rows carry the
confounder at prevalence p. Runs (:func:`sm_utils.runs.split_rows`), the export and the counts
below all take their rows from it, so they cannot drift apart. Then the tables and figures of
notebook 02: rows and confounded rows per set, an example row, measured checks, examples.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from .confounders import Confounder, apply_prevalence
from .confounders.checks import check_confounder, check_sampled
from .manifest import Manifest

NO_CONFOUNDER = "none"
TEST_SETS = ("iid", "ood", "clean")
# Manifest roles each test set is drawn from: the first role with rows in the fold. A dataset
# with a fixed o.o.d. set as published (the paper's sex task: male positives vs female
# negatives) gives it role "test_ood"; otherwise all three come from the "test" rows.
TEST_POOLS = {"iid": ("test",), "ood": ("test_ood", "test"), "clean": ("test_clean", "test")}


class ConfoundingError(ValueError):
    """A fold whose rows cannot make a run's sets."""


def confound_rows(rows: pd.DataFrame, conf: Confounder | None, p: float, seed: int,
                  test_set: str) -> pd.DataFrame:
    """Rows with a ``confounded`` column (a subset of rows for sampled confounders)."""
    if conf is None:
        return rows.assign(confounded=False)
    return apply_prevalence(rows, conf, p, seed, test_set)


def run_sets(manifest: Manifest, conf: Confounder | None, *, fold: int, p: float, seed: int,
             name: str | None = None) -> dict[str, pd.DataFrame]:
    """train, val (confounded like train) and the test sets of fold ``fold`` with ``conf`` at
    prevalence ``p`` (``conf`` None: nothing confounded); ``name`` names the manifest in errors.

    Each test set is drawn from its pool (:data:`TEST_POOLS`); a test set whose pool has no
    rows in the fold is left out (e.g. i.i.d. and clean on a manifest that has only a fixed
    o.o.d. test set).
    """
    train = manifest.rows(fold, "train")
    val = manifest.rows(fold, "val")
    pools = {}
    for test_set, roles in TEST_POOLS.items():
        found = [manifest.rows(fold, role) for role in roles]
        pools[test_set] = next((rows for rows in found if len(rows)), found[-1])
    if min(len(train), len(val)) == 0 or not any(len(rows) for rows in pools.values()):
        roles = manifest.table[f"fold_{fold}"].value_counts().to_dict()
        raise ConfoundingError(
            f"fold {fold} of {name or manifest.root} has {len(train)} train and {len(val)} val "
            f"rows and no test rows (roles found: {roles}); a run needs train, val and 'test' "
            "(or 'test_ood') rows. Rebuild the splits."
        )
    # As in the paper, the training pool (train + val) is confounded as a whole and then split,
    # so that a sampled confounder's pool sizes come from the pool, not from the small val set.
    pool = confound_rows(pd.concat([train, val]), conf, p, seed, "train")
    role = manifest.table.loc[pool.index, f"fold_{fold}"]
    sets = {"train": pool[role == "train"], "val": pool[role == "val"]}
    for test_set in TEST_SETS:
        if len(pools[test_set]):
            sets[test_set] = confound_rows(pools[test_set], conf, p, seed, test_set)
    return sets


# --- notebook 02 ----------------------------------------------------------------------------

# Rows of the count table: a run's sets (run_sets), in this order and name.
SETS = {"train": "train", "val": "val", "iid": "test iid", "ood": "test ood",
        "clean": "test clean"}


def prevalence_counts(manifest: Manifest, confs: list[Confounder], p: float, seed: int,
                      fold: int) -> pd.DataFrame:
    """Per confounder and set: rows used, and confounded positives / negatives.

    The sets are exactly those a run uses (:func:`run_sets`): train and
    val confounded as one pool and then split, each test set from its pool (``test_ood`` /
    ``test_clean`` rows where the manifest has them, else ``test``); a test set the fold
    has no rows for is left out. A confounder a run could not use at ``p`` gets one row
    with its ``error``.
    """
    records = []
    for conf in confs:
        try:
            splits = run_sets(manifest, conf, fold=fold, p=p, seed=seed)
        except ValueError as error:
            records.append({"confounder": conf.name, "set": "all", "error": str(error)})
            continue
        for key, set_name in SETS.items():
            if key not in splits:
                continue
            chosen = splits[key]
            positive = chosen["label"] == 1
            records.append({
                "confounder": conf.name, "set": set_name, "rows": len(chosen),
                "positives": int(positive.sum()),
                "confounded positives": int((chosen["confounded"] & positive).sum()),
                "negatives": int((~positive).sum()),
                "confounded negatives": int((chosen["confounded"] & ~positive).sum()),
            })
    return pd.DataFrame(records)


def example_row(manifest: Manifest, conf: Confounder, p: float, seed: int, fold: int) -> pd.Series:
    """A training row a run puts the confounder on at ``p`` (any training positive if none)."""
    rows = run_sets(manifest, conf, fold=fold, p=p, seed=seed)["train"]
    chosen = rows[rows["confounded"] & (rows["label"] == 1)]
    return (chosen if len(chosen) else rows[rows["label"] == 1]).iloc[0]


def measured_checks(images: dict[str, np.ndarray], confs: list[Confounder],
                    manifests: dict[str, Manifest], p: float, seed: int, fold: int) -> pd.DataFrame:
    """One row per measurement (synthetic: on the example image; sampled: phi per set)."""
    records = []
    for conf in confs:
        if conf.kind == "synthetic":
            records.append(check_confounder(conf, images[conf.name], seed))
        else:
            rows = manifests[conf.name].rows(fold, "train")
            records.extend(check_sampled(conf, rows, p, seed))
    return pd.DataFrame(records)


def plot_examples(images: dict[str, np.ndarray], confs: list[Confounder], seed: int,
                  path: str | Path | None = None, per_row: int = 2):
    """Clean | confounded | difference for each synthetic confounder; saved to ``path``."""
    import matplotlib.pyplot as plt

    from .io import atomic_path

    synthetic = [c for c in confs if c.kind == "synthetic"]
    n_rows = int(np.ceil(len(synthetic) / per_row))
    fig, axes = plt.subplots(n_rows, 3 * per_row, figsize=(2.2 * 3 * per_row, 2.4 * n_rows),
                             squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for k, conf in enumerate(synthetic):
        image = images[conf.name]
        clean = conf.inject(image, False, seed, "example")
        confounded = conf.inject(image, True, seed, "example")
        diff = confounded.astype(np.int16) - clean.astype(np.int16)
        limit = max(1, int(np.abs(diff).max()))
        row, col = divmod(k, per_row)
        panels = axes[row, 3 * col: 3 * col + 3]
        panels[0].imshow(clean, cmap="gray", vmin=0, vmax=255)
        panels[0].set_title(f"{conf.name}: clean", fontsize=8)
        panels[1].imshow(confounded, cmap="gray", vmin=0, vmax=255)
        panels[1].set_title("confounded", fontsize=8)
        panels[2].imshow(diff, cmap="coolwarm", vmin=-limit, vmax=limit)
        panels[2].set_title(f"difference (+-{limit})", fontsize=8)
    fig.tight_layout()
    if path is not None:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=80)
        os.chmod(path, 0o644)  # the temporary file was private
    return fig


def ct_dose_example(hu: np.ndarray, pixel_mm: float, centre: tuple[float, float], *,
                    roi_mm: float = 64.0, window: tuple[float, float] = (-600.0, 1500.0),
                    input_size: int = 224, resize: str = "nearest", seed: int = 0,
                    conf: Confounder | None = None) -> dict:
    """A CT slice in HU as a run on a CT manifest sees it, normal dose and low dose: the dose on
    the whole slice in HU at ``pixel_mm``, then the ``roi_mm`` box around ``centre``, the
    window and the resize to ``input_size``. Returns both model inputs, the box and the SD (HU)
    of the noise the low dose adds inside the box, measured before the window."""
    from .confounders import get_confounder
    from .hounsfield import SliceView, roi_box
    from .imaging import resize_grey

    conf = conf or get_confounder("ct_noise")
    spacing = (float(pixel_mm), float(pixel_mm))
    box = roi_box(centre[0], centre[1], spacing, roi_mm, hu.shape, "example slice")
    view = SliceView(window=tuple(window), pixel_mm=spacing, box=box)
    out: dict = {"box": box, "pixel_mm": float(pixel_mm), "roi_px": box[2] - box[0]}
    reconstructed = {}
    for name, confounded in (("normal dose", False), ("low dose", True)):
        # what Confounder.prepare does with a CT row (confounders.slices), keeping the HU
        reconstructed[name] = conf.inject_hu(hu, confounded, seed, "example", pixel_mm=spacing)
        out[name] = resize_grey(view.grey(reconstructed[name]), input_size, resize)
    added = view.cut(reconstructed["low dose"] - reconstructed["normal dose"])
    out["noise_sd_hu"] = float(added.std())
    return out
