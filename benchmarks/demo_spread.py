"""How far the offline demo's AUCs move with the seed, beside how far they move across folds.

After `make demo` (it builds the demo's data and radiology source), rerun a few demo cells with
other seeds (the seed sets the head's initialisation, dropout, shuffling and which images carry
the confounder) and print, per cell and test set, the AUC of each seed with its mean, SD and
range, and the SD across the demo's folds for the same condition:

    .venv/bin/python benchmarks/demo_spread.py                       # 3 cells x 3 more seeds
    .venv/bin/python benchmarks/demo_spread.py --confounder sex --p 1 --seeds 1 2
    .venv/bin/python benchmarks/demo_spread.py --rerun      # also: is a rerun here bit-exact?

`--rerun` trains the demo's own cells again (same seed, a fresh run directory) and prints the
largest AUC difference from the demo's runs: 0 on the machine and build that ran the demo.

The reruns go to runs/demo_spread/ (resumable: finished ones are read back).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    parser.add_argument("--confounder", default="tag")
    parser.add_argument("--p", type=float, default=0.5)
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--rerun", action="store_true",
                        help="also rerun the demo's own seed and compare with the demo's runs")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # as the demo's workers

    import json

    import pandas as pd

    from sm_utils.analysis import collect_results
    from sm_utils.grid import expand_cells, load_grid
    from sm_utils.runs import METRICS_FILE, RunConfig, execute_run

    spec = load_grid(args.config)
    cells = [c for c in expand_cells(spec) if c.params["confounder"] == args.confounder
             and c.params["p"] == args.p and c.params["fold"] == args.fold]
    if not cells or any(c.run_id is None for c in cells):
        print(f"no built demo cells for {args.confounder} at p = {args.p}, fold {args.fold}: run "
              "`make demo` first (it builds the data and the radiology source)")
        return 2
    rows = []
    started = time.perf_counter()
    for cell in cells:
        for seed in [cell.params["seed"], *args.seeds]:
            params = dict(cell.params, seed=seed, device="cpu",
                          runs_dir=str(ROOT / "runs" / "demo_spread"))
            if seed == cell.params["seed"]:
                params["runs_dir"] = cell.params["runs_dir"]  # the demo's own run
            config = RunConfig.from_dict(params)
            run_dir = config.run_dir()
            if not (run_dir / METRICS_FILE).exists():
                execute_run(config, progress=False)
            metrics = json.loads((run_dir / METRICS_FILE).read_text())
            for test_set, values in metrics["test_sets"].items():
                rows.append({"source": cell.params["source"], "test_set": test_set, "seed": seed,
                             "auc": values["auc"]})
    rerun_diffs = []
    if args.rerun:
        for cell in cells:
            params = dict(cell.params, device="cpu", runs_dir=str(ROOT / "runs" / "demo_rerun"))
            config = RunConfig.from_dict(params)
            if not (config.run_dir() / METRICS_FILE).exists():
                execute_run(config, progress=False)
            again = json.loads((config.run_dir() / METRICS_FILE).read_text())["test_sets"]
            demo = json.loads((Path(cell.params["runs_dir"]) / cell.run_id / METRICS_FILE)
                              .read_text())["test_sets"]
            rerun_diffs += [abs(again[t]["auc"] - demo[t]["auc"]) for t in demo]
    seconds = time.perf_counter() - started
    table = pd.DataFrame(rows)
    by_seed = (table.groupby(["source", "test_set"])["auc"]
               .agg(n_seeds="count", mean="mean", sd="std", low="min", high="max").reset_index())
    results = collect_results(spec.runs_dir)
    condition = results[(results["confounder"] == args.confounder) & (results["p"] == args.p)]
    by_fold = (condition.groupby(["source", "test_set"])["auc"].agg(fold_sd="std", n_folds="count")
               .reset_index())
    summary = by_seed.merge(by_fold, on=["source", "test_set"], how="left")
    pd.set_option("display.width", 160)
    print(f"demo {args.confounder} at p = {args.p}, fold {args.fold}: AUC over seeds "
          f"{[cells[0].params['seed'], *args.seeds]} (SD across the demo's folds beside it)")
    print(summary.round(3).to_string(index=False))
    print(f"\nlargest SD across seeds: {summary['sd'].max():.3f}; across folds: "
          f"{summary['fold_sd'].max():.3f}; {seconds:.0f} s")
    if rerun_diffs:
        print(f"rerun of the demo's own {len(cells)} cells here (same seed, fresh run directories): "
              f"largest AUC difference from the demo's runs {max(rerun_diffs):.3g} "
              f"over {len(rerun_diffs)} AUCs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
