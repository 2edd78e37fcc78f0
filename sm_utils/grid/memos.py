"""Preparation: the memoised outputs of slow confounders on CT slices, for every cell at once.

``ct_noise`` (``memoise=True``) reconstructs every CT row of every run, confounded or not; a run
that finds no memo computes it one slice at a time, and runs started together compute the same
baseline slices side by side. Before any cell starts, :func:`prefill` lists every cell of the
grid still to run whose confounder is memoised and acts on CT slices in HU, and a child process
(:func:`fill_memos`: the grid process itself loads no torch and holds no GPU memory) computes
each missing memo once, batched: the slices of one shape and one confounder together
(:func:`sm_utils.confounders.paper.ct_noise_hu_batch`), backend "torch" on the grid's device,
the CPU backends on every available core (:func:`sm_utils.progress.parallel_map`),
written where and as the run would have written them (``Confounder.memo_path``; the same key,
so the same bits as a run computing it itself on the same backend and device). A memo that a
run finds is read back, never recomputed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .errors import GridError

BATCH = 8  # slices per projection batch


def memoised_hu_confounder(params: dict[str, Any]) -> bool:
    """Whether a cell's confounder is memoised and acts on CT slices in HU (no torch needed)."""
    from ..confounders import get_confounder

    if params.get("confounder") in (None, "none"):
        return False
    conf = get_confounder(params["confounder"], strength=params.get("strength", 1.0),
                          **(params.get("confounder_params") or {}))
    return conf.memoise and conf.acts_on_hu


def _torch_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def missing_memos(cells: Sequence[dict[str, Any]]) -> dict[Path, dict[str, Any]]:
    """Every memo that the cells' runs would compute, and that no earlier run or fill left:
    memo path -> what computes it (the confounder, the row's slice, seed, id, flag, view)."""
    from ..data import _file_digest, row_views
    from ..manifest import load_manifest
    from ..paths import default_cache_dir, resolve
    from ..runs import RunConfig, get_run_confounder, split_rows

    fields = set(RunConfig.__dataclass_fields__)
    memo_dir = default_cache_dir() / "confounders"  # as a run: ImageCache's folder
    todo: dict[Path, dict[str, Any]] = {}
    manifests: dict[str, Any] = {}
    for params in cells:
        config = RunConfig.from_dict({k: v for k, v in params.items() if k in fields})
        manifest = manifests.get(config.manifest)
        if manifest is None:
            manifest = manifests[config.manifest] = load_manifest(resolve(config.manifest))
        conf = get_run_confounder(config)
        if conf is None or not (conf.memoise and conf.acts_on_hu):
            continue
        conf = conf.memoised_under(memo_dir)
        for rows in split_rows(config, manifest, conf).values():
            rows = rows.reset_index(drop=True)
            flags = (rows["confounded"].astype(bool).tolist() if "confounded" in rows
                     else [False] * len(rows))
            for i, (view, confounded) in enumerate(zip(row_views(rows), flags)):
                if view is None or not (confounded or conf.has_baseline):
                    continue
                path = Path(manifest.root) / rows.at[i, "path"]
                image_id = rows.at[i, "image_id"]
                digest = _file_digest(path)
                memo = conf.memo_path(confounded, config.seed, image_id, config.image_size,
                                      config.resize, digest, view)
                if not memo.is_file():
                    todo[memo] = {"conf": conf, "path": path, "digest": digest, "seed": config.seed,
                                  "image_id": image_id, "confounded": confounded, "view": view,
                                  "size": config.image_size, "resize": config.resize}
    return todo


def _fill_batch(item: tuple) -> int:
    """Compute and write one batch of memos (one confounder): in a worker process on a CPU."""
    from ..confounders.paper import ct_noise_hu_batch
    from ..hounsfield import read_hu_png
    from ..imaging import resize_grey

    conf, batch, device = item
    if conf.name != "ct_noise":  # another memoised HU confounder: one slice at a time
        for memo, task in batch:
            conf.prepare(lambda t=task: read_hu_png(t["path"]), task["confounded"], task["seed"],
                         task["image_id"], size=task["size"], resize=task["resize"],
                         original_key=task["digest"], view=task["view"])
        return len(batch)
    hus = ct_noise_hu_batch(
        [read_hu_png(t["path"]) for _, t in batch], [t["confounded"] for _, t in batch],
        [conf.image_rng(t["seed"], t["image_id"]) for _, t in batch],
        [t["view"].pixel_mm for _, t in batch], device=device, **conf.image_params)
    for (memo, task), hu in zip(batch, hus):
        conf.write_memo(memo, resize_grey(task["view"].grey(hu), task["size"], task["resize"]))
    return len(batch)


def fill_memos(cells: Sequence[dict[str, Any]], *, device: str = "auto", batch: int = BATCH,
               workers: int | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Compute and write every missing memo of ``cells`` (notebook 03's parameters) in batches
    of one confounder and up to ``batch`` slices: backend "torch" on ``device`` in this
    process, the CPU backends in a process pool (``workers``: None, every available core);
    returns the counts, seconds and the torch device used."""
    import time

    from ..progress import parallel_map

    start = time.perf_counter()
    todo = missing_memos(cells)
    groups: dict[str, list[Path]] = {}
    for memo, task in todo.items():
        groups.setdefault(json.dumps(task["conf"].spec(), sort_keys=True, default=str),
                          []).append(memo)
    on_cpu, on_torch, torch_device = [], [], None
    for memos in groups.values():
        conf = todo[memos[0]]["conf"]
        torch_backend = conf.params.get("backend") == "torch"
        if torch_backend and torch_device is None:
            torch_device = _torch_device(device)
        for first in range(0, len(memos), batch):
            item = (conf, [(m, todo[m]) for m in memos[first: first + batch]],
                    torch_device if torch_backend else None)
            (on_torch if torch_backend else on_cpu).append(item)
    written = sum(parallel_map(_fill_batch, on_cpu, desc="ct memos", unit="batch",
                               workers=workers))
    written += sum(parallel_map(_fill_batch, on_torch, desc="ct memos (torch)", unit="batch",
                                workers=1))
    log(f"ct memos: {written} of {len(todo)} written")
    return {"memos": len(todo), "written": written, "seconds": time.perf_counter() - start,
            "device": torch_device}


def prefill(cells: Sequence[Any], device: str, log: Callable[[str], None] = print) -> dict | None:
    """The grid's step: :func:`fill_memos` in a child process for the cells (``Cell``s) still to
    run whose confounder is memoised and acts on HU; None when there are none."""
    wanted = [cell.params for cell in cells if memoised_hu_confounder(cell.params)]
    if not wanted:
        return None
    with tempfile.TemporaryDirectory(prefix="sm_memos.") as tmp:
        order = Path(tmp) / "cells.json"
        order.write_text(json.dumps({"cells": wanted, "device": device}, default=str))
        log(f"computing the memoised CT confounder outputs of {len(wanted)} cell(s), batched")
        done = subprocess.run([sys.executable, "-m", "sm_utils.grid.memos", str(order)],
                              capture_output=True, text=True, check=False)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise GridError(f"computing the memoised CT confounder outputs failed (exit "
                        f"{done.returncode}):\n{done.stderr.strip()[-3000:]}")
    summary = json.loads(lines[-1])
    log(f"ct memos: {summary['written']} written in {summary['seconds']:.1f} s "
        f"({summary['memos']} were missing)")
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    order = json.loads(Path((argv or sys.argv[1:])[0]).read_text())
    summary = fill_memos(order["cells"], device=order.get("device", "auto"),
                         log=lambda line: print(line, file=sys.stderr, flush=True))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
