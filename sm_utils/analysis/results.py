"""The results table: every complete run directory of a grid -> one tidy row per (run, test
set), with the grid axes and both metrics; saved and read back as CSV."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..identity import DEFAULT_MODE
from ..io import atomic_path, atomic_write_csv
from ..paths import CELLS_FILE, METRICS_FILE, SOURCE_PROBES_FILE

AXES = ["dataset", "confounder", "strength", "arch", "seed", "p", "source", "fold"]
# A condition: everything but the source and the fold (folds are the replicates).
CONDITION = ["dataset", "confounder", "strength", "arch", "seed", "test_set", "p"]
METRIC_COLUMNS = ["auc", "auc_ci_low", "auc_ci_high", "micro_auc", "keras_auc", "n",
                  "n_patients", "n_pos", "n_confounded"]
RUN_COLUMNS = ["best_epoch", "epochs_run", "train_seconds", "eval_seconds"]
# Where a run trained (sm_utils.training.ran_on): a condition's runs must agree on these
RAN_ON_COLUMNS = ["device", "precision"]
# Run-level columns of a grid with `probe: true` / `attribution: true` (sm_utils.mechanisms)
MECHANISM_COLUMNS = ["probe_auc", "probe_auc_ci_low", "probe_auc_ci_high", "attribution_share",
                     "attribution_share_ci_low", "attribution_share_ci_high", "mask_share",
                     "attribution_ratio"]
SOURCE_PROBE_COLUMNS = ["source_probe_auc", "source_probe_auc_ci_low", "source_probe_auc_ci_high"]
TEST_SET_ORDER = {"ood": 0, "iid": 1, "clean": 2}
# A linear probe's arm is its source's name with this suffix: an arm of its own in every table,
# figure and claim (the source fine-tuned is another arm); results.csv's ``mode`` column says it.
LINEAR_PROBE_SUFFIX = ":linear_probe"
# ``arch`` where each source ran one architecture of its own (ResNet50s beside ViTs): the
# architecture is part of the arm, in ``source_arch``, and the sources are compared.
PER_SOURCE_ARCH = "per source"
# metric -> its mean, interval columns in summaries and its name in words
METRICS = {"auc": ("mean_auc", "ci_low", "ci_high", "binary AUC"),
           "micro_auc": ("mean_micro_auc", "micro_ci_low", "micro_ci_high", "micro-AUC"),
           "keras_auc": ("mean_keras_auc", "keras_ci_low", "keras_ci_high", "Keras AUC")}
# The paper's metric (its reported means, its test): Keras' AUC as its code computed it
# (sm_utils.evaluation.keras_auc); micro_auc is the same average without Keras' thresholds.
PAPER_METRIC = "keras_auc"
PAPER_METRICS = ("keras_auc", "micro_auc")


class AnalysisError(ValueError):
    """Results that cannot be analysed as asked."""


def _dataset_names(runs_dir: Path) -> dict[str, str]:
    index = runs_dir / CELLS_FILE
    if not index.exists():
        return {}
    table = pd.read_csv(index, dtype={"run_id": str})
    return dict(zip(table["run_id"], table["dataset"]))


def _read_metrics(run_dirs: Iterable[Path]) -> list[dict[str, Any]]:
    out = []
    for run_dir in run_dirs:
        with open(run_dir / METRICS_FILE) as fh:
            metrics = json.load(fh)
        _add_keras_auc(metrics, run_dir)
        _add_ran_on(metrics, run_dir)
        out.append(metrics)
    return out


def _add_ran_on(metrics: dict[str, Any], run_dir: Path) -> None:
    """Runs made before metrics.json carried ``ran_on`` get it from their config.json."""
    if "ran_on" in metrics:
        return
    from ..training import ran_on

    config = run_dir / "config.json"
    settings = json.loads(config.read_text()).get("device") if config.exists() else None
    metrics["ran_on"] = ran_on(settings or {})


def _add_keras_auc(metrics: dict[str, Any], run_dir: Path) -> None:
    """Runs made before metrics.json carried ``keras_auc`` get it from their predictions."""
    missing = [t for t, v in metrics["test_sets"].items() if "keras_auc" not in v]
    predictions = run_dir / "predictions.csv"
    if not missing or not predictions.exists():
        return
    from ..evaluation import keras_auc

    frame = pd.read_csv(predictions)
    columns = ["prob_0", "prob_1"] if {"prob_0", "prob_1"} <= set(frame) else "score"
    if not {"test_set", "label"} <= set(frame) or (columns == "score" and "score" not in frame):
        return  # not the predictions of a run (docs/RUNS.md): nothing to compute it from
    for test_set, part in frame.groupby("test_set"):
        if test_set in missing:
            metrics["test_sets"][test_set]["keras_auc"] = keras_auc(
                part["label"].to_numpy(), part[columns].to_numpy())


def collect_results(runs_dir: str | os.PathLike, with_groups: bool = False):
    """One row per (run, test set) for every complete run directory under ``runs_dir``.

    When the grid's ``cells.csv`` is there, only its cells count (a run left in the folder by
    other means, e.g. notebook 03 run by hand, is not part of the grid) and it names each run's
    dataset; without it, the dataset is the folder holding the run's manifest. With
    ``with_groups`` also returns the per-group AUC table (one row per run, test set and group).
    """
    runs_dir = Path(runs_dir)
    run_dirs = sorted(p.parent for p in runs_dir.glob(f"*/{METRICS_FILE}"))
    datasets = _dataset_names(runs_dir)
    if datasets:
        run_dirs = [d for d in run_dirs if d.name in datasets]
    rows, group_rows = [], []
    from ..metrics import list_metrics

    own_metrics = list_metrics()  # registered metrics (plugins): from each run's predictions
    for run_dir, metrics in zip(run_dirs, _read_metrics(run_dirs)):
        config = metrics["config"]
        extra = _own_metrics(run_dir) if own_metrics else {}
        run_id = metrics["run_id"]
        base = {
            "run_id": run_id,
            "dataset": datasets.get(run_id, Path(config["manifest"]).parent.name),
            "confounder": config["confounder"],
            "strength": float(config["strength"]),
            "arch": config.get("arch") or "default",
            "seed": int(config["seed"]),
            "p": float(config["p"]),
            "source": arm_name(config["source"], config.get("mode", DEFAULT_MODE)),
            "fold": int(config["fold"]),
            "mode": config.get("mode", DEFAULT_MODE),
            "_source": config["source"],
        }
        mechanisms = {k: v for k, v in (metrics.get("mechanisms") or {}).items()
                      if k in MECHANISM_COLUMNS}
        for test_set, values in metrics["test_sets"].items():
            row = {**base, "test_set": test_set}
            row.update({k: values.get(k, np.nan) for k in METRIC_COLUMNS})
            row.update({k: metrics.get(k, np.nan) for k in RUN_COLUMNS})
            row.update({k: metrics["ran_on"][k] for k in RAN_ON_COLUMNS})
            row.update(mechanisms)  # run-level: the same on each of the run's test sets
            row.update(extra.get(test_set, {}))
            rows.append(row)
            for group, auc in (values.get("group_auc") or {}).items():
                group_rows.append({**base, "test_set": test_set, "group": group, "auc": auc})
    columns = ["run_id", *AXES, "test_set", *METRIC_COLUMNS, *RUN_COLUMNS, *RAN_ON_COLUMNS]
    # the mode only where some run is not fine-tuned: earlier tables keep their columns
    modes = ["mode"] if any(r["mode"] != DEFAULT_MODE for r in rows) else []
    present = [c for c in [*MECHANISM_COLUMNS, *own_metrics] if any(c in r for r in rows)]
    table = _sorted(pd.DataFrame(rows, columns=[*columns, *modes, *present, "_source"]))
    probes = runs_dir / SOURCE_PROBES_FILE
    if probes.exists() and not table.empty:  # the grid's probe of each source before fine-tuning
        keys = ["dataset", "_source", "arch", "seed", "confounder", "strength"]
        source = (pd.read_csv(probes).rename(columns={"source": "_source"})
                  .drop_duplicates(keys, keep="last"))
        source["arch"] = source["arch"].fillna("default")
        table = table.merge(source[[*keys, *SOURCE_PROBE_COLUMNS]], on=keys, how="left")
    table = arch_per_source(table.drop(columns="_source"))
    if not with_groups:
        return table
    groups = _sorted(pd.DataFrame(group_rows, columns=["run_id", *AXES, "test_set", "group", "auc"]))
    return table, groups


def arm_name(source: str, mode: str = DEFAULT_MODE) -> str:
    """The name of a source's arm in the results: the source fine-tuned, or with
    :data:`LINEAR_PROBE_SUFFIX` its linear probe."""
    return source if mode == DEFAULT_MODE else f"{source}{LINEAR_PROBE_SUFFIX}"


def arch_per_source(table: pd.DataFrame) -> pd.DataFrame:
    """Where, within each dataset, every source ran one architecture and they are not all the
    same (e.g. ImageNet ResNet50 beside DINOv2 ViTs), the architecture belongs to the source:
    it moves to ``source_arch`` and ``arch`` reads :data:`PER_SOURCE_ARCH`, so the sources
    share their conditions and are compared. A grid with one architecture, or one that runs
    every source with several, keeps ``arch`` as its axis."""
    if table.empty or "source_arch" in table.columns:
        return table
    per_source = table.groupby(["dataset", "source"])["arch"].nunique()
    several = table.groupby("dataset")["arch"].nunique()
    if (per_source > 1).any() or not (several > 1).any():
        return table
    position = table.columns.get_loc("arch")
    out = table.rename(columns={"arch": "source_arch"})
    out.insert(position, "arch", PER_SOURCE_ARCH)
    return out


def _own_metrics(run_dir: Path) -> dict[str, dict[str, float]]:
    """The registered metrics (:mod:`sm_utils.metrics`) of each test set of a run, from its
    predictions.csv (none without it)."""
    from ..metrics import compute_metrics

    path = run_dir / "predictions.csv"
    if not path.exists():
        return {}
    frame = pd.read_csv(path)
    if not {"test_set", "label", "score"} <= set(frame):
        return {}
    return {test_set: compute_metrics(part["label"].to_numpy(), part["score"].to_numpy())
            for test_set, part in frame.groupby("test_set")}


def check_one_device_per_condition(table: pd.DataFrame) -> None:
    """Raise AnalysisError when the runs of one condition (all its sources and folds) trained
    on different devices or in different precisions (a grid begun on the CPU and resumed on a
    GPU: fp32 and bf16 results are not replicates of each other). Tables without the columns
    (made before they existed) pass."""
    if table.empty or not set(RAN_ON_COLUMNS) <= set(table.columns):
        return
    condition = [c for c in CONDITION if c != "test_set"]
    ran_on = table[RAN_ON_COLUMNS].astype(str).agg("/".join, axis=1)
    for key, part in table.assign(_ran_on=ran_on).groupby(condition, dropna=False):
        if part["_ran_on"].nunique() < 2:
            continue
        counts = part.drop_duplicates("run_id")["_ran_on"].value_counts()
        minority = part[part["_ran_on"] != counts.index[0]].drop_duplicates("run_id")
        what = ", ".join(f"{n} run(s) on {setting}" for setting, n in counts.items())
        shown = ", ".join(minority["run_id"].head(8)) + (" ..." if len(minority) > 8 else "")
        raise AnalysisError(
            f"condition {dict(zip(condition, key))} mixes devices/precisions (device/precision): "
            f"{what}. Their AUCs are not replicates of one another. Delete the run directories "
            f"of the {len(minority)} run(s) on the other setting ({shown}) and run the grid "
            "again on one device (run.device, run.precision), or analyse each part separately.")


def _sorted(table: pd.DataFrame) -> pd.DataFrame:
    if table.empty:
        return table.reset_index(drop=True)
    order = table["test_set"].map(TEST_SET_ORDER).fillna(len(TEST_SET_ORDER))
    keys = ["dataset", "confounder", "strength", "arch", "seed", "p", "source", "fold"]
    extra = ["group"] if "group" in table.columns else []
    return (table.assign(_order=order)
            .sort_values([*keys, "_order", "test_set", *extra], kind="mergesort")
            .drop(columns="_order").reset_index(drop=True))


def save_results(table: pd.DataFrame, path: str | os.PathLike) -> list[Path]:
    """Write ``path`` (.csv) and, when pyarrow is importable, the same table as .parquet."""
    path = Path(path)
    written = [atomic_write_csv(path.with_suffix(".csv"), table)]
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        return written
    with atomic_path(path.with_suffix(".parquet")) as tmp:
        table.to_parquet(tmp, index=False)
    written.append(path.with_suffix(".parquet"))
    return written


def load_results(path: str | os.PathLike):
    """A results table saved by :func:`save_results` and its per-group table if beside it."""
    path = Path(path)
    table = pd.read_csv(path, dtype={"run_id": str})
    table["arch"] = table["arch"].fillna("default")
    groups_path = path.with_name(path.stem + "_groups.csv")
    columns = ["run_id", *AXES, "test_set", "group", "auc"]
    groups = pd.read_csv(groups_path, dtype={"run_id": str}) if groups_path.exists() else pd.DataFrame(columns=columns)
    return table, groups
