"""Small plotting helpers shared by the notebooks."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from PIL import Image

from .hounsfield import read_hu_png, slice_view
from .manifest import Manifest


def stored_grey(manifest: Manifest, row) -> np.ndarray:
    """A row's image as the model's 8-bit grey before resizing (a CT slice: its box, windowed)."""
    view = slice_view(row)
    path = manifest.image_path(row["path"])
    if view is not None:
        return view.grey(read_hu_png(path))
    with Image.open(path) as img:
        return np.asarray(img.convert("L"))


def example_grid(
    manifest: Manifest, *, by: tuple[str, ...] = ("label", "sex"), per_group: int = 4, seed: int = 0,
) -> plt.Figure:
    """One row of example images per combination of ``by`` values (seeded choice)."""
    table = manifest.table
    by = tuple(c for c in by if c in table.columns)
    groups = list(table.groupby(list(by), sort=True)) if by else [((), table)]
    fig, axes = plt.subplots(len(groups), per_group, figsize=(2 * per_group, 2.1 * len(groups)),
                             squeeze=False)
    rng = np.random.default_rng(seed)
    for row_axes, (key, rows) in zip(axes, groups):
        key = key if isinstance(key, tuple) else (key,)
        chosen = rows.iloc[rng.permutation(len(rows))[:per_group]]
        for ax, (_, item) in zip(row_axes, chosen.iterrows()):
            ax.imshow(stored_grey(manifest, item), cmap="gray", vmin=0, vmax=255)
            ax.set_title(item["image_id"], fontsize=7)
        for ax in row_axes:
            ax.axis("off")
        row_axes[0].text(-0.08, 0.5, "\n".join(f"{c}={v}" for c, v in zip(by, key)),
                         transform=row_axes[0].transAxes, ha="right", va="center", fontsize=9)
    fig.tight_layout()
    return fig
