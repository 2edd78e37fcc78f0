"""Split files in the paper's published formats (test file + per-fold train/val files)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


def paper_style_items(n_patients: int, seed: int = 0, path_prefix: str = "/data/nih/images/"):
    """(path, pid, class, sex) rows; 1-2 images per patient; paths as absolute paths from
    another machine, so only the file name can be matched."""
    rng = np.random.default_rng(seed)
    rows = []
    for pid in range(1, n_patients + 1):
        sex = "MF"[int(rng.integers(2))]
        cls = "YES" if rng.random() < 0.4 else "NO"
        for k in range(int(rng.integers(1, 3))):
            rows.append({"path": f"{path_prefix}{pid:08d}_{k:03d}.png", "pid": pid,
                         "class": cls, "Patient Gender": sex})
    return pd.DataFrame(rows)


def write_paper_splits(
    out_dir: Path, items: pd.DataFrame, n_folds: int = 3, seed: int = 0, sex_format: bool = False,
    overlap_patients: int = 0,
) -> dict:
    """Write test.csv and train_<k>.csv / val_<k>.csv.

    Patients are split test / dev; each fold takes a different val part of dev. With
    ``overlap_patients`` > 0, that many test patients also get one extra image listed in every
    fold's train file (the kind of leakage the paper's sex split has). ``sex_format`` writes
    columns ``path, class, pid, Patient Gender``; otherwise ``path, pid, class``.
    """
    rng = np.random.default_rng(seed)
    pids = np.array(sorted(items["pid"].unique()))
    pids = pids[rng.permutation(len(pids))]
    n_test = max(2, len(pids) // 4)
    test_p, dev_p = pids[:n_test], pids[n_test:]
    columns = ["path", "class", "pid", "Patient Gender"] if sex_format else ["path", "pid", "class"]
    out_dir.mkdir(parents=True, exist_ok=True)
    test = items[items["pid"].isin(test_p)]
    test[columns].to_csv(out_dir / "test.csv", index=False)
    leak = test.drop_duplicates("pid").head(overlap_patients).copy()
    leak["path"] = leak["path"].str.replace(r"_(\d{3})\.png$", "_900.png", regex=True)
    files = {"test": out_dir / "test.csv", "train": [], "val": []}
    for fold, val_p in enumerate(np.array_split(dev_p, n_folds)):
        dev = items[items["pid"].isin(dev_p)]
        val = dev[dev["pid"].isin(val_p)]
        train = pd.concat([dev[~dev["pid"].isin(val_p)], leak])
        train[columns].to_csv(out_dir / f"train_{fold}.csv", index=False)
        val[columns].to_csv(out_dir / f"val_{fold}.csv", index=False)
        files["train"].append(out_dir / f"train_{fold}.csv")
        files["val"].append(out_dir / f"val_{fold}.csv")
    files["leaked_paths"] = sorted(leak["path"])
    files["leaked_patients"] = sorted(str(p) for p in leak["pid"])
    return files


def write_images_for(items_paths, image_root: Path, per_folder: int = 7) -> None:
    """Tiny PNGs named like the listed files, in the NIH provider layout under image_root."""
    from PIL import Image

    for i, listed in enumerate(sorted(set(items_paths))):
        folder = image_root / f"images_{i // per_folder + 1:03d}" / "images"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8), i % 256, dtype=np.uint8)).save(folder / Path(listed).name)
