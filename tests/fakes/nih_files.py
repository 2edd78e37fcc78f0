"""Fake NIH ChestX-ray14 downloads: Data_Entry_2017 CSVs (both variants), PNGs, split lists."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
          "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")
FINDING_CHOICES = ("No Finding", "Atelectasis", "Effusion", "Atelectasis|Effusion",
                   "Cardiomegaly", "Infiltration|Nodule")


@dataclass
class Record:
    image_index: str
    findings: str
    follow_up: int
    patient_id: int
    age: int
    sex: str
    view: str


def synthetic_records(n_patients: int, seed: int = 0, max_images: int = 3) -> list[Record]:
    """Patients with 1..max_images follow-ups each; findings, views and sex drawn at random."""
    rng = np.random.default_rng(seed)
    records = []
    for pid in range(1, n_patients + 1):
        sex = "MF"[int(rng.integers(2))]
        age = int(rng.integers(20, 90))
        for follow in range(int(rng.integers(1, max_images + 1))):
            records.append(Record(
                image_index=f"{pid:08d}_{follow:03d}.png",
                findings=FINDING_CHOICES[int(rng.integers(len(FINDING_CHOICES)))],
                follow_up=follow, patient_id=pid, age=age + follow, sex=sex,
                view="PA" if rng.random() < 0.7 else "AP"))
    return records


def write_data_entry(path: Path, records: list[Record], variant: str = "v2020") -> Path:
    """Write the metadata CSV as the provider does.

    ``"2017"``: ages like "060Y" and a trailing comma on every line (header included);
    ``"v2020"``: integer ages, no trailing comma.
    """
    trail = "," if variant == "2017" else ""
    lines = [HEADER + trail]
    for r in records:
        age = f"{r.age:03d}Y" if variant == "2017" else str(r.age)
        findings = f'"{r.findings}"' if "," in r.findings else r.findings
        lines.append(f"{r.image_index},{findings},{r.follow_up},{r.patient_id},{age},{r.sex},"
                     f"{r.view},2500,2048,0.143,0.143{trail}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def write_pngs(root: Path, records: list[Record], layout: str = "provider", per_folder: int = 10,
               skip: tuple[str, ...] = ()) -> dict[str, Path]:
    """Tiny 8x8 PNGs in ``images_001/images/`` ... (``"provider"``) or ``images/`` (``"flat"``)."""
    paths = {}
    for i, r in enumerate(records):
        if r.image_index in skip:
            continue
        folder = (root / f"images_{i // per_folder + 1:03d}" / "images" if layout == "provider"
                  else root / "images")
        folder.mkdir(parents=True, exist_ok=True)
        pixels = np.full((8, 8), (i * 7) % 256, dtype=np.uint8)
        Image.fromarray(pixels).save(folder / r.image_index)
        paths[r.image_index] = folder / r.image_index
    return paths


def write_official_lists(root: Path, records: list[Record], test_patients: set[int]) -> None:
    """train_val_list.txt / test_list.txt, split by patient like the provider's lists."""
    test = [r.image_index for r in records if r.patient_id in test_patients]
    dev = [r.image_index for r in records if r.patient_id not in test_patients]
    (root / "test_list.txt").write_text("\n".join(test) + "\n")
    (root / "train_val_list.txt").write_text("\n".join(dev) + "\n")


def make_nih_root(root: Path, n_patients: int = 40, variant: str = "v2020",
                  layout: str = "provider", seed: int = 0, skip: tuple[str, ...] = ()):
    records = synthetic_records(n_patients, seed)
    name = "Data_Entry_2017_v2020.csv" if variant == "v2020" else "Data_Entry_2017.csv"
    write_data_entry(root / name, records, variant)
    write_pngs(root, records, layout, skip=skip)
    return records
