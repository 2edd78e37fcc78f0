"""Mechanisms of one fine-tuned run: measured in the process that trained it (the
hook :func:`sm_utils.runs.execute_run` is given), or later from its kept weights."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..paths import MECHANISMS_FILE, MODEL_FILE
from .attribution import attribution_for_run
from .features import MechanismError, _classifier, _device
from .probe import probe_model
from .probe_sets import _manifest


def save_run_model(model: nn.Module, prep, run_dir: str | os.PathLike, *, arch: str,
                   drop_rate: float, source: str | None = None) -> Path:
    """Keep a run's fine-tuned weights as ``run_dir/model.safetensors`` (atomically), with the
    architecture, head and preprocessing in the file's metadata, so :func:`load_run_model`
    rebuilds the model without the source's weights file. A foundation source's model (a ViT,
    an open_clip tower: built by its source, not by ``make_architecture``) also records what
    rebuilds it (``FoundationClassifier.architecture()``: kind, architecture, input size and
    the backbone's config)."""
    from safetensors.torch import save_file

    from ..io import atomic_path
    from ..sources.foundation import FoundationClassifier

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    head = _classifier(model)
    metadata = {
        "arch": str(arch), "drop_rate": str(float(drop_rate)),
        "num_classes": str(head.out_features if head is not None else 2),
        "preprocessing": json.dumps(prep.describe() if hasattr(prep, "describe") else {}),
        "source": str(source or ""), "format": "sm_utils fine-tuned run model, v1",
    }
    if isinstance(model, FoundationClassifier):
        metadata["foundation"] = json.dumps(model.architecture())
    path = Path(run_dir) / MODEL_FILE
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=metadata)
    return path


def load_run_model(run_dir: str | os.PathLike) -> tuple[nn.Module, Any]:
    """(model, prep) of a run directory whose weights were kept (:func:`save_run_model`)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from ..sources import Preprocessing, make_architecture, rebuild_foundation

    path = Path(run_dir) / MODEL_FILE
    if not path.is_file():
        raise MechanismError(
            f"{run_dir} has no {MODEL_FILE}: a run does not keep its fine-tuned weights "
            "unless its code saves them (sm_utils.mechanisms.save_run_model inside "
            "sm_utils.runs.train_run). Measure the mechanisms in the run instead: grid "
            "`probe: true` / `attribution: true` (notebook 03's probe/attribution), which call "
            "mechanisms_for_run while the model is in memory."
        )
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
    if "arch" not in meta or "preprocessing" not in meta:
        raise MechanismError(f"{path} was not written by save_run_model (no arch/preprocessing "
                             "metadata); rerun the run.")
    head = {"num_classes": int(meta.get("num_classes", 2)),
            "drop_rate": float(meta.get("drop_rate", 0.0))}
    if "foundation" in meta:  # built by its source: rebuilt from the recorded architecture
        model = rebuild_foundation(json.loads(meta["foundation"]), **head)
    else:
        model = make_architecture(meta["arch"], **head)
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
    from ..data import ImageCache
    from ..runs import get_run_confounder, split_rows

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


def measure_run(run, config) -> dict[str, Any]:
    """The hook :func:`sm_utils.runs.execute_run` is given (``mechanisms=measure_run``): probe
    and attribution of the fine-tuned model as ``config.probe`` / ``config.attribution`` ask,
    on the data the run holds (``run``: :class:`sm_utils.runs.TrainedRun`)."""
    return mechanisms_for_run(
        run.model, run.prep, config, manifest=run.manifest, splits=run.splits, cache=run.cache,
        confounder=run.confounder, device=run.device, probe=config.probe,
        attribution=config.attribution, cache_dir=run.cache.path.parent)


def run_mechanisms(run_dir: str | os.PathLike, *, probe: bool = True, attribution: bool = True,
                   write: bool = True, cache_dir: str | os.PathLike | None = None,
                   device: str = "cpu", **kwargs) -> dict[str, Any]:
    """:func:`mechanisms_for_run` for a finished run directory (config.json, metrics.json and
    the kept ``model.safetensors``); writes ``mechanisms.json`` there when ``write``."""
    from ..io import atomic_write_json
    from ..runs import METRICS_FILE, RunConfig
    from ..training import configure_device

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
        from ..evaluation import json_safe

        atomic_write_json(run_dir / MECHANISMS_FILE, json_safe(out))
    return out
