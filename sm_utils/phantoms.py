"""Synthetic medical images ("phantoms") that stand in for real data when none is present.

Two modalities, both rendered analytically on a normalised coordinate grid, so any size from
64 to 1024 px gives the same anatomy:

- chest radiographs (``render_cxr``): soft tissue, two lung fields, mediastinum and heart shadow,
  spine, ribs, clavicles, a diaphragm and acquisition blur/noise. The finding is an
  atelectasis-like opacity: a dense lower-lobe region with volume loss (raised hemidiaphragm,
  mediastinal shift towards it).
- lung CT slices (``render_ct``, in Hounsfield units, windowed to 8 bit): body outline,
  subcutaneous fat, lungs with vessels, mediastinum, aorta, vertebra, table, and one nodule
  that is benign-looking (small, round, smooth, sometimes calcified) or malignant-looking
  (larger, lobulated, spiculated).

Sex and age change the anatomy in ways a model can learn, as they do in real images: women
have breast shadows (CXR) or breast tissue and more subcutaneous fat (CT) and smaller thoraces;
age enlarges the heart, thins the bones and lowers lung density. This makes sex a real sampled
confounder for the sex task. ``difficulty`` in [0, 1] controls how visible the finding is.

Every image is a pure function of (seed, patient index, image index), so generation is
deterministic and can run in any order.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from scipy import ndimage

from .manifest import Manifest, ManifestError
from .splits import make_splits

MIN_SIZE, MAX_SIZE = 64, 1024
MODALITIES = ("cxr", "ct")
# Default difficulty per modality: a small CNN trained briefly reaches a clean test AUC of
# about 0.86 (CXR) and 0.81 (CT) at 64 px (benchmarks/phantom_learnability.py).
DEFAULT_DIFFICULTY = {"cxr": 0.6, "ct": 0.5}
# Lung window (centre -600 HU, width 1500 HU), the usual default for nodule reading.
LUNG_WINDOW = (-600.0, 1500.0)


@dataclass(frozen=True)
class Patient:
    """Patient-level anatomy shared by all images of one synthetic patient."""

    patient_index: int
    sex: str  # "F" or "M"
    age: int
    thorax_width: float
    lung_height: float
    heart_size: float
    bone_density: float
    fat: float
    finding_side: int  # -1 image left, +1 image right (CXR) / which lung holds the nodule (CT)


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(k) for k in keys]))


def _check_size(size: int) -> None:
    if not isinstance(size, (int, np.integer)) or not MIN_SIZE <= size <= MAX_SIZE:
        raise ManifestError(
            f"image size must be an integer from {MIN_SIZE} to {MAX_SIZE} px; got {size!r}."
        )


def _check_difficulty(difficulty: float) -> None:
    if not 0.0 <= difficulty <= 1.0:
        raise ManifestError(f"difficulty must be in [0, 1]; got {difficulty}.")


def sample_patient(seed: int, patient_index: int) -> Patient:
    """Draw one patient's anatomy; sex and age set the means, the rest is individual variation."""
    rng = _rng(seed, patient_index, 0)
    sex = "F" if rng.random() < 0.5 else "M"
    age = int(np.clip(rng.normal(55, 15), 18, 90))
    older = (age - 55) / 15.0
    female = sex == "F"
    return Patient(
        patient_index=patient_index,
        sex=sex,
        age=age,
        thorax_width=float(rng.normal(0.80 if female else 0.90, 0.03)),
        lung_height=float(rng.normal(0.56 if female else 0.62, 0.03)),
        heart_size=float(np.clip(rng.normal(0.20 + 0.015 * older + (0.0 if female else 0.015), 0.02), 0.14, 0.3)),
        bone_density=float(np.clip(rng.normal(1.0 - 0.12 * older - (0.08 if female else 0.0), 0.08), 0.4, 1.4)),
        fat=float(np.clip(rng.normal(0.10 if female else 0.06, 0.02), 0.02, 0.2)),
        finding_side=int(rng.choice([-1, 1])),
    )


def _grid(size: int, rng: np.random.Generator, jitter: float) -> tuple[np.ndarray, np.ndarray]:
    """Normalised (y, x) coordinates in [-1, 1], with a small per-image pose change."""
    axis = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
    y, x = np.meshgrid(axis, axis, indexing="ij")
    angle = rng.normal(0, 0.03 * jitter)
    dy, dx = rng.normal(0, 0.02 * jitter, 2)
    c, s = np.cos(angle), np.sin(angle)
    return (c * y - s * x + dy).astype(np.float32), (s * y + c * x + dx).astype(np.float32)


def _ellipse(y, x, cy, cx, ry, rx, softness):
    """Soft-edged ellipse mask in [0, 1] (softness in normalised units)."""
    r = np.sqrt(((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2)
    edge = softness / max(min(ry, rx), 1e-3)
    return np.clip((1 - r) / edge + 0.5, 0, 1)


def _blur(image: np.ndarray, sigma_norm: float) -> np.ndarray:
    return ndimage.gaussian_filter(image, sigma=sigma_norm * image.shape[0] / 2)


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)


# --- chest radiograph ---------------------------------------------------------------------

def render_cxr(
    patient: Patient, *, size: int, finding: bool, difficulty: float, rng: np.random.Generator,
) -> np.ndarray:
    """Render one frontal chest radiograph (uint8, size x size). Bright = dense."""
    _check_size(size)
    _check_difficulty(difficulty)
    y, x = _grid(size, rng, jitter=1.0)
    soft = 0.012
    w = patient.thorax_width
    lung_h = patient.lung_height
    side = patient.finding_side
    # Finding parameters are drawn for every image, so an image with and without the finding
    # share pose, anatomy and noise (the random stream does not depend on the label).
    lesion = {"scale": rng.uniform(0.6, 1.2), "cy": rng.uniform(0.15, 0.40),
              "cx": rng.uniform(0.32, 0.50), "ry": rng.uniform(0.12, 0.22),
              "rx": rng.uniform(0.10, 0.18)}
    lesion_texture = _blur(rng.normal(0, 1, (size, size)).astype(np.float32), 0.04)
    strength = (1.0 - 0.85 * difficulty) * float(lesion["scale"]) if finding else 0.0

    img = np.full((size, size), 0.04, np.float32)
    body = _ellipse(y, x, 0.15, 0.0, 1.05, w, soft * 2)
    img += 0.50 * body
    # Shoulders / neck soft tissue at the top.
    img += 0.08 * _ellipse(y, x, -0.95, 0.0, 0.25, 0.18, 0.05)

    lungs = np.zeros_like(img)
    shift = 0.03 * strength * side  # mediastinal shift towards the collapsed side
    for lung_side in (-1, 1):
        cx = lung_side * w * 0.42
        lw = w * 0.33 * (0.92 if lung_side == 1 else 1.0)  # left lung (image right) smaller
        # Lung field: an ellipse whose bottom is the diaphragm dome.
        raise_dia = 0.10 * strength if (finding and lung_side == side) else 0.0
        field = _ellipse(y, x, -0.05 + raise_dia / 2, cx, lung_h - raise_dia / 2, lw, soft * 3)
        apex_taper = np.clip((y + lung_h) / 0.35, 0, 1)  # narrower towards the apex
        field *= 0.6 + 0.4 * apex_taper
        lungs = np.maximum(lungs, field)
    img -= 0.36 * lungs

    # Mediastinum, spine and heart (heart bulges to the image right = patient's left).
    medi = _ellipse(y, x + shift, -0.10, 0.0, 0.62, 0.11, 0.04)
    heart = _ellipse(y, x + shift, 0.30, 0.07, patient.heart_size * 1.1, patient.heart_size * 1.45, 0.04)
    img += 0.30 * np.maximum(medi, heart) * (0.5 + 0.5 * lungs)
    spine = np.exp(-((x + shift) / 0.045) ** 2) * (y > -0.9)
    img += 0.10 * patient.bone_density * spine

    # Ribs: posterior arcs crossing each lung, denser in younger patients.
    ribs = np.zeros_like(img)
    thickness = 0.022
    for k in range(10):
        y0 = -0.62 + k * 0.135 * (lung_h / 0.6)
        for lung_side in (-1, 1):
            u = lung_side * x
            arc = y0 + 0.55 * (u - 0.12) ** 2 - 0.12 * u
            band = np.exp(-(((y - arc) / thickness) ** 2)) * (u > 0.05) * (u < w * 0.85)
            ribs = np.maximum(ribs, band)
    img += 0.12 * patient.bone_density * ribs * body

    # Clavicles.
    for lung_side in (-1, 1):
        u = lung_side * x
        line = -0.68 + 0.18 * (u - 0.1) - 0.25 * (u - 0.3) ** 2
        clav = np.exp(-(((y - line) / 0.028) ** 2)) * (u > 0.06) * (u < 0.62)
        img += 0.16 * patient.bone_density * clav

    # Breast shadows (female): soft densities over the lower lung fields.
    if patient.sex == "F":
        for lung_side in (-1, 1):
            img += 0.11 * _ellipse(y, x, 0.48, lung_side * w * 0.48, 0.30, 0.30, 0.10)

    # Lung markings: a little structured texture inside the lungs.
    texture = _blur(rng.normal(0, 1, img.shape).astype(np.float32), 0.015)
    img += 0.03 * texture / (texture.std() + 1e-6) * lungs

    # The finding: an opaque lower-lobe region of one lung (atelectasis-like).
    if finding:
        blob = _ellipse(y, x, lesion["cy"], side * w * lesion["cx"], lesion["ry"], lesion["rx"], 0.06)
        blob *= 0.7 + 0.3 * np.clip(lesion_texture * 3, -1, 1)
        img += 0.20 * strength * blob * lungs

    # Acquisition: exposure, detector blur, noise.
    gain = float(rng.normal(1.0, 0.05))
    img = _blur(img * gain + float(rng.normal(0, 0.02)), 0.004)
    img += rng.normal(0, 0.015, img.shape).astype(np.float32)
    return _to_uint8(img)


# --- CT slice ------------------------------------------------------------------------------

def render_ct_hu(
    patient: Patient, *, size: int, finding: bool, difficulty: float, rng: np.random.Generator,
) -> np.ndarray:
    """Render one axial chest CT slice in Hounsfield units (float32, size x size)."""
    _check_size(size)
    _check_difficulty(difficulty)
    y, x = _grid(size, rng, jitter=0.5)
    w = patient.thorax_width
    female = patient.sex == "F"
    hu = np.full((size, size), -1000.0, np.float32)

    def paint(mask, value):
        nonlocal hu
        hu = hu * (1 - mask) + value * mask

    body_ry = 0.62 * (0.95 if female else 1.0)
    paint(_ellipse(y, x, 0.0, 0.0, body_ry, w, 0.01), -100.0)  # fat
    paint(_ellipse(y, x, 0.0, 0.0, body_ry - patient.fat, w - patient.fat, 0.01), 40.0)  # muscle
    if female:  # breast tissue anteriorly
        for s in (-1, 1):
            paint(_ellipse(y, x, -body_ry + 0.05, s * w * 0.45, 0.16, 0.22, 0.02), -60.0)
    lung_hu = -860.0 - 2.0 * (patient.age - 55)  # emphysema-like lowering with age
    for s in (-1, 1):
        paint(_ellipse(y, x, -0.02, s * w * 0.47, body_ry * 0.70, w * 0.36, 0.01), lung_hu)
    paint(_ellipse(y, x, 0.0, 0.0, 0.30, 0.16, 0.01), 35.0)  # mediastinum
    paint(_ellipse(y, x, -0.05, 0.06, 0.07, 0.07, 0.005), 45.0)  # aorta
    paint(_ellipse(y, x, 0.43, 0.0, 0.10, 0.11, 0.005), 300.0 + 400.0 * patient.bone_density)  # vertebra
    paint(((y > body_ry + 0.10) & (y < body_ry + 0.16) & (np.abs(x) < 0.95)).astype(np.float32), 100.0)  # table

    lungs = (hu < -500).astype(np.float32)
    # Vessels: small dense dots inside the lungs, denser near the hila.
    n_vessels = int(rng.integers(25, 45))
    for _ in range(n_vessels):
        s = rng.choice([-1, 1])
        r = rng.uniform(0.05, 0.9) ** 1.5
        a = rng.uniform(0, 2 * np.pi)
        cy, cx = -0.02 + r * body_ry * 0.6 * np.sin(a), s * w * (0.47 + 0.3 * r * np.cos(a))
        rad = float(rng.uniform(0.008, 0.02) * (1.3 - r))
        dot = _ellipse(y, x, cy, cx, rad, rad, 0.004) * lungs
        hu = hu * (1 - dot) + 30.0 * dot

    # The nodule: malignant = larger, lobulated, spiculated; benign = small, smooth, maybe calcified.
    side = patient.finding_side
    cy = float(rng.uniform(-0.25, 0.2))
    cx = side * w * float(rng.uniform(0.35, 0.6))
    separation = 1.0 - 0.9 * difficulty
    base_radius = float(rng.uniform(0.035, 0.06))
    radius = base_radius * (1.0 + 0.6 * separation) if finding else base_radius
    theta = np.arctan2(y - cy, x - cx)
    r = np.sqrt((y - cy) ** 2 + (x - cx) ** 2)
    lobes = 0.12 * np.sin(3 * theta + rng.uniform(0, 6.3)) + 0.08 * np.sin(5 * theta + rng.uniform(0, 6.3))
    n_spikes = 14
    spikes = np.maximum(0, np.cos(n_spikes * (theta + rng.uniform(0, 6.3)))) ** 8
    irregular = (0.8 * lobes + 0.9 * spikes) * separation if finding else 0.25 * lobes * (1 - separation)
    boundary = radius * (1 + irregular)
    nodule = np.clip((boundary - r) / (0.004 + 0.01 * (1 - separation * finding)) + 0.5, 0, 1)
    calcified = rng.random() < 0.4 * separation
    nodule_hu = 20.0 if finding else (220.0 if calcified else 30.0)
    hu = hu * (1 - nodule) + nodule_hu * nodule

    hu = _blur(hu, 0.003) + rng.normal(0, 18.0, hu.shape).astype(np.float32)
    return hu.astype(np.float32)


def window_to_uint8(hu: np.ndarray, window: tuple[float, float] = LUNG_WINDOW) -> np.ndarray:
    """Map HU to 8 bit with a (centre, width) window."""
    centre, width = window
    return _to_uint8((hu - (centre - width / 2)) / width)


def render_ct(
    patient: Patient, *, size: int, finding: bool, difficulty: float, rng: np.random.Generator,
    window: tuple[float, float] = LUNG_WINDOW,
) -> np.ndarray:
    """Render one axial CT slice, windowed to uint8 (lung window by default)."""
    return window_to_uint8(render_ct_hu(patient, size=size, finding=finding, difficulty=difficulty, rng=rng), window)


# --- datasets ------------------------------------------------------------------------------

@dataclass(frozen=True)
class PhantomConfig:
    modality: str = "cxr"
    n_patients: int = 200
    image_size: int = 128
    images_per_patient: tuple[int, int] = (1, 4)
    prevalence: float = 0.4
    difficulty: float | None = None  # None: DEFAULT_DIFFICULTY of the modality
    seed: int = 0

    def __post_init__(self) -> None:
        if self.difficulty is None:
            object.__setattr__(self, "difficulty", DEFAULT_DIFFICULTY.get(self.modality, 0.5))


def phantom_table(config: PhantomConfig) -> pd.DataFrame:
    """The rows of a phantom dataset (no pixels): ids, labels, patients, sex, age."""
    if config.modality not in MODALITIES:
        raise ManifestError(f"unknown modality {config.modality!r}; valid: {', '.join(MODALITIES)}.")
    if config.n_patients < 1:
        raise ManifestError(f"n_patients must be at least 1; got {config.n_patients}.")
    lo, hi = config.images_per_patient
    rows = []
    for pi in range(config.n_patients):
        patient = sample_patient(config.seed, pi)
        rng = _rng(config.seed, pi, 1)
        diseased = rng.random() < config.prevalence
        for ii in range(int(rng.integers(lo, hi + 1))):
            # Follow-up images of a diseased patient are mostly, not always, positive.
            label = int(diseased and rng.random() < 0.85)
            rows.append({
                "image_id": f"{config.modality}_{pi:05d}_{ii:02d}",
                "path": f"images/{config.modality}_{pi:05d}_{ii:02d}.png",
                "label": label,
                "patient_id": f"P{pi:05d}",
                "sex": patient.sex,
                "age": patient.age,
                "view": "PA" if config.modality == "cxr" else "axial",
                "modality": config.modality,
                "patient_index": pi,
                "image_index": ii,
            })
    return pd.DataFrame(rows)


def render_row(config: PhantomConfig, patient_index: int, image_index: int, label: int) -> np.ndarray:
    patient = sample_patient(config.seed, patient_index)
    rng = _rng(config.seed, patient_index, 2, image_index)
    render = render_cxr if config.modality == "cxr" else render_ct
    return render(patient, size=config.image_size, finding=bool(label), difficulty=config.difficulty, rng=rng)


def make_phantom_dataset(
    out_dir: str | Path, *, config: PhantomConfig, n_folds: int = 5, test_fraction: float = 0.2,
    val_fraction: float = 0.1, split_seed: int | None = None,
) -> Manifest:
    """Render a phantom dataset as PNGs under ``out_dir/images`` and return its manifest."""
    _check_size(config.image_size)
    _check_difficulty(config.difficulty)
    out_dir = Path(out_dir)
    table = phantom_table(config)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    for row in table.itertuples():
        target = out_dir / row.path
        pixels = render_row(config, row.patient_index, row.image_index, row.label)
        tmp = target.with_name(f".{target.name}.tmp")
        Image.fromarray(pixels).save(tmp, format="PNG")
        tmp.replace(target)
    table = make_splits(
        table.drop(columns=["patient_index", "image_index"]),
        n_folds=n_folds, test_fraction=test_fraction, val_fraction=val_fraction,
        seed=config.seed if split_seed is None else split_seed,
    )
    meta = {"dataset": f"phantom_{config.modality}", "generator": asdict(config),
            "splits": {"n_folds": n_folds, "test_fraction": test_fraction,
                       "val_fraction": val_fraction, "seed": config.seed if split_seed is None else split_seed}}
    return Manifest(table=table, root=out_dir, meta=meta)
