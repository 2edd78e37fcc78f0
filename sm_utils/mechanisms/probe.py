"""The encodedness probe: a patient-grouped, cross-validated logistic regression on
features, reported as AUC with a patient-bootstrap interval; for a model, a source, a sweep."""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..evaluation import bootstrap_auc_ci
from .features import PENULTIMATE, MechanismError, extract_features
from .probe_sets import probe_set

DEFAULT_STRENGTHS = (0.0, 0.25, 0.5, 1.0)


def grouped_bootstrap_auc(y, scores, groups, *, n_boot: int = 1000, level: float = 0.95,
                          seed: int = 0) -> tuple[float, float]:
    """Percentile interval of the AUC, resampling groups (patients) with replacement
    (:func:`sm_utils.evaluation.bootstrap_auc_ci`): every image of a drawn patient comes along
    (the images of a patient are not independent, nor are an image's clean and confounded
    versions). Draws without both classes are skipped."""
    return bootstrap_auc_ci(y, scores, groups=groups, n_boot=n_boot, level=level, seed=seed,
                            stream=1212)


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
    from ..sources import check_source_arch, create_model

    torch.manual_seed(int(init_seed))
    model, prep = create_model(source, arch=arch, weights=weights, num_classes=2, drop_rate=0.0,
                               image_size=image_size)
    out = probe_model(model, prep, manifest, confounder, image_size=image_size, **kwargs)
    return {"source": source, "arch": check_source_arch(source, arch), **out}


def probe_sweep(model: nn.Module, prep, manifest, confounder: str,
                strengths: Iterable[float] = DEFAULT_STRENGTHS, **kwargs) -> pd.DataFrame:
    """:func:`probe_model` at each strength (a sampled confounder, which has none: one row)."""
    from ..confounders import get_confounder

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
    from ..sources import check_source_arch, create_model

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
