"""What a grid's runs say about the GPU path (benchmarks/gpu_check.sh's last step): per run, where
and in what precision it trained, the GPU memory it reserved at its peak against what the grid's
memory check predicted (`memory_check.json`, written when run.runs_per_gpu > 1), and how many
of its test scores tie (fp32 scoring gives distinct scores; bf16 logits would tie many).

    .venv/bin/python benchmarks/gpu_check_report.py RUNS_DIR [--csv OUT.csv]

Works on any grid's runs directory (CPU runs have no peak memory).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

MIB = 2 ** 20


def score_ties(predictions: pd.DataFrame) -> float:
    """Share of test predictions whose score equals another's in the same test set."""
    if predictions.empty:
        return float("nan")
    tied = predictions.groupby("test_set")["score"].transform(lambda s: s.duplicated(keep=False))
    return float(tied.mean())


def report(runs_dir: Path) -> pd.DataFrame:
    check = runs_dir / "memory_check.json"
    predicted = json.loads(check.read_text())["need_bytes"] if check.exists() else None
    rows = []
    for metrics_path in sorted(runs_dir.glob("*/metrics.json")):
        metrics = json.loads(metrics_path.read_text())
        config, ran_on = metrics["config"], metrics.get("ran_on", {})
        predictions = pd.read_csv(metrics_path.with_name("predictions.csv"))
        peak = ran_on.get("peak_memory_bytes")
        rows.append({
            "run_id": metrics["run_id"], "source": config["source"],
            "arch": config.get("arch") or "default", "p": config["p"], "fold": config["fold"],
            "device": ran_on.get("device", "unknown"), "gpu": ran_on.get("gpu"),
            "precision": ran_on.get("precision", "unknown"),
            "peak_mib": peak / MIB if peak else float("nan"),
            "predicted_mib": predicted / MIB if predicted else float("nan"),
            "predicted_over_peak": predicted / peak if predicted and peak else float("nan"),
            "score_ties": score_ties(predictions),
            "train_seconds": metrics.get("train_seconds"),
        })
    return pd.DataFrame(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs_dir", type=Path)
    parser.add_argument("--csv", type=Path, help="also write the table here")
    args = parser.parse_args()
    table = report(args.runs_dir)
    if table.empty:
        print(f"no complete runs under {args.runs_dir}", file=sys.stderr)
        return 1
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(table.drop(columns="run_id").to_string(index=False, float_format="{:.3g}".format))
    print(f"\n{len(table)} runs; devices {sorted(table['device'].unique())}, precisions "
          f"{sorted(table['precision'].unique())}; largest share of tied scores "
          f"{table['score_ties'].max():.3f}")
    if table["predicted_over_peak"].notna().any():
        print(f"memory check: predicted / reserved peak from {table['predicted_over_peak'].min():.2f}"
              f" to {table['predicted_over_peak'].max():.2f} (below 1: the check under-predicted)")
    if args.csv:
        table.to_csv(args.csv, index=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
