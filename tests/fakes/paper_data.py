"""Everything a user downloads to rerun the paper, in the providers' own formats, small.

- NIH ChestX-ray14: ``Data_Entry_2017_v2020.csv`` and PNGs in ``images_001/images/`` ...
  (phantom radiographs, so the images look like chest X-rays at any size);
- the paper's published split files for its main task, exactly as its repository has them
  (``data/chest14/test.csv``, ``train_fold1..5.csv``, ``val_fold1..5.csv``: a leading unnamed
  index column, then ``path, pid, class`` with YES/NO);
- LIDC-IDRI: DICOM series written with pydicom and an annotation table
  (:mod:`fakes.lidc_files`);
- Keras ResNet50 weight files for ImageNet and RadImageNet (:mod:`fakes.keras_h5`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from .keras_h5 import IMAGENET_NOTOP_NAME, RADIMAGENET_NOTOP_NAME, write_keras_resnet50_h5
from .lidc_files import make_lidc_root
from .nih_files import Record, write_data_entry


def write_nih(root: Path, n_patients: int = 160, size: int = 128, seed: int = 0) -> list[Record]:
    """One PA image per patient, sex and finding (Atelectasis / No Finding) balanced, drawn
    as phantom radiographs of ``size`` px (NIH's are 1024 px; everything scales)."""
    from sm_utils.phantoms import render_cxr, sample_patient

    records = []
    for pid in range(1, n_patients + 1):
        finding = ("Atelectasis", "No Finding")[(pid // 2) % 2]
        records.append(Record(f"{pid:08d}_000.png", finding, 0, pid, 30 + pid % 50,
                              "MF"[pid % 2], "PA"))
    write_data_entry(root / "Data_Entry_2017_v2020.csv", records, "v2020")
    for i, record in enumerate(records):
        folder = root / f"images_{i // 100 + 1:03d}" / "images"
        folder.mkdir(parents=True, exist_ok=True)
        patient = sample_patient(seed, record.patient_id)
        pixels = render_cxr(patient, size=size, finding=record.findings == "Atelectasis",
                            difficulty=0.3, rng=np.random.default_rng([seed, i]))
        Image.fromarray(pixels).save(folder / record.image_index)
    return records


def write_paper_splits(folder: Path, records: list[Record], n_test: int = 16, n_folds: int = 5,
                       n_val: int = 5, seed: int = 0) -> Path:
    """The paper's main-task split files, in its format, over the first images of ``records``
    (as the paper's, a fixed test set and per fold a train/val split of the rest)."""
    rng = np.random.default_rng(seed)
    items = pd.DataFrame({"path": [r.image_index for r in records[:56]],
                          "pid": [r.patient_id for r in records[:56]],
                          "class": ["YES" if r.findings == "Atelectasis" else "NO"
                                    for r in records[:56]]})
    order = rng.permutation(len(items))
    test, dev = items.iloc[order[:n_test]], items.iloc[order[n_test:]]
    folder.mkdir(parents=True, exist_ok=True)
    test.reset_index(drop=True).to_csv(folder / "test.csv")  # index column, as the paper's
    for fold in range(1, n_folds + 1):
        val = dev.sample(n=n_val, random_state=int(seed + fold))
        dev.drop(val.index).reset_index(drop=True).to_csv(folder / f"train_fold{fold}.csv")
        val.reset_index(drop=True).to_csv(folder / f"val_fold{fold}.csv")
    return folder


def write_keras_weights(folder: Path) -> dict[str, Path]:
    """Random-weight ImageNet and RadImageNet ResNet50 files under their published names."""
    folder.mkdir(parents=True, exist_ok=True)
    return {"imagenet_keras": write_keras_resnet50_h5(folder / IMAGENET_NOTOP_NAME, seed=1),
            "radimagenet": write_keras_resnet50_h5(folder / RADIMAGENET_NOTOP_NAME, seed=2)}


def write_lidc(root: Path, n_patients: int = 16, seed: int = 0) -> Path:
    """LIDC-IDRI DICOM series (TCIA layout) and their annotation table; returns the table."""
    _, table = make_lidc_root(root, n_patients=n_patients, seed=seed)
    return table
