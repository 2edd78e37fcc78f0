"""A full-size rehearsal of the data steps: NIH ChestX-ray14's 112,120 images, generated.

    .venv/bin/python benchmarks/bench_full_size.py            # about 15 min on 2 cores, 2.5 GB
    .venv/bin/python benchmarks/bench_full_size.py --px 256   # closer to NIH's files, 4x the disk

The provider's layout at full size: a ``Data_Entry_2017_v2020.csv`` of 112,120 rows (30,805
patients, NIH-like findings, sex, views and ages; generated, as in
``benchmarks/bench_data_steps.py``) and 112,120 PNGs in ``images_001/images`` ..
``images_012/images`` (phantom radiographs of ``--px`` pixels, shifted copies of
``--bases`` renderings so every file differs). Then every data step a first grid on the real
download meets runs over all of it, each timed (wall and CPU seconds, this process and its
children) with the peak resident memory so far:

- ``read_metadata`` and ``index_images`` (the 12 folders);
- ``build_dataset("nih_cxr14")`` (Atelectasis against No Finding, PA and AP) the first time,
  which checks every listed image (``sm_utils.datasets.image_check``, every core), and
  ``build_dataset("nih_sex_task")`` after it (the checks remembered);
- the image cache of the ``nih_cxr14`` manifest at ``--px`` (every core);
- the speed-up of the parallel steps: the check and the cache on ``--speedup-images`` files with
  one worker and with every core.

NIH's own files are 1024 px PNGs (about 370 kB): decoding them costs more than these, and the
checks and the cache scale with the bytes read; the benchmark says what it measured, and
README's full-scale figures come from it. Results go to ``--out`` (JSON) as well.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

# isort: off
import sm_utils  # noqa: F401  (before numpy and torch: pins the CPU numerics)
# isort: on
import numpy as np
import pandas as pd
from PIL import Image

from sm_utils.data import ImageCache
from sm_utils.datasets import build_dataset
from sm_utils.datasets.image_check import check_images
from sm_utils.datasets.nih import index_images, read_metadata
from sm_utils.manifest import Manifest
from sm_utils.phantoms import render_cxr, sample_patient
from sm_utils.progress import available_cpus, parallel_map

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_data_steps",
                                               ROOT / "benchmarks" / "bench_data_steps.py")
steps = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(steps)  # its full-size metadata table and the provider's folder sizes

RESULTS: list[dict] = []


def peak_mb() -> tuple[float, float]:
    """Peak resident memory so far (MB): this process, and its largest child."""
    self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return self_kb / 1024, children_kb / 1024


def cpu_seconds() -> float:
    own, children = (resource.getrusage(who) for who in (resource.RUSAGE_SELF,
                                                        resource.RUSAGE_CHILDREN))
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(label: str, fn, *args, **kwargs):
    start, cpu = time.perf_counter(), cpu_seconds()
    out = fn(*args, **kwargs)
    wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    own, child = peak_mb()
    RESULTS.append({"step": label, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
                    "peak_rss_mb": round(own), "peak_child_rss_mb": round(child)})
    print(f"{label:<62} {wall:8.1f} s  (cpu {cpu:8.1f} s; peak RSS {own:6.0f} MB, "
          f"child {child:5.0f} MB)", flush=True)
    return out


def _base(args: tuple[int, int]) -> np.ndarray:
    index, px = args
    return render_cxr(sample_patient(14, index), size=px, finding=bool(index % 2),
                      difficulty=0.6, rng=np.random.default_rng(index))


_BASES: list[np.ndarray] = []


def _write(job: tuple[int, str]) -> int:
    index, path = job
    base = _BASES[index % len(_BASES)]
    shift = np.random.default_rng(index).integers(-6, 7, 2)
    Image.fromarray(np.roll(base, tuple(shift), axis=(0, 1))).save(path, format="PNG")
    return os.path.getsize(path)


def write_pngs(root: Path, names: list[str], px: int, n_bases: int) -> float:
    """The provider's 12 folders of PNGs; returns the mean file size in bytes."""
    global _BASES
    _BASES = parallel_map(_base, [(i, px) for i in range(n_bases)], desc="phantom bases",
                          unit="image")
    jobs, start = [], 0
    for k, count in enumerate(steps.NIH_FOLDERS, start=1):
        folder = root / f"images_{k:03d}" / "images"
        folder.mkdir(parents=True)
        jobs += [(start + i, str(folder / name))
                 for i, name in enumerate(names[start:start + count])]
        start += count
    sizes = parallel_map(_write, jobs, desc=f"writing {len(jobs):,} PNGs", unit="image",
                         chunksize=256)  # forked workers see _BASES
    return float(np.mean(sizes))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--px", type=int, default=128, help="side of the generated PNGs (128)")
    parser.add_argument("--images", type=int, default=steps.NIH_IMAGES,
                        help="rows of the metadata kept (112,120: all; fewer for a quick try)")
    parser.add_argument("--bases", type=int, default=64, help="distinct renderings (64)")
    parser.add_argument("--speedup-images", type=int, default=10_000,
                        help="files the one-worker / every-core comparison reads (10,000)")
    parser.add_argument("--folder", help="where to write the data set (default: a temporary "
                                         "folder, removed at the end)")
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench_full_size.json"))
    args = parser.parse_args()
    cores = available_cpus()
    tmp = Path(args.folder or tempfile.mkdtemp(prefix="sm-full-size-"))
    tmp.mkdir(parents=True, exist_ok=True)
    os.environ["SM_CACHE_DIR"] = str(tmp / "cache")  # the checks' memo and the image cache
    print(f"{platform.processor() or platform.machine()}, {cores} cores usable, load "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; data in {tmp}")
    try:
        root = tmp / "nih"
        root.mkdir(exist_ok=True)
        records = steps.nih_records().iloc[: args.images]
        steps.write_data_entry(root / "Data_Entry_2017_v2020.csv", records)
        names = records["Image Index"].tolist()
        start = time.perf_counter()
        mean_size = write_pngs(root, names, args.px, args.bases)
        print(f"(wrote {len(names):,} PNGs of {args.px} px, mean {mean_size / 1e3:.1f} kB, in "
              f"{time.perf_counter() - start:.0f} s; not timed)\n")

        timed(f"read_metadata, {len(names):,} rows", read_metadata,
              root / "Data_Entry_2017_v2020.csv")
        timed(f"index_images, {len(names):,} PNGs in 12 folders", index_images, root)
        manifest = timed("build_dataset nih_cxr14 (first: checks every image)", build_dataset,
                         "nih_cxr14", tmp / "out_cxr14", root=root)
        if len(names) == steps.NIH_IMAGES:  # its pools need the full data set
            timed("build_dataset nih_sex_task (checks remembered)", build_dataset,
                  "nih_sex_task", tmp / "out_sex", root=root)
        timed(f"image cache at {args.px} px, {len(manifest.table):,} images, every core",
              ImageCache.for_manifest, manifest, args.px, tmp / "cache" / "full")

        n = min(args.speedup_images, len(names))
        paths = [str(root / p) for p in manifest.table["path"].iloc[:n]]
        sample = Manifest(table=manifest.table.iloc[:n].reset_index(drop=True), root=root)
        seconds = {}
        for workers in sorted({1, cores}):
            start = time.perf_counter()
            timed(f"check_images, {n:,} files, {workers} worker(s)", check_images, paths,
                  workers=workers, progress=False)
            seconds["check_images", workers] = time.perf_counter() - start
            start = time.perf_counter()
            timed(f"image cache at {args.px} px, {n:,} images, {workers} thread(s)",
                  ImageCache.for_manifest, sample, args.px, tmp / "cache" / f"w{workers}",
                  threads=workers, progress=False)
            seconds["image cache", workers] = time.perf_counter() - start
        for what in ("check_images", "image cache"):
            speedup = seconds[what, 1] / seconds[what, cores]
            RESULTS.append({"step": f"speed-up of {what} on {cores} cores", "ratio": round(speedup, 2)})
            print(f"speed-up of {what} on {cores} cores: {speedup:.2f}x")
    finally:
        if not args.folder:
            shutil.rmtree(tmp, ignore_errors=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": datetime.date.today().isoformat(), "cores": cores,
                               "px": args.px, "images": len(names), "steps": RESULTS},
                              indent=1))
    print(f"\nresults in {out}")
    print(pd.DataFrame(RESULTS).to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
