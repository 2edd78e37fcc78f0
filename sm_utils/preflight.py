"""Before a grid starts: resolve every cell against the registries, the manifests and the weights.

A grid file can be well-formed and still hold cells that cannot run: a source paired with an
architecture it cannot fill (RadImageNet's Keras weights in a torchvision ResNet50), a test set
the manifest has no rows for, a sampled confounder whose attribute the dataset lacks, a
prevalence the data cannot supply, a weights file of the wrong architecture. :func:`check_cells`
finds all of them at once, grouped by cause, so a grid is refused before anything starts and
with every problem listed; ``sm validate`` prints the same list.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Errors our modules raise for bad input (each says what to change).
_INPUT_ERRORS = (ValueError, OSError, KeyError)


@dataclasses.dataclass
class CheckReport:
    """``problems``: cause -> labels of the cells it stops; ``notes``: what was not checked."""

    problems: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)

    def add(self, cause: str, labels: Sequence[str]) -> None:
        self.problems.setdefault(cause.strip(), []).extend(labels)

    @property
    def n_cells(self) -> int:
        return len({label for labels in self.problems.values() for label in labels})

    def text(self, shown: int = 2) -> str:
        lines = [f"{self.n_cells} cell(s) cannot run ({len(self.problems)} cause(s)):"]
        for cause, labels in self.problems.items():
            unique = list(dict.fromkeys(labels))
            lines.append(f"  - {len(unique)} cell(s): {cause}")
            lines += [f"      e.g. {label}" for label in unique[:shown]]
        return "\n".join(lines)


def check_cells(spec, cells, *, load_weights: bool = True, check_files: bool = True) -> CheckReport:
    """Every reason any of ``cells`` (of grid ``spec``) cannot run, grouped by cause.

    ``load_weights``: build each distinct (source, arch, weights) model once, so a weights file
    of the wrong architecture or with missing layers is named now (Keras files are converted
    once and cached, so the grid does not pay twice). Manifests that do not exist yet (notebook
    01 builds them) are listed in ``notes`` and checked on the next call.
    """
    from .runs import RunConfig

    report = CheckReport()
    by_key: dict[tuple, list] = {}
    for cell in cells:
        try:
            RunConfig.from_dict(cell.params)
        except _INPUT_ERRORS as err:
            report.add(str(err), [cell.label()])
        p = cell.params
        by_key.setdefault(("source", p["source"], p.get("arch"), p.get("weights"),
                           p["image_size"]), []).append(cell)
        by_key.setdefault(("confounder", p["confounder"], p["strength"],
                           repr(sorted(p["confounder_params"].items()))), []).append(cell)
        by_key.setdefault(("manifest", p["manifest"]), []).append(cell)
    for key, group in by_key.items():
        labels = [c.label() for c in group]
        if key[0] == "source":
            _check_source(report, key[1:], labels, load_weights)
        elif key[0] == "confounder":
            _check_confounder(report, group[0].params, labels)
        else:
            _check_manifest(report, Path(key[1]), group, check_files)
    return report


def _check_source(report: CheckReport, key, labels, load_weights: bool) -> None:
    from .sources import SourceError, check_source_arch, create_model

    source, arch, weights, image_size = key
    try:
        resolved = check_source_arch(source, arch)
    except SourceError as err:
        report.add(f"source {source!r} with arch {arch!r}: {err}", labels)
        return
    if not load_weights:
        return
    if weights is not None and not Path(weights).exists():
        return  # reported by sm_utils.grid.validate_grid with the grid's other missing files
    try:
        create_model(source, arch=resolved, weights=weights, num_classes=2, image_size=image_size)
    except (SourceError, RuntimeError, *_INPUT_ERRORS) as err:
        report.add(f"source {source!r} ({resolved}, weights {weights}): {err}", labels)


def _check_confounder(report: CheckReport, params: dict[str, Any], labels) -> None:
    if params["confounder"] == "none":
        return
    from .confounders import ConfounderError, get_confounder

    try:
        get_confounder(params["confounder"], strength=params["strength"],
                       **params["confounder_params"])
    except ConfounderError as err:
        report.add(str(err), labels)


def _check_manifest(report: CheckReport, path: Path, cells, check_files: bool) -> None:
    from .manifest import load_manifest
    from .runs import RunConfig, RunError, get_run_confounder, split_rows

    if not path.exists():
        report.notes.append(f"manifest {path} does not exist yet: notebook 01 builds it, and "
                            "its cells are checked against it before any cell starts")
        return
    try:
        manifest = load_manifest(path, check_files=check_files)
    except _INPUT_ERRORS as err:
        report.add(f"manifest {path}: {err}", [c.label() for c in cells])
        return
    seen: dict[tuple, str | None] = {}
    for cell in cells:
        try:
            config = RunConfig.from_dict(cell.params)
        except _INPUT_ERRORS:
            continue  # reported with the cell's parameters
        key = (config.confounder, config.strength, repr(config.confounder_params), config.p,
               config.fold, config.seed)
        if key not in seen:
            seen[key] = None
            try:
                splits = split_rows(config, manifest, get_run_confounder(config))
                if "ood" not in splits:
                    raise RunError(f"fold {config.fold} has no rows to draw the o.o.d. test set "
                                   "from (role 'test_ood' or 'test')")
            except _INPUT_ERRORS as err:
                seen[key] = f"manifest {path}: {err}"
        if seen[key]:
            report.add(seen[key], [cell.label()])
