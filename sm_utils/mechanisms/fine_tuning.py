"""Fine-tuning kept in memory (as a run, without a run directory) and attribution
sweeps over such models, in parallel worker processes."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from torch import nn

from .attribution import AttributionMaps, attribution_maps, summarise_attribution


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
    from ..evaluation import binary_auc
    from ..runs import train_run

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
    from ..runs import RunConfig

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
