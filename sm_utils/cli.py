"""The ``sm`` command line (also ``python -m sm_utils``).

    sm run configs/demo.yaml                 run a grid (resumable), then notebook 04
    sm run configs/demo.yaml --dry-run       list the cells and which are done
    sm run CONFIG --executor slurm           submit the cells as SLURM job arrays (submitit)
    sm validate configs/paper_cxr.yaml       check a grid file and every cell (--no-check-paths:
                                             without manifests and weights)
    sm run CONFIG --override configs/smoke.yaml   the same grid, tiny and fast (end-to-end check)
    sm analyse configs/demo.yaml             results table, statistics and figures of a grid
    sm check-splits data/x/manifest.csv      no patient in two of train/val/test
    sm list                                  registered datasets, confounders and sources
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from . import grid as grid_module


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"{version('sm_utils')} (Source Matters compendium)"
    except PackageNotFoundError:
        return "unknown (sm_utils is not installed; pip install -e .)"


def _load(args, check_paths: bool | None = None) -> grid_module.GridSpec:
    check_paths = not args.no_check_paths if check_paths is None else check_paths
    return grid_module.load_grid(args.config, check_names=not args.no_check_names,
                                 check_paths=check_paths, overrides=args.override)


def _shown(path: Path) -> str:
    """A path relative to the current folder when it lies inside it (shorter to read)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _figures_written_since(folder: Path, since: float) -> list[Path]:
    if not folder.exists():
        return []
    return sorted(p for p in folder.iterdir()
                  if p.suffix in (".png", ".pdf") and p.stat().st_mtime >= since)


def cmd_run(args) -> int:
    if args.dry_run:  # a listing: missing files are worth a warning, not a refusal
        spec = _load(args, check_paths=False)
        try:
            grid_module.validate_grid(spec, check_names=False, check_paths=not args.no_check_paths)
        except grid_module.GridError as err:
            print(f"warning: {err}")
        print(grid_module.dry_run(spec))
        return 0
    spec = _load(args)
    start = time.time()
    progress = None if args.progress == "auto" else args.progress == "on"
    report = grid_module.run_grid(
        spec, executor=args.executor, workers=args.workers, analyse=not args.no_analysis,
        progress=progress, slurm_cluster="local" if args.slurm_local else None,
        slurm_timeout_s=args.slurm_timeout, check=not args.no_check_names,
    )
    grid_module.write_report(spec, report)
    print(report.summary())
    print(f"run directories: {spec.runs_dir}")
    if not args.no_analysis:
        figures = _figures_written_since(spec.figures_dir, start)
        tables = [spec.runs_dir / name for name in ("results.csv", "paper_test.csv", "comparisons.csv",
                                                   "robustness.csv")]
        print(f"analysis notebook: {spec.runs_dir / '04_analysis.ipynb'}")
        if (spec.runs_dir / "05_mechanisms.ipynb").exists() and (spec.probe or spec.attribution):
            print(f"mechanisms notebook: {spec.runs_dir / '05_mechanisms.ipynb'}")
            tables.append(spec.runs_dir / "encodedness_vs_drop.csv")
        print("tables: " + ", ".join(str(t) for t in tables if t.exists()))
        if figures:
            print("figures:\n  " + "\n  ".join(_shown(f) for f in figures))
        else:
            print(f"no figures were written to {spec.figures_dir} (see the analysis notebook)")
    return 1 if report.failures else 0


def cmd_validate(args) -> int:
    """Every problem at once: missing files, then each cell resolved against the registries,
    manifests and weights."""
    from .preflight import check_cells

    spec = _load(args, check_paths=False)
    cells = grid_module.expand_cells(spec)
    problems = []
    if not args.no_check_paths:
        try:
            grid_module.validate_grid(spec, check_names=False, check_paths=True)
        except grid_module.GridError as err:
            problems.append(str(err))
    if not args.no_check_names:
        report = check_cells(spec, cells, load_weights=not args.no_check_paths,
                             check_files=not args.no_check_paths)
        for note in report.notes:
            print(f"note: {note}")
        if report.problems:
            problems.append(report.text())
    if problems:
        print(f"{args.config}: {len(cells)} cells; not valid:\n" + "\n".join(problems),
              file=sys.stderr)
        return 2
    print(f"{args.config}: valid; {len(cells)} cells; runs in {spec.runs_dir}")
    return 0


def cmd_analyse(args) -> int:
    from .analysis import analyse_runs

    target = Path(args.target)
    reference = None
    if target.suffix in (".yaml", ".yml"):
        spec = grid_module.load_grid(target, check_paths=False, overrides=args.override)
        runs_dir, name = spec.runs_dir, spec.name
        figures_dir = Path(args.figures_dir) if args.figures_dir else spec.figures_dir
        reference = spec.reference.get("datasets")
    else:
        runs_dir, name = target, args.name or target.name
        figures_dir = Path(args.figures_dir or "figures")
    out = analyse_runs(runs_dir, figures_dir, name, reference_datasets=reference,
                       n_permutations=args.permutations, seed=args.seed)
    print(out["robustness"].to_string(index=False))
    print("tables:\n  " + "\n  ".join(str(p) for p in out["tables"]))
    print("figures:\n  " + "\n  ".join(str(p) for p in out["figures"]))
    return 0


def cmd_claims(args) -> int:
    from .analysis import collect_results, load_results
    from .analysis.claims import (
        check_claims,
        claims_against_paper,
        format_claims,
        paper_claims,
        summary_text,
    )

    roles, datasets = _roles(args.role), None
    if args.paper:
        table = paper_claims(metric="auc")
    else:
        target = Path(args.target) if args.target else None
        if target is None:
            raise SystemExit("sm claims: give a runs directory or grid file, or --paper")
        if target.suffix in (".yaml", ".yml"):
            spec = grid_module.load_grid(target, check_paths=False, overrides=args.override)
            target, datasets = spec.runs_dir, spec.reference.get("datasets")
            roles = {**spec.claims.get("roles", {}), **roles}
        if target.is_file():
            results = load_results(target)[0]
        elif (target / "results.csv").exists():
            results = load_results(target / "results.csv")[0]
        else:
            results = collect_results(target)
        if results.empty:
            raise SystemExit(f"sm claims: no results under {target}; run the grid first")
        table = claims_against_paper(check_claims(results, roles or None, metric=args.metric),
                                     datasets=datasets)
    print(format_claims(table, args.format), end="" if args.format != "text" else "\n")
    if args.format == "text":
        print(summary_text(table))
    return 0


def _roles(items) -> dict[str, str]:
    roles = {}
    for item in items or []:
        role, _, source = item.partition("=")
        if not source:
            raise SystemExit(f"--role takes ROLE=SOURCE (e.g. imagenet=my_model); got {item!r}")
        roles[role] = source
    return roles


def cmd_report(args) -> int:
    from .analysis.report import write_report

    target, roles = Path(args.target), _roles(args.role)
    name, description, reference = args.name, None, None
    if target.suffix in (".yaml", ".yml"):
        spec = grid_module.load_grid(target, check_paths=False, overrides=args.override)
        target, name = spec.runs_dir, name or spec.name
        description, reference = spec.description, spec.reference.get("datasets")
        roles = {**spec.claims.get("roles", {}), **roles}
    if not target.is_dir():
        raise SystemExit(f"sm report: {target} is not a runs directory; give the folder a grid "
                         "ran in (its runs_dir) or the grid's YAML file")
    notes: list[str] = []
    paths = write_report(target, args.out, name=name, description=description,
                         reference_datasets=reference, claim_roles=roles or None,
                         n_permutations=args.permutations, seed=args.seed, notes=notes)
    out = Path(args.out)
    print(f"report of {target} in {out}:")
    for path in paths:
        print(f"  {_shown(path)}")
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"preview the tables: cd {out / 'tables'} && pdflatex tables.tex")
    return 0


def cmd_check_splits(args) -> int:
    from .manifest import find_leakage, format_leakage, load_manifest
    from .splits import split_summary

    # loaded without refusing leakage: finding and listing it is this command's job
    manifest = load_manifest(args.manifest, check_files=not args.no_check_files,
                             check_leakage=False)
    leaks = find_leakage(manifest.table)
    print(split_summary(manifest.table).to_string(index=False))
    if leaks:
        print(format_leakage(leaks))
        return 1
    print(f"{args.manifest}: no patient appears in two of train, val and test in any fold")
    return 0


def cmd_notebook(args) -> int:
    """One notebook, headless, as the grid runs its own (IPC kernel, dead kernels noticed):
    papermill's parameters, the executed copy kept, a failure in one line naming that copy."""
    import yaml

    from .grid.prepare import PreparationError, execute_once

    notebook = Path(args.notebook).resolve()
    if not notebook.exists():
        print(f"error: notebook {args.notebook} not found", file=sys.stderr)
        return 2
    output = Path(args.output) if args.output else Path("runs") / notebook.name
    parameters = {}
    for name, value in args.parameter or []:
        parameters[name] = yaml.safe_load(value)  # as papermill -y: numbers, lists, booleans
    started = time.perf_counter()
    try:
        execute_once(notebook, output.resolve(), parameters, args.kernel, args.timeout,
                     step=f"notebook {notebook.name}")
    except PreparationError as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"{notebook.name} ran in {time.perf_counter() - started:.0f} s -> {output}")
    return 0


def cmd_new(args) -> int:
    """A study folder of one's own (sm_utils.study)."""
    from .study import new_study

    folder = Path(args.folder)
    written = new_study(folder, name=args.name)
    print(f"wrote {len(written)} files to {folder}: "
          + ", ".join(str(p.relative_to(folder)) for p in written))
    print(f"next: sm run {folder / 'grid.yaml'}   (offline, on phantoms; {folder / 'README.md'}"
          " says how to point it at your data)")
    return 0


def cmd_list(args) -> int:
    """Each registered name and who registered it (sm_utils itself, or a plugin)."""
    from .plugins import registered_by

    if getattr(args, "config", None):  # a grid's plugins: loaded as `sm run` would
        grid_module.load_grid(args.config, check_names=False, check_paths=False)
    for kind in ("datasets", "confounders", "sources", "metrics"):
        names = grid_module._registry_names(kind)
        if names is None:
            print(f"{kind}: (module not available)")
            continue
        print(f"{kind}:" + ("" if names else " (none)"))
        for name in names:
            print(f"  {name:<24} {registered_by(kind[:-1], name)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sm", description="Source Matters compendium: run grids of fine-tuning runs and analyse them.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}",
                        help="the compendium's version (as recorded in every run's config.json)")
    parser.add_argument("--debug", action="store_true",
                        help="on an error, show the full traceback instead of one line")
    commands = parser.add_subparsers(dest="command", required=True)

    def override_argument(sub):
        sub.add_argument("--override", action="append", default=[], metavar="YAML",
                         help="a YAML file laid over the grid file (repeatable; e.g. "
                              "configs/smoke.yaml for a quick end-to-end check); named entries "
                              "(datasets, confounders, sources) merge by name")

    def grid_arguments(sub):
        sub.add_argument("config", help="grid YAML file, e.g. configs/demo.yaml")
        sub.add_argument("--no-check-paths", action="store_true",
                         help="do not require weights, manifests and notebooks to exist")
        sub.add_argument("--no-check-names", action="store_true",
                         help="do not check names against the registries, nor resolve the cells "
                              "against the manifests and weights before the grid starts")
        override_argument(sub)
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                         help="on an error, show the full traceback instead of one line")

    run = commands.add_parser("run", help="run a grid (skips finished cells), then notebook 04")
    grid_arguments(run)
    run.add_argument("--dry-run", action="store_true", help="list the cells and their status; run nothing")
    run.add_argument("--executor", choices=["local", "slurm"], default="local")
    run.add_argument("--workers", type=int, default=None,
                     help="parallel cells on this machine (default: the grid's run.workers; auto = one per GPU)")
    run.add_argument("--no-analysis", action="store_true", help="skip notebook 04 at the end")
    run.add_argument("--progress", choices=["auto", "on", "off"], default="auto",
                     help="the grid's progress bar (auto: only on a terminal, so logs stay clean)")
    run.add_argument("--slurm-local", action="store_true",
                     help="run the SLURM path with submitit's local executor (testing without a cluster)")
    run.add_argument("--slurm-timeout", type=float, default=None,
                     help="give up waiting for the SLURM jobs after this many seconds")
    run.set_defaults(func=cmd_run)

    validate = commands.add_parser("validate", help="check a grid file and count its cells")
    grid_arguments(validate)
    validate.set_defaults(func=cmd_validate)

    analyse = commands.add_parser("analyse", aliases=["analyze"],
                                  help="results table, statistics and figures of a grid")
    analyse.add_argument("target", help="a grid YAML file or a runs directory")
    analyse.add_argument("--figures-dir", default=None)
    analyse.add_argument("--name", default=None, help="figure name prefix (default: the grid's name)")
    analyse.add_argument("--permutations", type=int, default=9999)
    analyse.add_argument("--seed", type=int, default=0)
    override_argument(analyse)
    analyse.set_defaults(func=cmd_analyse)

    claims = commands.add_parser(
        "claims", help="the paper's claims checked on a grid's results, beside the paper's own")
    claims.add_argument("target", nargs="?",
                        help="a runs directory, its results.csv, or a grid YAML file")
    claims.add_argument("--format", choices=["text", "md", "latex", "csv"], default="text")
    claims.add_argument("--paper", action="store_true",
                        help="the claims on the paper's reported means only")
    claims.add_argument("--metric", default="auc", choices=["auc", "keras_auc", "micro_auc"])
    claims.add_argument("--role", action="append", metavar="ROLE=SOURCE",
                        help="which source plays a claim's role: imagenet, in_domain or random "
                             "(repeatable; default: by name)")
    override_argument(claims)
    claims.set_defaults(func=cmd_claims)

    report = commands.add_parser(
        "report", help="a paper kit of a grid: LaTeX and Markdown tables, figures at journal "
                       "widths, claims, statistics and methods.md")
    report.add_argument("target", help="a runs directory or a grid YAML file")
    report.add_argument("out", help="folder to write the report into")
    report.add_argument("--name", default=None, help="the grid's name (default: from the grid)")
    report.add_argument("--role", action="append", metavar="ROLE=SOURCE",
                        help="which source plays a claim's role (as in sm claims)")
    report.add_argument("--permutations", type=int, default=9999)
    report.add_argument("--seed", type=int, default=0)
    override_argument(report)
    report.set_defaults(func=cmd_report)

    check = commands.add_parser("check-splits", help="check a manifest for patients shared between splits")
    check.add_argument("manifest")
    check.add_argument("--no-check-files", action="store_true", help="do not require the image files")
    check.set_defaults(func=cmd_check_splits)

    notebook = commands.add_parser(
        "notebook", help="run one notebook headless with parameters (e.g. notebook 05)")
    notebook.add_argument("notebook", help="e.g. notebooks/05_mechanisms.ipynb")
    notebook.add_argument("output", nargs="?", default=None,
                          help="the executed copy (default: runs/<notebook name>)")
    notebook.add_argument("-p", "--parameter", nargs=2, action="append", metavar=("NAME", "VALUE"),
                          help="a parameter of the notebook's parameters cell (value read as YAML)")
    notebook.add_argument("--kernel", default="python3")
    notebook.add_argument("--timeout", type=int, default=3600, help="seconds per cell")
    notebook.set_defaults(func=cmd_notebook)

    new = commands.add_parser(
        "new", help="write a study folder of your own (grid.yaml, plugins.py with a worked "
        "confounder, source, dataset and metric, README.md, .gitignore) that runs offline")
    new.add_argument("folder", help="a new or empty folder, e.g. ../my_study")
    new.add_argument("--name", default=None, help="the study's name (default: the folder's)")
    new.set_defaults(func=cmd_new)

    listing = commands.add_parser(
        "list", help="registered datasets, confounders, sources and metrics, each with the "
        "plugin (or sm_utils) that registered it")
    listing.add_argument("config", nargs="?", help="a grid file: its plugins are loaded first")
    listing.set_defaults(func=cmd_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as err:  # our errors say what was expected and how to fix it
        if args.debug or not type(err).__module__.startswith("sm_utils"):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
