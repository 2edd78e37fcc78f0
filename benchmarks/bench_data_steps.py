"""Seconds taken by the long data steps at realistic size, on this machine (issue 14).

    .venv/bin/python benchmarks/bench_data_steps.py                      # a few minutes
    .venv/bin/python benchmarks/bench_data_steps.py --nih-images 5000 --lidc-series 8 \\
        --confounder-images 50 --ct-images 5                            # larger samples

What is timed, on generated files in a temporary folder (removed at the end):

- NIH ChestX-ray14: ``--nih-images`` (1,000) 1024 px PNGs in the provider layout
  (``images_001/images/``, made from phantom radiographs, :func:`sm_utils.phantoms.render_cxr`),
  and a full-size 112,120-row ``Data_Entry_2017_v2020.csv`` (30,805 patients). Timed:
  ``read_metadata`` on the full CSV; ``index_images`` on the PNG folder and on a full-size tree
  of 112,120 empty ``*.png`` files in 12 folders (names only matter to it); (the two NIH
  builders, which check every image, at full size: ``benchmarks/bench_full_size.py``);
  ``ImageCache.for_manifest`` at 224 px
  with ``resize="nearest"`` and ``"bilinear"`` (default 4 threads) on the PNGs.
- LIDC-IDRI: ``--lidc-series`` (4) CT series of ``--slices`` (200) 512 x 512 int16 slices
  written with pydicom (phantom CT, :func:`sm_utils.phantoms.render_ct_hu`) in the TCIA layout,
  with 3 annotated nodules each. Timed: ``find_series``, ``read_series`` (headers of one
  series), the nodule slice PNGs of one series (read the slice, window, write), and the whole
  ``lidc_idri`` builder from an annotation table.
- Memoised confounder fills (``ConfoundedImageDataset`` with ``conf.with_cache``, which is
  ``Confounder.prepare`` per image plus the digest of the stored file): ``lowpass`` on the
  1024 px PNGs, ``xray_noise`` (acts at 512 px) on the same, ``ct_noise`` on 512 px CT slice
  PNGs; a first (cold) fill and a second one that reads the cache.

Numbers are wall-clock seconds of one run (no repeats: the steps are long and the files are
then in the page cache, as they are on a machine that just downloaded or built them).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

# isort: off
import sm_utils  # noqa: F401  (before numpy and torch: pins the CPU numerics)
# isort: on
import numpy as np
import pandas as pd
from PIL import Image
from pydicom.uid import generate_uid

from sm_utils.confounders import get_confounder
from sm_utils.data import ConfoundedImageDataset, ImageCache
from sm_utils.datasets import build_dataset
from sm_utils.datasets.lidc import find_series, read_series, write_slice
from sm_utils.datasets.nih import index_images, read_metadata
from sm_utils.manifest import Manifest
from sm_utils.phantoms import render_ct_hu, render_cxr, sample_patient, window_to_uint8

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.fakes.lidc_files import write_ct_slice  # the tests' DICOM writer

NIH_IMAGES, NIH_PATIENTS = 112_120, 30_805
# images per provider folder images_001 .. images_012
NIH_FOLDERS = (4_999, *(10_000,) * 10, 7_121)
LIDC_SERIES = 1_010  # one per patient (a few patients have two)
# annotated nodules of each generated series: (slice, row, column, ratings of the readers)
NODULES = ((40, 150, 160, (4, 5, 4)), (100, 300, 340, (1, 2)), (160, 250, 120, (5, 4, 5, 4)))
FINDINGS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Emphysema",
            "Fibrosis", "Hernia", "Infiltration", "Mass", "Nodule", "Pleural_Thickening",
            "Pneumonia", "Pneumothorax")
# rough share of images with each finding in ChestX-ray14 (Infiltration most, Hernia least)
FINDING_WEIGHTS = np.array([10.3, 2.5, 4.2, 2.1, 11.9, 2.2, 1.5, 0.2, 17.7, 5.2, 5.6, 3.0,
                            1.3, 4.7])
RESULTS: dict[str, float] = {}


def timed(label: str, fn, *args, per: float | None = None, unit: str = "", **kwargs):
    """Run ``fn`` once; print and record its wall-clock and CPU seconds (this process, all
    threads), and wall seconds per ``unit`` if ``per``. On a shared machine the CPU seconds
    say more: other work slows the wall clock, not the CPU time a step needs."""
    start, cpu = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    RESULTS[label] = seconds
    RESULTS[f"{label} [cpu]"] = cpu
    extra = f"   ({seconds / per:.4f} s per {unit})" if per else ""
    print(f"{label:<64} {seconds:8.2f} s (cpu {cpu:7.2f} s){extra}", flush=True)
    return out


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


# --- NIH ------------------------------------------------------------------------------

def nih_records(seed: int = 0) -> pd.DataFrame:
    """A full-size metadata table with NIH-like patients, findings, sex, views and ages."""
    rng = np.random.default_rng(seed)
    counts = 1 + rng.multinomial(NIH_IMAGES - NIH_PATIENTS, rng.dirichlet(np.full(NIH_PATIENTS, 0.3)))
    patient = np.repeat(np.arange(1, NIH_PATIENTS + 1), counts)
    follow = np.concatenate([np.arange(c) for c in counts])
    sex = np.where(rng.random(NIH_PATIENTS) < 0.56, "M", "F")[patient - 1]
    age = (rng.integers(10, 85, NIH_PATIENTS)[patient - 1] + follow // 10).clip(1, 95)
    labels = []
    weights = FINDING_WEIGHTS / FINDING_WEIGHTS.sum()
    for _ in range(NIH_IMAGES):
        if rng.random() < 0.538:
            labels.append("No Finding")
        else:
            k = 1 + min(int(rng.geometric(0.6)) - 1, 3)
            labels.append("|".join(sorted(rng.choice(FINDINGS, k, replace=False, p=weights))))
    return pd.DataFrame({
        "Image Index": [f"{p:08d}_{f:03d}.png" for p, f in zip(patient, follow)],
        "Finding Labels": labels, "Follow-up #": follow, "Patient ID": patient,
        "Patient Age": age, "Patient Gender": sex,
        "View Position": np.where(rng.random(NIH_IMAGES) < 0.6, "PA", "AP"),
    })


def write_data_entry(path: Path, records: pd.DataFrame) -> None:
    """``Data_Entry_2017_v2020.csv`` as the provider writes it (bracketed two-field headers)."""
    header = (",".join(records.columns) + ",OriginalImage[Width,Height],"
              "OriginalImagePixelSpacing[x,y]")
    lines = [header]
    for row in records.itertuples(index=False):
        lines.append(",".join(map(str, row)) + ",2500,2048,0.143,0.143")
    path.write_text("\n".join(lines) + "\n")


def _render_base(index: int) -> np.ndarray:
    patient = sample_patient(14, index)
    return render_cxr(patient, size=1024, finding=bool(index % 2), difficulty=0.6,
                      rng=np.random.default_rng(index))


def _write_shifted(args) -> int:
    """One PNG: a base radiograph shifted by a few pixels (every file differs)."""
    base, path, seed = args
    rng = np.random.default_rng(seed)
    shifted = np.roll(base, tuple(rng.integers(-24, 25, 2)), axis=(0, 1))
    Image.fromarray(shifted).save(path, format="PNG")
    return path.stat().st_size


def write_nih_pngs(root: Path, names: list[str], n_bases: int, workers: int) -> float:
    """1024 px PNGs named ``names`` in ``root/images_001/images/``; returns the mean file size."""
    folder = root / "images_001" / "images"
    folder.mkdir(parents=True)
    with ProcessPoolExecutor(workers) as pool:
        bases = list(pool.map(_render_base, range(n_bases)))
        jobs = [(bases[i % n_bases], folder / name, i) for i, name in enumerate(names)]
        sizes = list(pool.map(_write_shifted, jobs, chunksize=16))
    return float(np.mean(sizes))


def write_empty_tree(root: Path, names: list[str]) -> None:
    """The provider's 12 image folders holding ``names`` as empty files."""
    start = 0
    for k, count in enumerate(NIH_FOLDERS, start=1):
        folder = root / f"images_{k:03d}" / "images"
        folder.mkdir(parents=True)
        for name in names[start:start + count]:
            (folder / name).touch()
        start += count


def bench_nih(tmp: Path, args) -> tuple[Path, list[str]]:
    print(f"\n== NIH ChestX-ray14 ({args.nih_images} PNGs of 1024 px; full-size metadata) ==")
    records = nih_records()
    full = tmp / "nih_full"
    full.mkdir()
    write_data_entry(full / "Data_Entry_2017_v2020.csv", records)
    size_mb = (full / "Data_Entry_2017_v2020.csv").stat().st_size / 1e6
    timed(f"read_metadata, {NIH_IMAGES:,} rows ({size_mb:.1f} MB)", read_metadata,
          full / "Data_Entry_2017_v2020.csv")
    names = records["Image Index"].tolist()
    write_empty_tree(full, names)
    timed(f"index_images, {NIH_IMAGES:,} files in 12 folders", index_images, full,
          per=NIH_IMAGES / 1000, unit="1,000 files")
    # the builders now check every image they list: timed on real files at full size by
    # benchmarks/bench_full_size.py
    shutil.rmtree(full)

    root = tmp / "nih"
    # a random sample of image names, so the PNG folder is a slice of the full one
    sample = sorted(np.random.default_rng(1).choice(names, args.nih_images, replace=False))
    start = time.perf_counter()
    mean_size = write_nih_pngs(root, sample, args.bases, args.workers)
    print(f"(wrote {args.nih_images} PNGs of 1024 px, mean {mean_size / 1e3:.0f} kB, in "
          f"{time.perf_counter() - start:.1f} s; ChestX-ray14's average is about 370 kB)")
    per = args.nih_images / 1000
    timed(f"index_images, {args.nih_images} PNGs", index_images, root, per=per,
          unit="1,000 images")
    rel = [f"images_001/images/{n}" for n in sample]
    manifest = Manifest(table=pd.DataFrame({"image_id": sample, "path": rel,
                                            "label": np.arange(len(sample)) % 2}), root=root)
    timed(f"ImageCache.key (stat every file), {args.nih_images} PNGs", ImageCache.key,
          manifest, 224, "nearest", per=per, unit="1,000 images")
    for resize in ("nearest", "bilinear"):
        timed(f"ImageCache.for_manifest 224 px {resize}, {args.nih_images} PNGs",
              ImageCache.for_manifest, manifest, 224, tmp / "cache", resize=resize,
              per=per, unit="1,000 images")
    timed("ImageCache.for_manifest again (cache exists)", ImageCache.for_manifest, manifest,
          224, tmp / "cache", resize="bilinear")
    start = time.perf_counter()
    patient = sample_patient(0, 3)
    for i in range(3):
        render_cxr(patient, size=1024, finding=True, difficulty=0.6, rng=np.random.default_rng(i))
    RESULTS["render_cxr 1024 px, per image"] = (time.perf_counter() - start) / 3
    print(f"{'render_cxr 1024 px (phantom builder at 1024 px), per image':<64} "
          f"{RESULTS['render_cxr 1024 px, per image']:8.2f} s")
    return root, rel


# --- LIDC-IDRI ------------------------------------------------------------------------

def write_series(folder: Path, patient_id: str, n_slices: int, seed: int) -> str:
    """One CT series as TCIA stores it: 512 x 512 int16 slices, 1.25 mm apart, file names
    not in position order. Returns its SeriesInstanceUID."""
    rng = np.random.default_rng(seed)
    patient = sample_patient(seed, 0)
    planes = [render_ct_hu(patient, size=512, finding=True, difficulty=0.5,
                           rng=np.random.default_rng([seed, k])) for k in range(4)]
    series_uid, study_uid = generate_uid(), generate_uid()
    folder.mkdir(parents=True)
    names = rng.permutation(n_slices)
    for k in range(n_slices):
        hu = planes[k % 4] + rng.normal(0.0, 15.0, (512, 512))
        write_ct_slice(folder / f"1-{int(names[k]) + 1:03d}.dcm",
                       np.round(hu + 1024.0).astype(np.int16), patient_id=patient_id,
                       study_uid=study_uid, series_uid=series_uid, instance=int(names[k]) + 1,
                       position=(-180.0, -180.0, -300.0 + 1.25 * k), pixel_spacing=0.7,
                       thickness=1.25, slope=1.0, intercept=-1024.0)
    return series_uid


def bench_lidc(tmp: Path, args) -> Path:
    print(f"\n== LIDC-IDRI ({args.lidc_series} series of {args.slices} slices, 512 x 512) ==")
    root = tmp / "lidc" / "LIDC-IDRI"
    rows = []
    start = time.perf_counter()
    for i in range(1, args.lidc_series + 1):
        pid = f"LIDC-IDRI-{i:04d}"
        uid = write_series(root / pid / f"01-01-2000-{i}" / f"3000{i}.000000-{i}", pid,
                           args.slices, seed=i)
        for s, r, c, ratings in NODULES:  # two malignant nodules and a benign one
            for reader, rating in enumerate(ratings):
                rows.append({"patient_id": pid, "series_uid": uid, "reader": f"r{reader}",
                             "malignancy": rating, "centroid_slice": s + 0.2 * reader,
                             "centroid_row": r - reader, "centroid_col": c + reader})
    table = tmp / "lidc" / "annotations.csv"
    pd.DataFrame(rows).to_csv(table, index=False)
    print(f"(wrote {args.lidc_series * args.slices} DICOM files in "
          f"{time.perf_counter() - start:.1f} s)")
    per = args.lidc_series
    series = timed(f"find_series, {args.lidc_series} series", find_series, root, per=per,
                   unit="series")
    files = next(iter(series.values()))
    volume = timed(f"read_series, one series of {len(files)} slices (headers)", read_series, files)
    nodules = pd.DataFrame([{"nodule": k, "slice_index": s, "centroid_row": float(r),
                             "centroid_col": float(c)} for k, (s, r, c, _) in enumerate(NODULES)])

    def write_nodules():
        for _, nodule in nodules.iterrows():
            write_slice(tmp / "lidc" / "png" / f"n{int(nodule['nodule'])}.png",
                        volume.slice_hu(int(nodule["slice_index"])))
    timed("nodule slices as 16-bit HU PNGs, one series (3 nodules)", write_nodules, per=3,
          unit="nodule")
    out = tmp / "lidc" / "built"
    timed(f"build_dataset 'lidc_idri', {args.lidc_series} series (table annotations)",
          build_dataset, "lidc_idri", out, root=root, annotations=table, n_folds=1, test_fraction=0.5, val_fraction=0.5, per=per, unit="series")
    return out


# --- confounders ----------------------------------------------------------------------

def fill(label: str, conf, rows: pd.DataFrame, cache: ImageCache, root: Path, cache_dir: Path):
    memo = conf.with_cache(cache_dir)
    for attempt in ("cold", "warm"):
        timed(f"{label}, {len(rows)} img, {attempt}", ConfoundedImageDataset, rows, cache,
              confounder=memo, seed=0, root=root, resize="bilinear", per=len(rows), unit="image")


def bench_confounders(tmp: Path, nih_root: Path, nih_rel: list[str], args) -> None:
    print("\n== memoised confounder fills (first fill = cold, second = from the cache) ==")
    n = min(args.confounder_images, len(nih_rel))
    ids = [Path(p).name for p in nih_rel]
    cache = ImageCache.for_manifest(
        Manifest(table=pd.DataFrame({"image_id": ids, "path": nih_rel}), root=nih_root), 224,
        tmp / "cache", resize="bilinear")
    rows = pd.DataFrame({"image_id": ids[:n], "path": nih_rel[:n], "label": 1})
    fill("lowpass, 1024 px PNGs, confounded", get_confounder("lowpass"),
         rows.assign(confounded=True), cache, nih_root, tmp / "memo")
    fill("xray_noise (512 px), 1024 px PNGs, confounded", get_confounder("xray_noise"),
         rows.assign(confounded=True), cache, nih_root, tmp / "memo")
    fill("xray_noise (512 px), 1024 px PNGs, baseline", get_confounder("xray_noise"),
         rows.assign(confounded=False), cache, nih_root, tmp / "memo")

    ct_root = tmp / "ct_png"
    (ct_root / "images").mkdir(parents=True)
    ct_ids = [f"ct{i}" for i in range(args.ct_images)]
    for i, image_id in enumerate(ct_ids):
        hu = render_ct_hu(sample_patient(5, i), size=512, finding=True, difficulty=0.5,
                          rng=np.random.default_rng(i))
        Image.fromarray(window_to_uint8(hu)).save(ct_root / "images" / f"{image_id}.png")
    ct_rows = pd.DataFrame({"image_id": ct_ids, "path": [f"images/{i}.png" for i in ct_ids],
                            "label": 1})
    ct_cache = ImageCache.for_manifest(Manifest(table=ct_rows, root=ct_root), 224, tmp / "cache")
    for confounded, what in ((True, "confounded"), (False, "baseline")):
        fill(f"ct_noise, 512 px slices, {what}", get_confounder("ct_noise"),
             ct_rows.assign(confounded=confounded), ct_cache, ct_root, tmp / "memo")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nih-images", type=int, default=1000, help="1024 px PNGs (1000)")
    parser.add_argument("--bases", type=int, default=8,
                        help="distinct phantom radiographs the PNGs are shifted copies of (8)")
    parser.add_argument("--lidc-series", type=int, default=4, help="CT series, >= 4 (4)")
    parser.add_argument("--slices", type=int, default=200, help="slices per series (200)")
    parser.add_argument("--confounder-images", type=int, default=20,
                        help="images per lowpass / xray_noise fill (20)")
    parser.add_argument("--ct-images", type=int, default=2, help="slices per ct_noise fill (2)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="processes writing the PNGs (not timed)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["nih", "lidc", "confounders"])
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    parser.add_argument("--tmp", type=Path, help="work folder (default: a new temporary one)")
    args = parser.parse_args()
    if args.lidc_series < 4 or args.slices < 170:
        parser.error("--lidc-series must be >= 4 (the builder's splits) and --slices >= 170 "
                     "(the nodules lie on slices 40, 100 and 160)")
    print(f"{datetime.date.today()}  {platform.node()}  {os.cpu_count()} CPU cores  "
          f"python {platform.python_version()}  {load()}")
    tmp = Path(tempfile.mkdtemp(prefix="bench_data_", dir=args.tmp))
    try:
        nih_root = nih_rel = None
        if "nih" not in args.skip or "confounders" not in args.skip:
            nih_root, nih_rel = bench_nih(tmp, args)
        if "lidc" not in args.skip:
            bench_lidc(tmp, args)
        if "confounders" not in args.skip:
            bench_confounders(tmp, nih_root, nih_rel, args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\nat the end: {load()} (on {os.cpu_count()} cores; above that, others were "
          "running too and the wall-clock times are inflated)")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "seconds": RESULTS}, indent=2) + "\n")


if __name__ == "__main__":
    main()
