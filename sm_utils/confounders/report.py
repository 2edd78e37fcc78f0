"""Tables and figures of notebook 02: what each confounder does, where, and how much."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from ..manifest import Manifest
from .checks import check_confounder, check_sampled
from .registry import Confounder

# Rows of the count table: a run's splits (sm_utils.runs.split_rows), in this order and name.
SETS = {"train": "train", "val": "val", "iid": "test iid", "ood": "test ood",
        "clean": "test clean"}


def prevalence_counts(manifest: Manifest, confs: list[Confounder], p: float, seed: int,
                      fold: int) -> pd.DataFrame:
    """Per confounder and set: rows used, and confounded positives / negatives.

    The sets are exactly those a run uses (:func:`sm_utils.export.run_splits`): train and
    val confounded as one pool and then split, each test set from its pool (``test_ood`` /
    ``test_clean`` rows where the manifest has them, else ``test``); a test set the fold
    has no rows for is left out. A confounder a run could not use at ``p`` gets one row
    with its ``error``.
    """
    from ..export import run_splits  # imports torch (sm_utils.runs) on first use

    records = []
    for conf in confs:
        try:
            splits = run_splits(manifest, conf, p, seed, fold)
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
    from ..export import run_splits

    rows = run_splits(manifest, conf, p, seed, fold)["train"]
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

    from ..io import atomic_path

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
