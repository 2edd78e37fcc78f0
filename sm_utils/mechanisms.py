"""Mechanisms of shortcut learning (issue 12): is the confounder encoded, and where does the model look?

Two measurements, each for a source before fine-tuning or for a fine-tuned model:

- **Encodedness probe** (:func:`probe_model`, :func:`probe_source`): penultimate features (the
  pooled features the classifier reads) of a balanced set of images with and without the
  confounder, and a linear probe (scikit-learn: standardisation + ``LogisticRegression``)
  cross-validated with folds grouped by patient (``StratifiedGroupKFold``). Reported: the AUC
  of its out-of-fold scores with a patient-level bootstrap interval. Synthetic confounders
  (tag, low-pass, ...): every chosen image twice, clean (its baseline) and confounded, both
  versions in the same fold; sampled ones (sex): images with the attribute's value against
  images with the reference, balanced within each class of the disease label so that the
  probe cannot reach the attribute through the disease. AUC 0.5: not linearly decodable;
  1.0: trivially encoded. :func:`probe_sweep` sweeps the confounder's strength.
- **Attribution** (:func:`attribution_for_run`): a class activation map of the positive class
  on the confounded o.o.d. test images (for a synthetic confounder: the negatives, which carry
  it), and the share of the map's mass that falls inside the confounder's pixel mask
  (:meth:`sm_utils.confounders.Confounder.input_mask`; only localised confounders, tag, marker
  and support device, have one) beside the mask's share of the image area (what a map
  spread evenly would put there: the chance level).

Why captum and not ``grad-cam`` (pytorch-grad-cam): captum is pure PyTorch (its dependencies
are torch, numpy, matplotlib and tqdm, already here), while ``grad-cam`` pulls
``opencv-python``, which needs the system's libGL and is a large binary wheel.

Which map (``method``): ``"hirescam"`` (default; HiResCAM, Draelos & Carin 2020: the channel sum
of gradient x activation, element-wise, ReLU; captum ``LayerGradientXActivation``) or
``"gradcam"`` (Grad-CAM, Selvaraju et al. 2017: activations weighted by their spatially
*averaged* gradients, ReLU; captum ``LayerGradCam``), both of the evidence for the positive
class over the negative one (``contrast=True``: logit 1 - logit 0, what the softmax decision
depends on). Measured on the demo (64 px phantoms, the paper's tag: a 9-pixel "R"): for models
whose o.o.d. AUC (0.04-0.18) shows they use the tag, Grad-CAM put at most 2.8x the mask's area
share inside it at any layer of Lite0 (averaging the gradient over the image throws away where
it is, and the map follows the activations: the whole chest), HiResCAM 6-8x at ``blocks.2`` and
13-23x at ``blocks.1``, against 1.5-2.7x for models trained without the tag. The notebook shows
both methods.

Layer: the final feature map is coarse (2 x 2 for a 64 px input to EfficientNet-Lite0, stride
32), too coarse to say whether a 3 x 3 px tag is looked at; ``layer="auto"`` takes the deepest
of the model's top-level blocks whose map still has at least 16 x 16 cells (``blocks.1``,
stride 4, for Lite0 at 64 px; ``blocks.2`` at 224 px).

Grids: :func:`mechanisms_for_run` does both for a fine-tuned model in the process that trained
it (what ``execute_run`` calls at its end), :func:`run_mechanisms` for a finished run directory
whose fine-tuned weights were kept (:func:`save_run_model`, ``model.safetensors``), and
:func:`encodedness_vs_drop` relates the pre-fine-tuning probe AUC of each source to its o.o.d.
AUC drop (Spearman, permutation p) per confounder.
"""

from __future__ import annotations

import difflib
import itertools
import json
import math
import os
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

PENULTIMATE = "penultimate"
AUTO = "auto"
MODEL_FILE = "model.safetensors"
MECHANISMS_FILE = "mechanisms.json"
# method -> the captum class that computes it
ATTRIBUTION_METHODS = {"hirescam": "captum.attr.LayerGradientXActivation (channel sum, ReLU)",
                       "gradcam": "captum.attr.LayerGradCam (ReLU)"}
DEFAULT_STRENGTHS = (0.0, 0.25, 0.5, 1.0)
# A map coarser than this cannot localise a small marker; "auto" looks for one as fine.
MIN_CAM_SIDE = 16

__all__ = [
    "MechanismError",
    "ProbeSet",
    "activation_maps",
    "attribution_for_run",
    "attribution_maps",
    "attribution_sweep",
    "cam_layer",
    "encodedness_points",
    "encodedness_vs_drop",
    "extract_features",
    "feature_layers",
    "fine_tune",
    "fit_probe",
    "grouped_bootstrap_auc",
    "load_run_model",
    "mechanisms_for_run",
    "ood_drop",
    "probe_model",
    "probe_set",
    "probe_source",
    "probe_sweep",
    "probe_table",
    "run_mechanisms",
    "save_run_model",
    "spearman_permutation",
]


class MechanismError(ValueError):
    """A probe or attribution that cannot be computed as asked (the message says what to change)."""


# ------------------------------------------------------------------------------- features


def _arch_name(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return str(getattr(model, "arch_name", None) or cfg.get("architecture") or type(model).__name__)


def _classifier(model: nn.Module) -> nn.Linear | None:
    head = model.get_classifier() if hasattr(model, "get_classifier") else getattr(model, "fc", None)
    if isinstance(head, nn.Linear):
        return head
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def feature_layers(model: nn.Module) -> list[str]:
    """Layer names a probe or Grad-CAM can use: ``penultimate`` and the modules at the top two
    levels of the model (timm: ``blocks.0`` ... ``conv_head``; Keras ResNet50: ``conv3.block4``)."""
    names = [n for n, _ in model.named_modules() if n and n.count(".") <= 1]
    return [PENULTIMATE, *names]


def _layer_module(model: nn.Module, layer: str) -> nn.Module:
    modules = dict(model.named_modules())
    if layer and layer in modules:
        return modules[layer]
    options = feature_layers(model)
    close = difflib.get_close_matches(str(layer), options, n=5, cutoff=0.5)
    shown = ", ".join(options[:12]) + (", ..." if len(options) > 12 else "")
    raise MechanismError(
        f"{_arch_name(model)} has no layer {layer!r}"
        f"{' (close: ' + ', '.join(close) + ')' if close else ''}. Set layer to "
        f"{PENULTIMATE!r} (the pooled features its classifier reads) or a module name of this "
        f"model: {shown} (sm_utils.mechanisms.feature_layers(model) lists them all)."
    )


def _pool(output: Any, model: nn.Module, layer: str) -> torch.Tensor:
    if isinstance(output, (tuple, list)) and output:
        output = output[0]
    if not isinstance(output, torch.Tensor) or output.ndim not in (2, 3, 4):
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise MechanismError(
            f"layer {layer!r} of {_arch_name(model)} gives {shape}, not features (N, C), tokens "
            f"(N, T, C) or a feature map (N, C, H, W). Set layer to {PENULTIMATE!r} or a block "
            "that outputs a feature map (feature_layers(model) lists the candidates)."
        )
    if output.ndim == 4:
        return output.mean(dim=(2, 3))
    if output.ndim == 3:
        return output.mean(dim=1)
    return output


def _device(device: str | torch.device) -> torch.device:
    from .training import resolve_device

    return device if isinstance(device, torch.device) else resolve_device(device)


@torch.no_grad()
def extract_features(model: nn.Module, prep, images: np.ndarray, *, layer: str = PENULTIMATE,
                     batch_size: int = 64, device: str | torch.device = "cpu") -> np.ndarray:
    """Features (N, D) float64 of uint8 images (N, H, W), the model in eval mode.

    ``layer="penultimate"``: the input of the classifier (after global pooling; dropout is off
    in eval mode); a module name: its output, average-pooled over space (or tokens).
    """
    device = _device(device)
    images = np.asarray(images)
    if images.ndim != 3 or images.dtype != np.uint8 or not len(images):
        raise MechanismError(f"expected uint8 images (N, H, W) with N >= 1; got {images.dtype} "
                             f"{images.shape}.")
    captured: list[torch.Tensor] = []
    if layer == PENULTIMATE:
        head = _classifier(model)
        if head is None:
            raise MechanismError(
                f"{_arch_name(model)} has no linear classifier, so it has no penultimate "
                "features: set layer to one of its modules (feature_layers(model) lists them)."
            )

        def keep_input(module, args) -> None:
            captured.append(args[0])

        hook = head.register_forward_pre_hook(keep_input)
    else:
        module = _layer_module(model, layer)

        def keep_output(module, args, output) -> None:
            captured.append(_pool(output, model, layer))

        hook = module.register_forward_hook(keep_output)
    model.eval().to(device)
    chunks = []
    try:
        for start in range(0, len(images), batch_size):
            captured.clear()
            batch = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size]))
            model(prep(batch.to(device)))
            if not captured:
                raise MechanismError(
                    f"layer {layer!r} of {_arch_name(model)} did not run in the forward pass "
                    f"(it is not used by this model's forward()); choose another layer."
                )
            chunks.append(_pool(captured[0], model, layer).float().cpu())
    finally:
        hook.remove()
    return torch.cat(chunks).numpy().astype(np.float64)


# ------------------------------------------------------------------------------- probe sets


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
    from .manifest import Manifest, load_manifest
    from .paths import resolve

    return manifest if isinstance(manifest, Manifest) else load_manifest(resolve(manifest))


def _confounder(confounder, strength: float | None = 1.0, params: dict | None = None):
    from .confounders import Confounder, get_confounder

    if isinstance(confounder, Confounder):
        if params:
            raise MechanismError("pass confounder parameters either in the Confounder or as "
                                 "confounder_params, not both.")
        return confounder
    return get_confounder(str(confounder), strength=1.0 if strength is None else strength,
                          **dict(params or {}))


def _pick(ids: pd.Series, k: int, seed: int, salt: str) -> np.ndarray:
    """Positions of ``k`` of ``ids``, by a stable hash (the same choice on every machine)."""
    from .confounders.prevalence import hash_rank

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
    from .data import ConfoundedImageDataset, ImageCache

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
    from .confounders import attribute_values

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


# ------------------------------------------------------------------------------- the probe


def grouped_bootstrap_auc(y, scores, groups, *, n_boot: int = 1000, level: float = 0.95,
                          seed: int = 0) -> tuple[float, float]:
    """Percentile interval of the AUC, resampling groups (patients) with replacement.

    Every image of a drawn patient comes along (the images of a patient are not independent,
    nor are an image's clean and confounded versions). Draws without both classes are skipped.
    """
    y = np.asarray(y).astype(int)
    scores = np.asarray(scores, dtype=float)
    codes = pd.factorize(pd.Series(np.asarray(groups)).astype(str))[0]
    pos, neg = y == 1, y == 0
    if not pos.any() or not neg.any():
        return float("nan"), float("nan")
    sp, sn = scores[pos], scores[neg]
    wins = (sp[:, None] > sn[None, :]) + 0.5 * (sp[:, None] == sn[None, :])
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 1212]))
    n_groups = codes.max() + 1
    draws = rng.integers(0, n_groups, size=(n_boot, n_groups))
    weights = np.zeros((n_boot, n_groups))
    np.add.at(weights, (np.arange(n_boot)[:, None], draws), 1.0)
    wp, wn = weights[:, codes[pos]], weights[:, codes[neg]]
    denominator = wp.sum(1) * wn.sum(1)
    ok = denominator > 0
    values = ((wp[ok] @ wins) * wn[ok]).sum(1) / denominator[ok]
    if not len(values):
        return float("nan"), float("nan")
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def fit_probe(features, y, groups, *, n_splits: int = 5, C: float = 1.0, n_boot: int = 1000,
              seed: int = 0, permute_labels: bool = False) -> dict[str, Any]:
    """Cross-validated linear probe of ``y`` from ``features``, folds grouped by ``groups``.

    Pipeline: StandardScaler + LogisticRegression(C) (L2, liblinear), StratifiedGroupKFold with
    ``n_splits`` (fewer when a class has fewer groups). ``probe_auc`` is the AUC of the pooled
    out-of-fold decision scores; ``probe_auc_ci_*`` its patient-level bootstrap interval;
    ``probe_fold_auc`` the mean AUC within folds. ``permute_labels=True`` shuffles ``y``
    first (seeded): the null, where the probe must find nothing.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedGroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X = np.asarray(features, dtype=np.float64)
    y = np.asarray(y).astype(int).ravel()
    groups = np.asarray(groups).astype(str).ravel()
    if X.ndim != 2 or len(X) != len(y) or len(y) != len(groups):
        raise MechanismError(f"features (N, D), y (N,) and groups (N,) must agree; got "
                             f"{X.shape}, {y.shape} and {groups.shape}.")
    if not np.isin(y, [0, 1]).all():
        raise MechanismError(f"probe targets must be 0/1; found {sorted(set(y.tolist()))[:5]}.")
    classes = np.unique(y)
    if len(classes) < 2:
        raise MechanismError(
            f"the probe set has one class only: all {len(y)} samples have y={classes[0] if len(y) else '-'} "
            f"({'with' if len(y) and classes[0] == 1 else 'without'} the confounder). A probe needs "
            "images with and without it: for a sampled confounder (sex) choose rows holding both "
            "values (roles=None, another fold or manifest); for a synthetic one, build the set with "
            "probe_set(), which pairs every image clean and confounded."
        )
    if not np.isfinite(X).all():
        raise MechanismError("the features hold NaN or inf (a diverged model?); the probe cannot "
                             "use them.")
    groups_per_class = min(len(np.unique(groups[y == c])) for c in classes)
    k = min(int(n_splits), groups_per_class)
    if k < 2:
        raise MechanismError(
            f"cross-validation grouped by patient needs at least 2 patients in each class; one "
            f"class has {groups_per_class}. Use more images (n_images, roles=None)."
        )
    if permute_labels:
        y = y[np.random.default_rng(np.random.SeedSequence([int(seed), 4242])).permutation(len(y))]
    scores = np.full(len(y), np.nan)
    fold_aucs, converged = [], True
    cv = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=int(seed) % 2**32)
    for train, test in cv.split(X, y, groups):
        if len(np.unique(y[train])) < 2:
            raise MechanismError("a cross-validation fold has one class only in training; use "
                                 "more images or fewer splits (n_splits).")
        # liblinear: about 10x faster than lbfgs here (a few hundred samples, 1280 features)
        probe = make_pipeline(StandardScaler(), LogisticRegression(
            C=C, solver="liblinear", max_iter=1000, random_state=int(seed) % 2**32))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            probe.fit(X[train], y[train])
        converged &= not any(issubclass(w.category, ConvergenceWarning) for w in caught)
        scores[test] = probe.decision_function(X[test])
        if len(np.unique(y[test])) == 2:
            fold_aucs.append(roc_auc_score(y[test], scores[test]))
    low, high = grouped_bootstrap_auc(y, scores, groups, n_boot=n_boot, seed=seed)
    return {
        "probe_auc": float(roc_auc_score(y, scores)),
        "probe_auc_ci_low": low,
        "probe_auc_ci_high": high,
        "probe_fold_auc": float(np.mean(fold_aucs)) if fold_aucs else float("nan"),
        "probe_n": len(y),
        "probe_n_pos": int(y.sum()),
        "probe_n_groups": len(np.unique(groups)),
        "probe_n_splits": int(k),
        "probe_C": float(C),
        "probe_permuted": bool(permute_labels),
        "probe_converged": bool(converged),
    }


def probe_model(model: nn.Module, prep, manifest, confounder, *, strength: float = 1.0,
                confounder_params: dict | None = None, fold: int = 0,
                roles: Sequence[str] | None = None, n_images: int = 300, image_size: int = 64,
                resize: str = "bilinear", layer: str = PENULTIMATE, seed: int = 0,
                n_splits: int = 5, C: float = 1.0, n_boot: int = 1000,
                permute_labels: bool = False, cache_dir: str | os.PathLike | None = None,
                device: str | torch.device = "cpu", batch_size: int = 64) -> dict[str, Any]:
    """Encodedness of ``confounder`` in ``model``'s features: :func:`probe_set` +
    :func:`extract_features` + :func:`fit_probe`. Returns a flat, JSON-ready dict."""
    pset = probe_set(manifest, confounder, strength=strength, confounder_params=confounder_params,
                     fold=fold, roles=roles, n_images=n_images, image_size=image_size,
                     resize=resize, seed=seed, cache_dir=cache_dir)
    features = extract_features(model, prep, pset.images, layer=layer, device=device,
                                batch_size=batch_size)
    result = fit_probe(features, pset.y, pset.groups, n_splits=n_splits, C=C, n_boot=n_boot,
                       seed=seed, permute_labels=permute_labels)
    return {"confounder": pset.confounder, "kind": pset.kind,
            "strength": pset.strength if pset.strength is not None else float("nan"),
            "layer": layer, "feature_dim": int(features.shape[1]), **result}


def probe_source(source: str, weights: str | os.PathLike | None = None, arch: str | None = None,
                 manifest: Any = "data/demo/phantom_cxr/manifest.csv", confounder: Any = "tag",
                 *, init_seed: int = 812, image_size: int = 64, **kwargs) -> dict[str, Any]:
    """Pre-fine-tuning encodedness of a source: :func:`probe_model` on ``create_model(source)``.

    The classification head is not used (penultimate features). ``init_seed`` seeds torch
    before the model is made, as a run seeds it with its ``seed`` (812 by default): the
    ``random`` source is then the same network a run with that seed starts from.
    """
    from .sources import check_source_arch, create_model

    torch.manual_seed(int(init_seed))
    model, prep = create_model(source, arch=arch, weights=weights, num_classes=2, drop_rate=0.0,
                               image_size=image_size)
    out = probe_model(model, prep, manifest, confounder, image_size=image_size, **kwargs)
    return {"source": source, "arch": check_source_arch(source, arch), **out}


def probe_sweep(model: nn.Module, prep, manifest, confounder: str,
                strengths: Iterable[float] = DEFAULT_STRENGTHS, **kwargs) -> pd.DataFrame:
    """:func:`probe_model` at each strength (a sampled confounder, which has none: one row)."""
    from .confounders import get_confounder

    if get_confounder(confounder).kind == "sampled":
        strengths = [1.0]
    return pd.DataFrame([probe_model(model, prep, manifest, confounder, strength=float(s), **kwargs)
                         for s in strengths])


def _entry(item, default_params: dict | None = None) -> tuple[str, dict]:
    """(name, params) of a confounder or (name, {weights, arch}) of a source given as a name,
    a dict or a grid spec object."""
    if isinstance(item, str):
        return item, dict(default_params or {})
    if isinstance(item, dict):
        rest = {k: v for k, v in item.items() if k != "name"}
        return str(item["name"]), rest.get("params", rest)
    return str(item.name), dict(getattr(item, "params", None) or {})


def probe_table(sources: Sequence[Any], confounders: Sequence[Any], manifest, *,
                strengths: Iterable[float] = (1.0,), init_seed: int = 812, image_size: int = 64,
                **kwargs) -> pd.DataFrame:
    """Probe every source (a name, a dict with name/weights/arch, or a grid SourceSpec) for
    every confounder (a name, a dict with name/params, or a grid ConfounderSpec) and strength
    of the synthetic ones; one row each, with ``seconds``."""
    from .sources import check_source_arch, create_model

    rows = []
    for source in sources:
        name = source if isinstance(source, str) else (source["name"] if isinstance(source, dict)
                                                        else source.name)
        weights = None if isinstance(source, str) else (
            source.get("weights") if isinstance(source, dict) else source.weights)
        arch = None if isinstance(source, str) else (
            source.get("arch") if isinstance(source, dict) else source.arch)
        torch.manual_seed(int(init_seed))
        model, prep = create_model(name, arch=arch, weights=weights, num_classes=2, drop_rate=0.0,
                                   image_size=image_size)
        for item in confounders:
            conf_name, params = _entry(item)
            tic = time.perf_counter()
            sweep = probe_sweep(model, prep, manifest, conf_name, strengths,
                                confounder_params=params, image_size=image_size, **kwargs)
            sweep.insert(0, "arch", check_source_arch(name, arch))
            sweep.insert(0, "source", name)
            sweep["seconds"] = (time.perf_counter() - tic) / len(sweep)
            rows.append(sweep)
    return pd.concat(rows, ignore_index=True)


# ------------------------------------------------------------------------------- attribution


def cam_layer(model: nn.Module, image_size: int, *, min_side: int = MIN_CAM_SIDE) -> str:
    """The deepest of :func:`feature_layers` whose feature map has at least ``min_side`` cells
    a side for ``image_size`` px inputs (found by one forward pass of a blank image)."""
    shapes: dict[str, tuple[int, ...]] = {}
    modules = dict(model.named_modules())

    def record(name: str):
        def hook(module, args, output) -> None:  # must return None: a value replaces the output
            shapes.setdefault(name, tuple(output.shape) if isinstance(output, torch.Tensor) else ())
        return hook

    hooks = [modules[name].register_forward_hook(record(name))
             for name in feature_layers(model)[1:]]
    device = next(model.parameters()).device
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, image_size, image_size, device=device))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    fine = [n for n, s in shapes.items() if len(s) == 4 and min(s[2:]) >= min_side]
    if not fine:
        raise MechanismError(
            f"{_arch_name(model)} has no feature map of at least {min_side} x {min_side} cells at "
            f"{image_size} px; pass layer=<module> (feature_layers(model) lists them) or a larger "
            "image_size."
        )
    return fine[-1]


class _Contrast(nn.Module):
    """Logits minus the mean of the other classes' logits: for two classes, column 1 is
    logit_1 - logit_0, what the softmax decision depends on."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)
        k = logits.shape[1]
        return logits * (k / (k - 1)) - logits.sum(dim=1, keepdim=True) / (k - 1)


def activation_maps(model: nn.Module, prep, images: np.ndarray, *, method: str = "hirescam",
                    layer: str = AUTO, target: int = 1, contrast: bool = True,
                    batch_size: int = 32,
                    device: str | torch.device = "cpu") -> tuple[np.ndarray, str]:
    """Class activation maps of class ``target`` for uint8 images (N, H, W) at ``layer``,
    upsampled bilinearly to (H, W): ``method="hirescam"`` (ReLU of the channel sum of
    gradient x activation) or ``"gradcam"`` (ReLU of the activations weighted by their
    spatially averaged gradients). ``contrast=True`` explains the target's logit minus the
    other logits' mean (two classes: logit_1 - logit_0, the evidence for the target over the
    other class) rather than the target logit alone. Returns (maps float (N, H, W) >= 0, the
    layer used)."""
    from captum.attr import LayerAttribution, LayerGradCam, LayerGradientXActivation

    if method not in ATTRIBUTION_METHODS:
        raise MechanismError(f"method must be one of {list(ATTRIBUTION_METHODS)}; got {method!r}.")
    device = _device(device)
    images = np.asarray(images)
    if images.ndim != 3 or images.dtype != np.uint8 or not len(images):
        raise MechanismError(f"expected uint8 images (N, H, W) with N >= 1; got {images.dtype} "
                             f"{images.shape}.")
    model.eval().to(device)
    if layer == AUTO:
        layer = cam_layer(model, images.shape[1])
    module = _layer_module(model, layer)
    forward = _Contrast(model) if contrast else model
    explainer = (LayerGradCam if method == "gradcam" else LayerGradientXActivation)(forward, module)
    maps = []
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size]))
        x = prep(batch.to(device)).requires_grad_(True)
        if method == "gradcam":
            cam = explainer.attribute(x, target=int(target), relu_attributions=True)
        else:
            cam = explainer.attribute(x, target=int(target))
        if not isinstance(cam, torch.Tensor) or cam.ndim != 4:
            shape = tuple(cam.shape) if isinstance(cam, torch.Tensor) else type(cam).__name__
            raise MechanismError(
                f"{method} needs a layer with a spatial feature map (N, C, H, W); {layer!r} of "
                f"{_arch_name(model)} gives {shape}. Use layer='auto' or a block "
                "(feature_layers(model) lists them).")
        if method == "hirescam":
            cam = cam.sum(dim=1, keepdim=True).clamp_min(0)
        up = LayerAttribution.interpolate(cam, tuple(images.shape[1:]), interpolate_mode="bilinear")
        maps.append(up.detach()[:, 0].clamp_min(0).float().cpu())
    model.zero_grad(set_to_none=True)
    return torch.cat(maps).numpy(), layer


def mask_shares(maps: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Per image: attribution mass inside the mask / total mass (NaN where the map is all 0)."""
    maps = np.asarray(maps, dtype=np.float64)
    masks = np.asarray(masks, dtype=bool)
    total = maps.sum(axis=(1, 2))
    inside = (maps * masks).sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, inside / total, np.nan)


@dataclass
class AttributionMaps:
    """What :func:`attribution_maps` computed: images, masks, activation maps, per-image shares."""

    images: np.ndarray
    masks: np.ndarray
    maps: np.ndarray
    shares: np.ndarray
    image_ids: list[str]
    layer: str
    target: int
    method: str = "hirescam"
    contrast: bool = True
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, int))


def _require_mask(confounder) -> None:
    from .confounders.registry import masked_confounders

    if confounder is None or getattr(confounder, "kind", None) != "synthetic" or not confounder.has_mask:
        name = "none" if confounder is None else confounder.name
        why = ("a sampled confounder (an attribute) has no pixels"
               if getattr(confounder, "kind", None) == "sampled" else "it reports no pixel mask")
        raise MechanismError(
            f"attribution inside the confounder's mask was asked for confounder {name!r}, but "
            f"{why}. Attribution shares need a localised confounder: "
            f"{', '.join(masked_confounders())}. Set attribution off for {name!r} (grid: "
            "attribution: false, or leave it to mechanisms_for_run, which skips it)."
        )


def attribution_maps(model: nn.Module, prep, rows: pd.DataFrame, cache, confounder, *, seed: int,
                     root: str | os.PathLike | None = None, resize: str = "bilinear",
                     method: str = "hirescam", layer: str = AUTO, target: int = 1,
                     contrast: bool = True, max_images: int | None = None,
                     batch_size: int = 32, device: str | torch.device = "cpu") -> AttributionMaps:
    """Activation maps (:func:`activation_maps`) and pixel masks of the confounded ``rows`` (the run's o.o.d. rows, with a
    ``confounded`` column: for a synthetic confounder, its negatives), images made exactly as
    the run made them (``seed``, ``root``, ``resize`` of the run)."""
    from .data import ConfoundedImageDataset
    from .imaging import load_grey

    _require_mask(confounder)
    if "confounded" not in rows.columns:
        raise MechanismError("rows need a 'confounded' column (apply_prevalence / split_rows "
                             "give one); pass the run's o.o.d. rows (splits['ood']).")
    chosen = rows[rows["confounded"].astype(bool)].reset_index(drop=True)
    if chosen.empty:
        raise MechanismError(f"none of the {len(rows)} rows carries {confounder.name!r}: pass the "
                             "run's o.o.d. rows (splits['ood']), where every negative carries it.")
    if max_images is not None and len(chosen) > max_images:
        chosen = chosen.iloc[_pick(chosen["image_id"], max_images, seed, "attribution")]
        chosen = chosen.reset_index(drop=True)
    dataset = ConfoundedImageDataset(chosen, cache, confounder=confounder, seed=seed, root=root,
                                     resize=resize)
    images = np.stack([dataset.image(i) for i in range(len(chosen))])
    masks = []
    for i, image_id in enumerate(chosen["image_id"]):
        if confounder.resolution == "input":
            original = np.asarray(cache.array[dataset.positions[i]])
        else:
            if root is None or "path" not in chosen.columns:
                raise MechanismError(
                    f"{confounder.name!r} acts on the stored images (resolution "
                    f"{confounder.resolution!r}): pass root= (the manifest's root) and rows with "
                    "a 'path' column.")
            original = load_grey(Path(root) / chosen.at[i, "path"])
        masks.append(confounder.input_mask(original, seed, image_id, size=cache.size,
                                           resize=resize))
    masks = np.stack(masks)
    maps, layer = activation_maps(model, prep, images, method=method, layer=layer, target=target,
                                  contrast=contrast, batch_size=batch_size, device=device)
    return AttributionMaps(images=images, masks=masks, maps=maps, shares=mask_shares(maps, masks),
                           image_ids=chosen["image_id"].astype(str).tolist(), layer=layer,
                           target=int(target), method=method, contrast=contrast,
                           labels=chosen["label"].to_numpy(int))


def attribution_for_run(model: nn.Module, prep, rows: pd.DataFrame, cache, confounder, *,
                        seed: int, root: str | os.PathLike | None = None,
                        resize: str = "bilinear", method: str = "hirescam", layer: str = AUTO,
                        target: int = 1, contrast: bool = True, max_images: int | None = None,
                        n_boot: int = 1000, batch_size: int = 32,
                        device: str | torch.device = "cpu") -> dict[str, Any]:
    """Share of attribution mass inside the confounder's mask on the run's confounded o.o.d.
    images (``method``: "hirescam", the default, or "gradcam"; see the module's docstring).

    Call at the end of ``execute_run`` with the fine-tuned model, its ``prep``, the o.o.d.
    rows (``splits["ood"]``), the run's image cache and confounder, ``seed=config.seed``,
    ``root=manifest.root``, ``resize=config.resize``. ``target=1``: attribution of the positive
    class, the class the confounder went with in training (on an o.o.d. negative carrying it,
    a shortcut model finds its "positive" evidence in the marker). Returns:

    - ``attribution_share``: mean over images of (mass inside the mask / total mass), with a
      bootstrap interval over images (``_ci_low``/``_ci_high``) and the median;
    - ``mask_share``: mean share of the image area the mask covers (the chance level);
    - ``attribution_ratio``: attribution_share / mask_share (1: no more than chance);
    - ``attribution_n`` images used, ``attribution_n_empty`` of them with an all-zero map
      (left out of the means), the layer, target and method.

    Raises MechanismError for a confounder without a pixel mask (low-pass, noise, sex).
    """
    result = attribution_maps(model, prep, rows, cache, confounder, seed=seed, root=root,
                              resize=resize, method=method, layer=layer, target=target,
                              contrast=contrast, max_images=max_images, batch_size=batch_size,
                              device=device)
    return summarise_attribution(result, n_boot=n_boot, seed=seed)


def summarise_attribution(result: AttributionMaps, *, n_boot: int = 1000, seed: int = 0) -> dict:
    """The flat, JSON-ready summary of :func:`attribution_maps` (see :func:`attribution_for_run`)."""
    shares = result.shares
    ok = np.isfinite(shares)
    area = result.masks.reshape(len(result.masks), -1).mean(axis=1)
    mean_share = float(shares[ok].mean()) if ok.any() else float("nan")
    low = high = float("nan")
    if ok.sum() >= 2:
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), 3131]))
        draws = rng.integers(0, ok.sum(), size=(n_boot, ok.sum()))
        low, high = (float(v) for v in np.percentile(shares[ok][draws].mean(axis=1), [2.5, 97.5]))
    mask_share = float(area[ok].mean()) if ok.any() else float(area.mean())
    return {
        "attribution_share": mean_share,
        "attribution_share_ci_low": low,
        "attribution_share_ci_high": high,
        "attribution_share_median": float(np.median(shares[ok])) if ok.any() else float("nan"),
        "mask_share": mask_share,
        "attribution_ratio": mean_share / mask_share if mask_share > 0 else float("nan"),
        "attribution_n": int(ok.sum()),
        "attribution_n_empty": int((~ok).sum()),
        "attribution_layer": result.layer,
        "attribution_target": int(result.target),
        "attribution_method": result.method,
        "attribution_contrast": bool(result.contrast),
    }


# ------------------------------------------------------------------------------- runs


def save_run_model(model: nn.Module, prep, run_dir: str | os.PathLike, *, arch: str,
                   drop_rate: float, source: str | None = None) -> Path:
    """Keep a run's fine-tuned weights as ``run_dir/model.safetensors`` (atomically), with the
    architecture, head and preprocessing in the file's metadata, so :func:`load_run_model`
    rebuilds the model without the source's weights file."""
    from safetensors.torch import save_file

    from .io import atomic_path

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    head = _classifier(model)
    metadata = {
        "arch": str(arch), "drop_rate": str(float(drop_rate)),
        "num_classes": str(head.out_features if head is not None else 2),
        "preprocessing": json.dumps(prep.describe() if hasattr(prep, "describe") else {}),
        "source": str(source or ""), "format": "sm_utils fine-tuned run model, v1",
    }
    path = Path(run_dir) / MODEL_FILE
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=metadata)
    return path


def load_run_model(run_dir: str | os.PathLike) -> tuple[nn.Module, Any]:
    """(model, prep) of a run directory whose weights were kept (:func:`save_run_model`)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from .sources import Preprocessing, make_architecture

    path = Path(run_dir) / MODEL_FILE
    if not path.is_file():
        raise MechanismError(
            f"{run_dir} has no {MODEL_FILE}: runs keep their fine-tuned weights only when "
            "execute_run is asked to (grid `probe: true` / `attribution: true`, which call "
            "sm_utils.mechanisms.save_run_model); rerun the run with that option, or compute the "
            "mechanisms in the run with mechanisms_for_run()."
        )
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
    if "arch" not in meta or "preprocessing" not in meta:
        raise MechanismError(f"{path} was not written by save_run_model (no arch/preprocessing "
                             "metadata); rerun the run.")
    model = make_architecture(meta["arch"], num_classes=int(meta.get("num_classes", 2)),
                              drop_rate=float(meta.get("drop_rate", 0.0)))
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.eval(), Preprocessing.from_dict(json.loads(meta["preprocessing"]))


def mechanisms_for_run(model: nn.Module, prep, config, *, manifest=None, splits=None, cache=None,
                       confounder=None, device: str | torch.device = "cpu", probe: bool = True,
                       attribution: bool = True, cache_dir: str | os.PathLike | None = None,
                       probe_kwargs: dict | None = None,
                       attribution_kwargs: dict | None = None) -> dict[str, Any]:
    """Probe and attribution of a fine-tuned run's model, in the process that trained it.

    ``config`` is the run's RunConfig; ``manifest``, ``splits``, ``cache`` and ``confounder``
    (what execute_run already holds) are rebuilt from it when not given. The probe uses the
    fold's test rows (roles ``test*``: images the model never trained on) at the run's strength;
    attribution the o.o.d. rows. A confounder without a pixel mask (low-pass, sex) or
    ``confounder="none"`` gets NaN with the reason in ``attribution_skipped`` /
    ``probe_skipped`` rather than an error, so a grid can ask for both everywhere.

    Returns one flat dict of run-level columns, every key prefixed ``probe_`` or
    ``attribution_`` (plus ``mask_share``): ``probe_auc``, ``probe_auc_ci_low``,
    ``probe_auc_ci_high``, ``probe_n``, ..., ``attribution_share``, ``attribution_share_ci_low``,
    ``attribution_share_ci_high``, ``mask_share``, ``attribution_ratio``, ``attribution_layer``,
    ``attribution_method``, ... (see :func:`fit_probe` and :func:`attribution_for_run`).
    """
    from .data import ImageCache
    from .runs import get_run_confounder, split_rows

    manifest = _manifest(manifest if manifest is not None else config.manifest)
    confounder = confounder if confounder is not None else get_run_confounder(config)
    out: dict[str, Any] = {}
    if confounder is None:
        reason = "no confounder (confounder='none')"
        return {"probe_auc": float("nan"), "probe_skipped": reason,
                "attribution_share": float("nan"), "attribution_skipped": reason}
    if probe:
        tic = time.perf_counter()
        # images the model never trained on: the fold's test roles (test, test_ood, ...)
        roles = tuple(sorted(r for r in manifest.table[f"fold_{config.fold}"].unique()
                             if str(r).startswith("test")))
        kwargs = {"roles": roles, "seed": config.seed, "image_size": config.image_size,
                  "resize": config.resize, "fold": config.fold, "cache_dir": cache_dir,
                  "device": device, **(probe_kwargs or {})}
        result = probe_model(model, prep, manifest, confounder, **kwargs)
        # run-level columns: the run's own confounder and strength are already in its table
        out.update({k if k.startswith("probe_") else f"probe_{k}": v for k, v in result.items()
                    if k not in ("confounder", "strength")})
        out["probe_seconds"] = time.perf_counter() - tic
    if attribution:
        if confounder.kind != "synthetic" or not confounder.has_mask:
            out.update({"attribution_share": float("nan"), "mask_share": float("nan"),
                        "attribution_ratio": float("nan"),
                        "attribution_skipped": f"{confounder.name!r} has no pixel mask"})
        else:
            tic = time.perf_counter()
            splits = splits if splits is not None else split_rows(config, manifest, confounder)
            if cache is None:
                cache = ImageCache.for_manifest(manifest, config.image_size, cache_dir,
                                                resize=config.resize)
            if "ood" not in splits:
                raise MechanismError("the run has no o.o.d. test set; attribution needs one.")
            out.update(attribution_for_run(model, prep, splits["ood"], cache, confounder,
                                           seed=config.seed, root=manifest.root,
                                           resize=config.resize, device=device,
                                           **(attribution_kwargs or {})))
            out["attribution_seconds"] = time.perf_counter() - tic
    return out


def run_mechanisms(run_dir: str | os.PathLike, *, probe: bool = True, attribution: bool = True,
                   write: bool = True, cache_dir: str | os.PathLike | None = None,
                   device: str = "cpu", **kwargs) -> dict[str, Any]:
    """:func:`mechanisms_for_run` for a finished run directory (config.json, metrics.json and
    the kept ``model.safetensors``); writes ``mechanisms.json`` there when ``write``."""
    from .io import atomic_write_json
    from .runs import METRICS_FILE, RunConfig
    from .training import configure_device

    run_dir = Path(run_dir)
    if not (run_dir / METRICS_FILE).is_file():
        raise MechanismError(f"{run_dir} has no {METRICS_FILE}: the run is incomplete or never ran.")
    resolved = json.loads((run_dir / "config.json").read_text())
    config = RunConfig.from_dict(resolved["config"])
    model, prep = load_run_model(run_dir)
    with configure_device(_device(device)):
        out = mechanisms_for_run(model, prep, config, device=device, probe=probe,
                                 attribution=attribution, cache_dir=cache_dir, **kwargs)
    out = {"run_id": resolved.get("run_id"), **out}
    if write:
        from .evaluation import json_safe

        atomic_write_json(run_dir / MECHANISMS_FILE, json_safe(out))
    return out


# ------------------------------------------------------------------------------- fine-tuning


@dataclass
class FineTuned:
    """A fine-tuned model with everything its run used (see :func:`fine_tune`)."""

    model: nn.Module
    prep: Any
    config: Any
    manifest: Any
    splits: dict[str, pd.DataFrame]
    cache: Any
    confounder: Any
    history: pd.DataFrame
    test_auc: dict[str, float]
    seconds: float


def fine_tune(config, *, cache_dir: str | os.PathLike | None = None, threads: int | None = None,
              progress: bool = False) -> FineTuned:
    """Fine-tune as :func:`sm_utils.runs.execute_run` does (:func:`sm_utils.runs.train_run`:
    same splits, seeds, head init and training; no run directory written) and keep the model
    in memory, with its test AUCs.

    For notebooks that need the model itself (attribution) while runs do not keep weights.
    """
    from .evaluation import binary_auc
    from .runs import train_run

    tic = time.perf_counter()
    with train_run(config, progress=progress, cache_dir=cache_dir, threads=threads) as run:
        test_auc = {}
        for name in run.test_sets:
            probs, labels = run.predict(name)
            test_auc[name] = binary_auc(labels, probs[:, 1])
    return FineTuned(model=run.model.eval(), prep=run.prep, config=config, manifest=run.manifest,
                     splits=run.splits, cache=run.cache, confounder=run.confounder,
                     history=run.result.history, test_auc=test_auc,
                     seconds=time.perf_counter() - tic)


def _attribution_task(config: dict, threads: int, methods: tuple[str, ...], n_boot: int,
                      cache_dir: str | None) -> tuple[dict[str, Any], AttributionMaps]:
    """One fine-tuning and its attribution summaries (top level: runs in worker processes)."""
    from .runs import RunConfig

    tic = time.perf_counter()
    torch.set_num_threads(int(threads))
    run = fine_tune(RunConfig.from_dict(config), cache_dir=cache_dir, threads=threads)
    args = {"seed": run.config.seed, "root": run.manifest.root, "resize": run.config.resize}
    row: dict[str, Any] = {"source": run.config.source, "confounder": run.config.confounder,
                           "p": run.config.p, "fold": run.config.fold,
                           **{f"{name}_auc": auc for name, auc in run.test_auc.items()}}
    kept = None
    for method in methods:
        maps = attribution_maps(run.model, run.prep, run.splits["ood"], run.cache,
                                run.confounder, method=method, **args)
        summary = summarise_attribution(maps, n_boot=n_boot, seed=run.config.seed)
        if kept is None:
            kept = maps
            row.update(summary)
        else:
            row.update({f"{method}_share": summary["attribution_share"],
                        f"{method}_ratio": summary["attribution_ratio"]})
    row["train_seconds"] = run.seconds
    row["seconds"] = time.perf_counter() - tic
    return row, kept


def attribution_sweep(configs: Sequence[Any], *, workers: int = 1, threads: int = 1,
                      methods: Sequence[str] = ("hirescam", "gradcam"), n_boot: int = 1000,
                      cache_dir: str | os.PathLike | None = None,
                      ) -> tuple[pd.DataFrame, list[AttributionMaps]]:
    """Fine-tune each RunConfig (:func:`fine_tune`) and measure attribution on its o.o.d.
    images with each method (the first one's summary in full, the others' share and ratio as
    ``<method>_share`` / ``<method>_ratio``); ``workers`` > 1 runs them in that many spawned
    processes with ``threads`` each (as the demo grid does: one per core, one thread each), so
    the numbers do not depend on ``workers``. Returns the table (in the order of ``configs``)
    and the first method's maps of each."""
    from dataclasses import asdict

    tasks = [(asdict(c), int(threads), tuple(methods), int(n_boot),
              None if cache_dir is None else str(cache_dir)) for c in configs]
    if workers <= 1 or len(tasks) <= 1:
        results = [_attribution_task(*task) for task in tasks]
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=min(int(workers), len(tasks)),
                                 mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(_attribution_task, *zip(*tasks)))
    return pd.DataFrame([row for row, _ in results]), [maps for _, maps in results]


# ------------------------------------------------------------------------------- analysis


def _keys(table: pd.DataFrame) -> list[str]:
    """Grouping keys beside confounder and source that vary in the table (dataset, arch)."""
    return [c for c in ("dataset", "arch") if c in table.columns and table[c].nunique() > 1]


def ood_drop(table: pd.DataFrame) -> pd.DataFrame:
    """Per confounder and source: the o.o.d. AUC drop = (mean over folds of the clean-test AUC
    at p = 0) - (mean over folds of the o.o.d. AUC at the confounder's largest p, 1 in the demo).

    The clean AUC at p = 0 is what the model achieves without any shortcut on offer; the o.o.d.
    AUC at the largest p is what is left when the shortcut it learnt is reversed.
    """
    needed = {"confounder", "source", "p", "test_set", "auc"}
    missing = needed - set(table.columns)
    if missing:
        raise MechanismError(f"the results table lacks column(s) {sorted(missing)}; it needs "
                             f"{sorted(needed)} (analysis.collect_results / load_results).")
    keys = ["confounder", "source", *_keys(table)]
    rows = []
    for key, part in table.groupby(keys, sort=True):
        p_max = float(part["p"].max())
        clean = part[(part["test_set"] == "clean") & (part["p"] == 0)]["auc"]
        ood = part[(part["test_set"] == "ood") & (part["p"] == p_max)]["auc"]
        if clean.empty or ood.empty or p_max == 0:
            raise MechanismError(
                f"{dict(zip(keys, key))}: the o.o.d. drop needs clean-test AUCs at p = 0 and "
                f"o.o.d. AUCs at a p > 0; found p {sorted(part['p'].unique())} and test sets "
                f"{sorted(part['test_set'].unique())}.")
        rows.append({**dict(zip(keys, key)), "clean_auc_p0": float(clean.mean()),
                     "p_max": p_max, "ood_auc_p_max": float(ood.mean()),
                     "ood_drop": float(clean.mean() - ood.mean()),
                     "n_folds": int(min(len(clean), len(ood)))})
    return pd.DataFrame(rows)


def spearman_permutation(x, y, *, n_permutations: int = 9999, seed: int = 0) -> dict[str, Any]:
    """Spearman's rho of (x, y) and its two-sided permutation p (exact over all n! orderings
    when n! <= n_permutations, else Monte Carlo with the +1 correction), and the smallest p
    the test can give with n points (2 / n! exactly: with 3 sources, 1/3)."""
    from scipy.stats import rankdata

    x, y = np.asarray(x, float), np.asarray(y, float)
    n = len(x)
    out = {"n_points": n, "spearman_rho": float("nan"), "p_value": float("nan"),
           "p_exact": None, "min_p_value": float("nan")}
    if n < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return out
    rx, ry = rankdata(x), rankdata(y)

    def rho(a, b):
        a, b = a - a.mean(), b - b.mean()
        return float((a * b).sum() / math.sqrt((a * a).sum() * (b * b).sum()))

    observed = rho(rx, ry)
    exact = math.factorial(n) <= n_permutations
    if exact:
        null = np.array([rho(rx, ry[list(order)]) for order in itertools.permutations(range(n))])
        p = float(np.mean(np.abs(null) >= abs(observed) - 1e-12))
        smallest = float(np.mean(np.abs(null) >= np.abs(null).max() - 1e-12))
    else:
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), 5150]))
        null = np.array([rho(rx, rng.permutation(ry)) for _ in range(n_permutations)])
        p = float((np.sum(np.abs(null) >= abs(observed) - 1e-12) + 1) / (n_permutations + 1))
        smallest = 1.0 / (n_permutations + 1)
    out.update(spearman_rho=observed, p_value=p, p_exact=exact, min_p_value=smallest)
    return out


def encodedness_points(table: pd.DataFrame, probes: pd.DataFrame | None = None, *,
                       encodedness: str = "source_probe_auc") -> pd.DataFrame:
    """One row per (confounder, source): pre-fine-tuning encodedness beside the o.o.d. drop.

    ``probes``: a table with confounder, source and ``probe_auc`` (e.g. :func:`probe_table` at
    strength 1); without it, ``table`` must carry the column ``encodedness`` (the grid's
    ``source_probe_auc``, constant per source and confounder).
    """
    drops = ood_drop(table)
    keys = ["confounder", "source", *_keys(table)]
    if probes is None:
        if encodedness not in table.columns:
            raise MechanismError(
                f"the results table has no column {encodedness!r}: run the grid with "
                "`probe: true` (it adds the pre-fine-tuning probe AUC of each source) or pass "
                "probes=probe_table(...).")
        enc = table.groupby(keys, sort=True)[encodedness].mean().rename("encodedness")
    else:
        missing = {"confounder", "source", "probe_auc"} - set(probes.columns)
        if missing:
            raise MechanismError(f"probes lacks column(s) {sorted(missing)}.")
        chosen = probes
        if "strength" in probes.columns and probes["strength"].notna().any():
            # the strength the grid trains with (1 unless the table says otherwise)
            trained = table.groupby("confounder")["strength"].first() if "strength" in table else {}
            keep = probes.apply(lambda r: pd.isna(r["strength"]) or math.isclose(
                r["strength"], float(trained.get(r["confounder"], 1.0))), axis=1)
            chosen = probes[keep]
        on = [k for k in keys if k in chosen.columns]
        enc = chosen.groupby(on, sort=True)["probe_auc"].mean().rename("encodedness")
        keys = on
    points = drops.merge(enc.reset_index(), on=keys, how="inner")
    if points.empty:
        raise MechanismError("no (confounder, source) pair is in both the results and the probes.")
    return points


def encodedness_vs_drop(table: pd.DataFrame, probes: pd.DataFrame | None = None, *,
                        encodedness: str = "source_probe_auc", n_permutations: int = 9999,
                        seed: int = 0, decimals: int = 3) -> pd.DataFrame:
    """Per confounder: Spearman's rho between the sources' pre-fine-tuning encodedness (probe
    AUC) and their o.o.d. AUC drop (:func:`ood_drop`), with a two-sided permutation p over the
    sources (exact for few sources: with 3, no p below 1/3 is possible, see ``min_p_value``).
    Positive rho: the more decodable the confounder is before fine-tuning, the larger the drop.
    Probe AUCs equal to ``decimals`` places are ties (differences of 0.0001 between probes
    saturated at 1 are not a ranking); when all are equal, rho and p are NaN.
    """
    points = encodedness_points(table, probes, encodedness=encodedness)
    rows = []
    for confounder, part in points.groupby("confounder", sort=True):
        stats = spearman_permutation(part["encodedness"].round(decimals), part["ood_drop"],
                                     n_permutations=n_permutations, seed=seed)
        rows.append({"confounder": confounder, **stats,
                     "sources": ", ".join(part["source"].astype(str))})
    return pd.DataFrame(rows)


def grid_probes(runs_dir: str | os.PathLike, dataset: str | None = None) -> pd.DataFrame:
    """The pre-fine-tuning probes a grid with ``probe: true`` wrote (``source_probes.csv``), in
    the columns of :func:`probe_table` (source, confounder, strength, probe_auc, ...; means
    over the grid's seeds, their number in ``n_probes``)."""
    from .analysis import SOURCE_PROBES_FILE

    path = Path(runs_dir) / SOURCE_PROBES_FILE
    if not path.exists():
        raise MechanismError(f"{path} not found: it is written by a grid run with `probe: true` "
                             "(sm run GRID); run the grid with it, or leave runs_dir empty to "
                             "probe here.")
    probes = pd.read_csv(path).rename(columns=lambda c: c.removeprefix("source_"))
    if dataset is not None:
        probes = probes[probes["dataset"] == dataset]
    # one row per source, confounder and strength: the mean over the grid's seeds (and archs)
    values = ["probe_auc", "probe_auc_ci_low", "probe_auc_ci_high"]
    return (probes.groupby(["source", "confounder", "strength"], sort=False, dropna=False)
            .agg(**{c: (c, "mean") for c in values}, n_probes=("probe_auc", "count"))
            .reset_index())


# run-level attribution columns that grid_attribution averages over folds
MEAN_ATTRIBUTION_COLUMNS = ["attribution_share", "attribution_share_ci_low",
                            "attribution_share_ci_high", "mask_share", "attribution_ratio"]


def grid_attribution(table: pd.DataFrame, confounder: str | None = None) -> pd.DataFrame:
    """Attribution shares of a grid with ``attribution: true``, one row per (source, p) of
    ``confounder`` (default: the first confounder with attributions), mean over the folds (and
    seeds) beside the mean clean and o.o.d. AUC, in the columns of :func:`attribution_sweep`."""
    if "attribution_share" not in table.columns or table["attribution_share"].isna().all():
        raise MechanismError("the results table has no attribution_share: run the grid with "
                             "`attribution: true` and a confounder with a pixel mask (tag, "
                             "marker, support_device).")
    runs = table.dropna(subset=["attribution_share"])
    names = list(dict.fromkeys(runs["confounder"]))
    confounder = confounder if confounder in names else names[0]
    runs = table[table["confounder"] == confounder]
    auc = runs.pivot_table(index="run_id", columns="test_set", values="auc")
    auc = auc.rename(columns=lambda test_set: f"{test_set}_auc")
    per_run = (runs.drop_duplicates("run_id").set_index("run_id")
               [["source", "p", *MEAN_ATTRIBUTION_COLUMNS]]
               .join(auc[[c for c in ("clean_auc", "ood_auc") if c in auc.columns]]))
    values = [c for c in per_run.columns if c not in ("source", "p")]
    out = (per_run.groupby(["source", "p"], sort=False)
           .agg(**{c: (c, "mean") for c in values}, n_runs=("attribution_share", "count"))
           .reset_index().sort_values(["source", "p"], ignore_index=True))
    return out.assign(confounder=confounder)


# ------------------------------------------------------------------------------- figures


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
