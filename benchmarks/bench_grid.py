"""Grid throughput: runs per hour and images per second with 1, 2, 4, 8 runs at once per device.

A paper-like cell (the Keras-layout ResNet50 from random initialisation, the paper's input size
and batch, about 220 training images, a fixed number of epochs, confounder tag at p = 0.5) runs
through the real grid (`sm_utils.grid.run_grid`: warm kernels, notebook 03, one executed
notebook per cell) with k runs at once on the device: on a GPU, `run.runs_per_gpu: k` (images
kept on the GPU, bf16); on the CPU, k workers of one thread each. Printed per k: runs/hour,
aggregate images/s (training and evaluation images over the cells' wall time), the share of
worker time that is not training or evaluation (kernels, papermill, model set-up, files) and,
on a GPU, how busy it was (nvidia-smi, sampled every 0.5 s).

    python benchmarks/bench_grid.py --device cpu          # small settings, a few minutes
    python benchmarks/bench_grid.py --device cuda         # 224 px, batch 32, k = 1 2 4 8
    python benchmarks/bench_grid.py --device cuda --gpu 1 # on another GPU of the machine

On a machine with several GPUs every measurement runs on one of them (`--gpu`, default the
first visible), so "k runs at once" means k on that GPU, not k spread over all of them.

The paper's CXR grid is 360 such runs; the estimate printed is 360 / (runs/hour) at the best k.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PRESETS = {  # per device: input px, batch, phantom patients (~2 images each), epochs, k values
    "cuda": {"image_size": 224, "batch_size": 32, "patients": 140, "epochs": 5,
             "runs": [1, 2, 4, 8]},
    "cpu": {"image_size": 32, "batch_size": 16, "patients": 40, "epochs": 1, "runs": [1, 2]},
}


def pin_to_one_gpu(gpu: str | None = None) -> str:
    """Make this process and the grid's workers see one GPU only: ``gpu`` (an index or UUID as
    nvidia-smi gives them), default the first the grid would use, else 0. Returns it."""
    from sm_utils.grid import visible_gpus

    chosen = str(gpu) if gpu is not None else (visible_gpus() or ["0"])[0]
    os.environ["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"  # CUDA's numbering = nvidia-smi's
    os.environ["CUDA_VISIBLE_DEVICES"] = chosen
    return chosen


class GpuSampler(threading.Thread):
    """Mean utilisation (%) of one GPU from nvidia-smi while the grid runs."""

    def __init__(self, gpu: str):
        super().__init__(daemon=True)
        self.gpu = gpu
        self.samples: list[float] = []
        self.stop = threading.Event()

    def run(self):
        while not self.stop.wait(0.5):
            out = subprocess.run(["nvidia-smi", "-i", self.gpu, "--query-gpu=utilization.gpu",
                                  "--format=csv,noheader,nounits"], capture_output=True, text=True,
                                 check=False)
            values = [float(v) for v in out.stdout.split() if v.strip().replace(".", "").isdigit()]
            if values:
                self.samples.append(sum(values) / len(values))

    def mean(self) -> float | None:
        return sum(self.samples) / len(self.samples) if self.samples else None


def images_of(run_dir: Path) -> int:
    """Images through the model in one run: epochs x (train + val) + the test sets."""
    config = json.loads((run_dir / "config.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    sizes = config["split_sizes"]
    tests = sum(v["n"] for k, v in sizes.items() if k not in ("train", "val"))
    return metrics["epochs_run"] * (sizes["train"]["n"] + sizes["val"]["n"]) + tests


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--runs", type=int, nargs="+", help="runs at once per device")
    parser.add_argument("--cells-per-run", type=int, default=2,
                        help="cells per concurrent slot (cells = k x this)")
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--patients", type=int)
    parser.add_argument("--gpu", help="the GPU to measure on (cuda; default: the first visible)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()
    gpu = pin_to_one_gpu(args.gpu) if args.device == "cuda" else None
    preset = PRESETS[args.device]
    image_size = args.image_size or preset["image_size"]
    batch_size = args.batch_size or preset["batch_size"]
    epochs = args.epochs or preset["epochs"]
    patients = args.patients or preset["patients"]
    ks = args.runs or preset["runs"]

    from sm_utils.datasets import build_dataset
    from sm_utils.grid import load_grid, run_grid
    from sm_utils.manifest import load_manifest

    work = Path(tempfile.mkdtemp(prefix="bench_grid_"))
    build_dataset("phantom_cxr", work / "data", n_patients=patients,
                  image_size=max(128, image_size), n_folds=5, seed=0)
    train = int((load_manifest(work / "data/manifest.csv").table["fold_0"] == "train").sum())
    print(f"device {args.device}" + (f" (GPU {gpu} only)" if gpu else "")
          + f": keras_resnet50 (random init), {image_size} px, batch "
          f"{batch_size}, {epochs} epoch(s), {train} training images, tag at p = 0.5")
    print(f"{'runs at once':>12} {'cells':>6} {'wall s':>8} {'runs/hour':>10} {'img/s':>8} "
          f"{'not training':>13} {'GPU busy':>9}")
    best = 0.0
    for k in ks:
        n_cells = k * args.cells_per_run
        grid = {
            "name": f"bench_k{k}", "runs_dir": str(work / f"runs_k{k}"),
            "datasets": [{"name": "phantom_cxr", "manifest": str(work / "data/manifest.csv")}],
            "confounders": ["tag"], "prevalences": [0.5], "folds": list(range(min(n_cells, 5))),
            "seeds": list(range(1, 1 + -(-n_cells // min(n_cells, 5)))),
            "sources": [{"name": "random", "arch": "keras_resnet50"}],
            "training": {"image_size": image_size, "batch_size": batch_size, "epochs": epochs,
                         "patience": 0, "augment": True, "resize": "nearest"},
            "run": ({"runs_per_gpu": k} if args.device == "cuda"
                    else {"workers": k, "threads_per_worker": 1}) | {"device": args.device,
                                                                    "cells_per_kernel": 64},
        }
        path = work / f"bench_k{k}.yaml"
        path.write_text(yaml.safe_dump(grid))
        spec = load_grid(path)
        sampler = GpuSampler(gpu) if args.device == "cuda" else None
        if sampler:
            sampler.start()
        report = run_grid(spec, analyse=False, progress=False, log=lambda message: None)
        if sampler:
            sampler.stop.set()
        done = [d for d in spec.runs_dir.iterdir() if (d / "metrics.json").exists()]
        wall = report.wall_seconds - report.prepare_seconds - report.analysis_seconds
        runs_per_hour = len(done) / wall * 3600
        images = sum(images_of(d) for d in done) / wall
        best = max(best, runs_per_hour)
        busy = f"{sampler.mean():.0f} %" if sampler and sampler.mean() is not None else "-"
        print(f"{k:>12} {len(done):>6} {wall:>8.1f} {runs_per_hour:>10.1f} {images:>8.1f} "
              f"{100 * report.overhead_share:>12.1f}% {busy:>9}", flush=True)
        if report.failures:
            print("  failures:", report.summary())
    print(f"\nbest: {best:.1f} runs/hour; 360 runs at these settings (the size of the paper's "
          f"CXR grid) would take about {360 / best * 60:.0f} min (an estimate from k = {ks})")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"kept {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
