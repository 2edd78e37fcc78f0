"""What a grid launch did: counts, timings and failures, its progress bar and grid_report.json."""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..io import atomic_write_json
from .errors import error_headline
from .runner import CellResult
from .spec import GridSpec


@dataclass
class GridReport:
    """What a grid launch did; ``failures`` lists (label, first line of the error)."""

    total: int
    already_done: int
    succeeded: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    elsewhere: list[tuple[str, str]] = field(default_factory=list)  # run by another launch
    notebooks: dict[str, str] = field(default_factory=dict)  # failed cell -> executed notebook
    wall_seconds: float = 0.0
    cells_wall_seconds: float = 0.0
    train_seconds: float = 0.0
    kernel_start_seconds: float = 0.0
    prepare_seconds: float = 0.0
    analysis_seconds: float = 0.0

    @property
    def overhead_share(self) -> float:
        """Share of the grid's worker time not spent training/evaluating inside run_batch."""
        busy = self.cells_wall_seconds + self.kernel_start_seconds
        return 1.0 - self.train_seconds / busy if busy > 0 else 0.0

    def summary(self) -> str:
        lines = [
            (f"cells: {self.total} in the grid, {self.already_done} already done, "
             f"{self.succeeded} run now, {len(self.failures)} failed"
             + (f", {len(self.elsewhere)} left to another launch that holds them"
                if self.elsewhere else "")),
            (f"wall time {self.wall_seconds:.1f} s (preparation {self.prepare_seconds:.1f} s, "
             f"analysis {self.analysis_seconds:.1f} s); worker time: kernels start-up "
             f"{self.kernel_start_seconds:.1f} s, notebooks {self.cells_wall_seconds:.1f} s, of which "
             f"training+evaluation {self.train_seconds:.1f} s; overhead share "
             f"{100 * self.overhead_share:.1f} %"),
        ]
        for label, error in self.failures:
            lines.append(f"  FAILED {label}: {error_headline(error)}")
            if self.notebooks.get(label):
                lines.append(f"    full traceback: {self.notebooks[label]}")
        return "\n".join(lines)

    def add(self, result: CellResult) -> None:
        """Count one cell's result."""
        self.cells_wall_seconds += result.wall_seconds
        self.train_seconds += result.train_seconds
        if result.ok:
            self.succeeded += 1
        elif result.elsewhere:
            self.elsewhere.append((result.label, result.elsewhere))
        else:
            self.failures.append((result.label, result.error))
            if result.notebook:
                self.notebooks[result.label] = result.notebook


def progress_bar(total: int, disable: bool | None):
    """The grid's progress bar over ``total`` cells (tqdm; ``disable=None``: only on a terminal)."""
    from tqdm import tqdm  # not tqdm.auto: no widget (and no IProgress warning) in notebooks

    return tqdm(total=total, desc="grid", unit="cell", disable=disable, dynamic_ncols=True,
                file=sys.stdout)


def write_report(spec: GridSpec, report: GridReport) -> Path:
    """``runs_dir/grid_report.json``: counts, timings and failures of the last launch (each
    with its exception's type and message and the executed notebook holding the traceback)."""
    data = {**dataclasses.asdict(report), "overhead_share": report.overhead_share,
            "failed_cells": [{"cell": label, "error": error_headline(error),
                              "notebook": report.notebooks.get(label)}
                             for label, error in report.failures]}
    return atomic_write_json(spec.runs_dir / "grid_report.json", data)
