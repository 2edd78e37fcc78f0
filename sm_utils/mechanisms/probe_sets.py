"""The images a probe reads: a balanced set with and without the confounder
(synthetic: each image clean and confounded; sampled: one attribute value against another)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .features import MechanismError


@dataclass
class ProbeSet:
    """Images (uint8 (N, S, S)) with the probe's target ``y`` (1: with the confounder, or the
    attribute's value) and ``groups`` (patients: the cross-validation keeps them together)."""

    images: np.ndarray
    y: np.ndarray
    groups: np.ndarray
    image_ids: np.ndarray
    confounder: str
    kind: str
    strength: float | None
    description: str = ""


def _manifest(manifest):
    from ..manifest import Manifest, load_manifest
    from ..paths import resolve

    return manifest if isinstance(manifest, Manifest) else load_manifest(resolve(manifest))


def _confounder(confounder, strength: float | None = 1.0, params: dict | None = None):
    from ..confounders import Confounder, get_confounder

    if isinstance(confounder, Confounder):
        if params:
            raise MechanismError("pass confounder parameters either in the Confounder or as "
                                 "confounder_params, not both.")
        return confounder
    return get_confounder(str(confounder), strength=1.0 if strength is None else strength,
                          **dict(params or {}))


def _pick(ids: pd.Series, k: int, seed: int, salt: str) -> np.ndarray:
    """Positions of ``k`` of ``ids``, by a stable hash (the same choice on every machine)."""
    from ..confounders.prevalence import hash_rank

    return np.sort(hash_rank(ids.reset_index(drop=True), seed, salt)[:k])


def _pool_rows(manifest, fold: int, roles: Sequence[str] | None) -> pd.DataFrame:
    if roles is None:
        return manifest.table
    if isinstance(roles, str):
        roles = (roles,)
    rows = pd.concat([manifest.rows(fold, role) for role in roles])
    if rows.empty:
        found = sorted(manifest.table[f"fold_{fold}"].unique())
        raise MechanismError(f"fold {fold} has no rows with role(s) {list(roles)} (roles found: "
                             f"{found}); choose roles among those, or roles=None for all rows.")
    return rows


def probe_set(manifest, confounder, *, strength: float = 1.0, confounder_params: dict | None = None,
              fold: int = 0, roles: Sequence[str] | None = None, n_images: int = 300,
              image_size: int = 64, resize: str = "bilinear", seed: int = 0,
              cache_dir: str | os.PathLike | None = None) -> ProbeSet:
    """The balanced image set of a probe, from the manifest's rows (``roles`` of ``fold``, or
    every row with ``roles=None``), images at the model input (``image_size``, ``resize``).

    Synthetic confounder: up to ``n_images`` images, each clean (its baseline) and confounded
    at ``strength`` (2 x n_images items). Sampled confounder (sex, age, view): within each
    class of the label, as many rows with the attribute's value as with its reference (at most
    ``n_images`` in all); pixels as stored.
    """
    from ..data import ConfoundedImageDataset, ImageCache

    manifest = _manifest(manifest)
    conf = _confounder(confounder, strength, confounder_params)
    rows = _pool_rows(manifest, fold, roles)
    cache = ImageCache.for_manifest(manifest, image_size, cache_dir, resize=resize)
    if conf.kind == "sampled":
        return _sampled_probe_set(rows, conf, cache, n_images, seed)
    chosen = rows.iloc[_pick(rows["image_id"], min(n_images, len(rows)), seed, "probe")]
    both = pd.concat([chosen.assign(confounded=False), chosen.assign(confounded=True)],
                     ignore_index=True)
    conf = conf.memoised_under(cache.path.parent / "confounders")  # as a run does
    dataset = ConfoundedImageDataset(both, cache, confounder=conf, seed=seed, root=manifest.root,
                                     resize=resize)
    images = np.stack([dataset.image(i) for i in range(len(both))])
    return ProbeSet(images=images, y=both["confounded"].to_numpy(int),
                    groups=both["patient_id"].astype(str).to_numpy(),
                    image_ids=both["image_id"].astype(str).to_numpy(), confounder=conf.name,
                    kind="synthetic", strength=conf.strength,
                    description=f"{len(chosen)} images, each clean and with {conf.name} at "
                                f"strength {conf.strength:g}")


def _sampled_probe_set(rows: pd.DataFrame, conf, cache, n_images: int, seed: int) -> ProbeSet:
    from ..confounders import attribute_values

    attribute, value, reference = (conf.params["attribute"], str(conf.params["value"]),
                                   conf.params["reference"])
    values = attribute_values(rows, conf).to_numpy()
    is_value = values == value
    is_reference = (values != value) & rows[attribute].notna().to_numpy() if reference is None \
        else values == str(reference)
    labels = rows["label"].to_numpy()
    per_group = max(1, n_images // (2 * len(np.unique(labels))))
    keep = []
    for label in np.unique(labels):
        pair = [np.flatnonzero(is_value & (labels == label)),
                np.flatnonzero(is_reference & (labels == label))]
        k = min(len(pair[0]), len(pair[1]), per_group)
        for positions in pair:
            keep.extend(positions[_pick(rows["image_id"].iloc[positions], k, seed, "probe")])
    if not keep:
        counts = pd.crosstab(values, labels).to_dict()
        raise MechanismError(
            f"sampled confounder {conf.name!r}: no label class has rows with both {attribute}="
            f"{value} and {attribute}={reference or 'other'} (counts by label: {counts}), so a "
            "probe has one class only. Use rows holding both (roles=None takes every role of the "
            "manifest) or a manifest with that attribute."
        )
    chosen = rows.iloc[np.sort(np.array(keep))]
    positions = np.array([cache.index[str(i)] for i in chosen["image_id"]])
    return ProbeSet(images=np.asarray(cache.array[positions]), y=is_value[np.sort(keep)].astype(int),
                    groups=chosen["patient_id"].astype(str).to_numpy(),
                    image_ids=chosen["image_id"].astype(str).to_numpy(), confounder=conf.name,
                    kind="sampled", strength=None,
                    description=f"{len(chosen)} images, {attribute}={value} vs "
                                f"{reference or 'other'}, balanced within each label")
