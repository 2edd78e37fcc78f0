"""Cells: the combinations of a grid, each one run of notebook 03 in its own run directory.

A cell is done when its run directory holds ``metrics.json`` (written last, atomically), so a
grid killed at any moment and launched again skips finished cells and redoes only the others.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..confounders.registry import identity_params
from ..identity import DEFAULT_MODE
from ..io import atomic_write_csv, stable_hash
from ..paths import CELLS_FILE, ERROR_FILE, METRICS_FILE
from .errors import error_headline
from .spec import GridSpec, SourceSpec


def run_id_for(params: dict[str, Any], manifest: str | None = None) -> str:
    """Run id of notebook 03's parameters: :func:`sm_utils.identity.run_id`, the rule notebook 03
    (``sm_utils.runs.RunConfig.run_id``) uses too, without importing torch."""
    from ..identity import run_id

    return run_id(params, manifest=manifest)


@dataclass(frozen=True)
class Cell:
    """One run of notebook 03: its parameters and where its run directory goes.

    ``run_id`` is None while an input the id is made from (the manifest, a weights file) does
    not exist yet: the grid builds it, then names the cell.
    """

    dataset: str
    params: dict[str, Any]
    run_id: str | None

    @property
    def run_dir(self) -> Path | None:
        return None if self.run_id is None else Path(self.params["runs_dir"]) / self.run_id

    @property
    def done(self) -> bool:
        return self.run_id is not None and (self.run_dir / METRICS_FILE).exists()

    @property
    def status(self) -> str:
        if self.run_id is None:
            return "waiting"  # for its manifest or weights to be built
        if self.done:
            return "done"
        if (self.run_dir / ERROR_FILE).exists():
            return "failed"
        if self.run_dir.exists():
            return "partial"
        return "pending"

    def label(self) -> str:
        p = self.params
        return (f"{self.dataset} {p['confounder']}(s={p['strength']:g}) p={p['p']:g} fold={p['fold']} "
                f"{p['source']}" + (f"/{p['arch']}" if p.get("arch") else "")
                + (f" {p['mode']}" if p.get("mode", DEFAULT_MODE) != DEFAULT_MODE else "")
                + f" seed={p['seed']}")


def _accepted_archs(kind: str) -> tuple[str, ...] | None:
    """Architectures the registered source ``kind`` can fill (None: any, or unknown source)."""
    try:
        from ..sources import SourceError, get_source
    except ImportError:
        return None
    try:
        return get_source(kind).archs
    except SourceError:
        return None  # an unknown name is reported by validation


def source_archs(spec: GridSpec, source: SourceSpec) -> list[str | None]:
    """The architectures ``source`` runs with: its own ``arch``, else the grid-level ones it
    accepts, else its default (None)."""
    if source.arch:
        return [source.arch]
    accepted = _accepted_archs(source.name)
    archs = [a for a in spec.architectures if a is None or accepted is None or a in accepted]
    return archs or [None]


def expand_cells(spec: GridSpec) -> list[Cell]:
    """Every cell of the grid, in a stable order (datasets, confounders, p, folds, sources, ...).

    A source with its own ``arch`` uses it; the grid-level ``architectures`` apply only to the
    sources that accept them (e.g. not to ``radimagenet``, which takes only keras_resnet50);
    a source that accepts none of them runs with its default architecture.
    """
    from ..identity import IdentityError, manifest_digest, run_identity

    cells = []
    seen: set[str] = set()
    digests: dict[str, str | None] = {}
    pairs = [(source, arch) for source in spec.sources for arch in source_archs(spec, source)]
    for dataset, confounder in itertools.product(spec.datasets, spec.confounders):
        if confounder.datasets is not None and dataset.name not in confounder.datasets:
            continue
        for strength, p, fold, (source, arch), mode, seed in itertools.product(
            confounder.strengths, spec.prevalences, spec.folds, pairs, spec.modes, spec.seeds,
        ):
            params = {
                "manifest": str(dataset.manifest),
                "confounder": confounder.name,
                "strength": float(strength),
                # as RunConfig records them (parameters added later written out)
                "confounder_params": identity_params(confounder.name, confounder.params),
                "p": float(p),
                "fold": int(fold),
                "source": source.name,
                "weights": str(source.weights) if source.weights else None,
                "arch": arch,
                **spec.training,
                "seed": int(seed),
                # only when not notebook 03's default, so a fine-tuning cell's parameters stay
                **({"mode": mode} if mode != DEFAULT_MODE else {}),
                "device": spec.run["device"],
                "num_workers": int(spec.run["num_workers"]),
                # how a GPU runs, only when not the default (notebook 03's defaults)
                **({"precision": spec.run["precision"]} if spec.run["precision"] != "auto" else {}),
                **({"deterministic": True} if spec.run["deterministic"] else {}),
                "runs_dir": str(spec.runs_dir),
                # only when asked for: notebook 03's defaults are off
                **({"probe": True} if spec.probe else {}),
                **({"attribution": True} if spec.attribution else {}),
            }
            # e.g. confounder "none" at several p: one run suffices
            key = stable_hash([run_identity({**params, "weights": None}, manifest=params["manifest"]),
                               params["weights"]])
            if key in seen:
                continue
            seen.add(key)
            if params["manifest"] not in digests:
                try:
                    digests[params["manifest"]] = manifest_digest(params["manifest"])
                except IdentityError:
                    digests[params["manifest"]] = None
            try:
                run_id = (None if digests[params["manifest"]] is None
                          else run_id_for(params, manifest=digests[params["manifest"]]))
            except IdentityError:  # its weights are built by the grid
                run_id = None
            cells.append(Cell(dataset.name, params, run_id))
    return cells


def cells_table(cells: Sequence[Cell]):
    """One row per cell: run id, dataset, the grid axes and the current status; ``mode`` only
    where some cell does not fine-tune (a grid without linear probes keeps its columns)."""
    import pandas as pd

    modes = any("mode" in c.params for c in cells)
    rows = [
        {"run_id": c.run_id, "dataset": c.dataset, "confounder": c.params["confounder"],
         "strength": c.params["strength"], "p": c.params["p"], "fold": c.params["fold"],
         "source": c.params["source"], "arch": c.params["arch"],
         **({"mode": c.params.get("mode", DEFAULT_MODE)} if modes else {}),
         "seed": c.params["seed"], "status": c.status}
        for c in cells
    ]
    return pd.DataFrame(rows)


def failed_cells(cells: Sequence[Cell]) -> list[tuple[Cell, str]]:
    """Each failed cell with its error's type and message (from its run directory)."""
    out = []
    for cell in cells:
        if cell.status == "failed":
            text = (cell.run_dir / ERROR_FILE).read_text()
            out.append((cell, error_headline(text.split("\n\n", 1)[-1])))
    return out


def write_cells_index(spec: GridSpec, cells: Sequence[Cell]) -> Path:
    """``runs_dir/cells.csv``: the grid's cells (lets the analysis map run ids to datasets)."""
    table = cells_table(cells).drop(columns=["status"])
    return atomic_write_csv(spec.runs_dir / CELLS_FILE, table)
