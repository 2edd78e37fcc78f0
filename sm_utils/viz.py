"""Small plotting helpers shared by the notebooks."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from PIL import Image

from .manifest import Manifest


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
        for ax, item in zip(row_axes, chosen.itertuples()):
            ax.imshow(np.asarray(Image.open(manifest.image_path(item.path))), cmap="gray", vmin=0, vmax=255)
            ax.set_title(item.image_id, fontsize=7)
        for ax in row_axes:
            ax.axis("off")
        row_axes[0].text(-0.08, 0.5, "\n".join(f"{c}={v}" for c, v in zip(by, key)),
                         transform=row_axes[0].transAxes, ha="right", va="center", fontsize=9)
    fig.tight_layout()
    return fig
