"""Figures of notebook 05: probe heatmap, strength sweep, attribution against p,
example maps, encodedness against the drop."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from .attribution import AttributionMaps


def plot_probe_heatmap(probes: pd.DataFrame, ax=None, title: str = "probe AUC before fine-tuning"):
    """Heatmap of probe AUC (rows: sources, columns: confounders; strength 1 / sampled)."""
    import matplotlib.pyplot as plt

    full = probes[probes["strength"].isna() | np.isclose(probes["strength"].fillna(1.0), 1.0)]
    wide = full.pivot_table(index="source", columns="confounder", values="probe_auc",
                            sort=False)
    if ax is None:
        _, ax = plt.subplots(figsize=(1.3 * wide.shape[1] + 2, 0.6 * wide.shape[0] + 1.5))
    image = ax.imshow(wide.to_numpy(), vmin=0.5, vmax=1.0, cmap="viridis", aspect="auto")
    ax.set_xticks(range(wide.shape[1]), wide.columns, rotation=30, ha="right")
    ax.set_yticks(range(wide.shape[0]), wide.index)
    for (i, j), value in np.ndenumerate(wide.to_numpy()):
        ax.text(j, i, f"{value:.2f}", ha="center", va="center",
                color="black" if value > 0.8 else "white", fontsize=9)
    ax.figure.colorbar(image, ax=ax, label="probe AUC (0.5: not decodable)")
    ax.set_title(title, fontsize=10)
    return ax.figure


def plot_strength_sweep(probes: pd.DataFrame):
    """Probe AUC against confounder strength, one panel per confounder probed at several."""
    import matplotlib.pyplot as plt

    swept = probes.groupby("confounder")["strength"].transform("nunique") > 1
    synthetic = probes[swept]
    names = list(dict.fromkeys(synthetic["confounder"]))
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 2.8), squeeze=False,
                             sharey=True)
    for ax, name in zip(axes[0], names):
        part = synthetic[synthetic["confounder"] == name]
        for k, (source, rows) in enumerate(part.groupby("source", sort=False)):
            rows = rows.sort_values("strength")
            ax.plot(rows["strength"], rows["probe_auc"], marker="o", color=f"C{k}", label=source)
            ax.fill_between(rows["strength"], rows["probe_auc_ci_low"], rows["probe_auc_ci_high"],
                            color=f"C{k}", alpha=0.15)
        ax.axhline(0.5, color="grey", linestyle=":")
        ax.set(title=name, xlabel="strength", ylim=(0.4, 1.02))
    axes[0][0].set_ylabel("probe AUC")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_attribution_vs_p(shares: pd.DataFrame, confounder: str = ""):
    """Attribution inside the mask as a multiple of the mask's area share (1: chance) against
    p, a line per source, with the bootstrap interval over images."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.6, 3.2))
    for k, (source, rows) in enumerate(shares.groupby("source", sort=False)):
        rows = rows.sort_values("p")
        ratio = rows["attribution_share"] / rows["mask_share"]
        ax.errorbar(rows["p"], ratio,
                    yerr=[ratio - rows["attribution_share_ci_low"] / rows["mask_share"],
                          rows["attribution_share_ci_high"] / rows["mask_share"] - ratio],
                    marker="o", capsize=3, color=f"C{k}", label=source)
    ax.axhline(1.0, color="grey", linestyle=":", label="chance (the mask's area share)")
    ax.set(xlabel="p (confounder prevalence among positive training images)",
           ylabel="attribution inside the mask\n(x the mask's area share)",
           title=f"{confounder} on o.o.d. images" if confounder else None)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_attribution_examples(examples: Sequence[tuple[str, AttributionMaps]], n: int = 4):
    """Rows of (image with mask outline, activation map) for the first ``n`` images of each."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(examples), n, figsize=(1.7 * n, 1.8 * len(examples)),
                             squeeze=False)
    for row, (title, result) in zip(axes, examples):
        for j, ax in enumerate(row):
            if j >= len(result.images):
                ax.axis("off")
                continue
            ax.imshow(result.images[j], cmap="gray", vmin=0, vmax=255)
            ax.imshow(result.maps[j], cmap="jet", alpha=0.45)
            ax.contour(result.masks[j], levels=[0.5], colors="white", linewidths=0.6)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"share {result.shares[j]:.2f}", fontsize=7)
        row[0].set_ylabel(title, fontsize=7)
    fig.tight_layout()
    return fig


def plot_encodedness_vs_drop(points: pd.DataFrame, stats: pd.DataFrame | None = None):
    """Scatter of pre-fine-tuning probe AUC against o.o.d. AUC drop, a panel per confounder."""
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(points["confounder"]))
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.2), squeeze=False,
                             sharex=True, sharey=True)
    sources = list(dict.fromkeys(points["source"]))
    for ax, name in zip(axes[0], names):
        part = points[points["confounder"] == name]
        for _, row in part.iterrows():
            k = sources.index(row["source"])
            ax.scatter(row["encodedness"], row["ood_drop"], color=f"C{k}", s=40,
                       label=row["source"])
        title = name
        if stats is not None and name in set(stats["confounder"]):
            s = stats.set_index("confounder").loc[name]
            title += ("\nrho n/a (equal probe AUCs)" if pd.isna(s["spearman_rho"]) else
                      f"\nrho {s['spearman_rho']:.2f}, p {s['p_value']:.2f} "
                      f"(min {s['min_p_value']:.2f})")
        ax.set(title=title, xlabel="probe AUC before fine-tuning", xlim=(0.48, 1.02))
        ax.title.set_fontsize(9)
    axes[0][0].set_ylabel("o.o.d. drop\n(clean AUC at p=0 - o.o.d. AUC at p=1)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    axes[0][-1].legend(handles, labels, fontsize=7)
    fig.tight_layout()
    return fig
