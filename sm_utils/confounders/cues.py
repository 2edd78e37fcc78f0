"""What each of the paper's confounders leaves at the model input, measured beside the paper.

The paper confounds at the image's stored resolution (tag, low-pass: 1024 px; X-ray noise: 512
px) and Keras then resizes to the model input with nearest-neighbour; where a confounder acts
and how the image is resized decide how strong the cue is. :func:`paper_cues` runs each
confounder through the same path as a fine-tuning run (``Confounder.prepare``: confound at the
confounder's resolution, resize to ``input_size`` with ``resize``) on a stored-size image, and
measures the cue on the model-input images:

- tag: the height of the letter at the model input (the paper: a 64 px font, 47 px "R", at
  1024 px);
- low-pass: where the cut-off lies at the model input, and how much the filter changes it;
- X-ray dose noise: the noise SD of a flat grey region at the model input, normal vs low dose
  (the paper: about 1.8 -> 2.1 grey levels);
- CT dose noise: the sharpness of the confounded slice relative to the clean one (both
  reconstructed: the same within 5 %) and the noise it adds; beside it the same measure
  without the shared reconstruction, which made the blur itself the cue.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.ndimage import gaussian_filter

from .paper import grey_to_hu, lowpass_disc, xray_noise_sd
from .registry import Confounder, get_confounder

PAPER_SIZES = {"cxr": 1024, "ct": 512}


def _prepared(conf: Confounder, image: np.ndarray, confounded: bool, size: int, resize: str,
              seed: int, image_id: str = "cue") -> np.ndarray:
    return conf.prepare(image, confounded, seed, image_id, size=size, resize=resize)


def _row(conf: Confounder, cue: str, paper: str, clean: float, confounded: float,
         expected: str, passed: bool) -> dict:
    return {"confounder": conf.name, "resolution": str(conf.resolution), "cue": cue,
            "paper": paper, "clean": clean, "confounded": confounded, "expected": expected,
            "passed": bool(passed)}


def tag_cue(conf: Confounder, image: np.ndarray, size: int, resize: str, seed: int) -> dict:
    clean = _prepared(conf, image, False, size, resize, seed)
    tagged = _prepared(conf, image, True, size, resize, seed)
    rows = np.flatnonzero((tagged != clean).any(axis=1))
    height = float(rows.max() - rows.min() + 1) if len(rows) else 0.0
    # The paper's "R": rows 213-259 of 1024 (DejaVu Sans, 64 px), scaled to the input.
    expected = 47 * size / 1024
    return _row(conf, "height of the tag at the model input (px)",
                "64 px font (a 47 px 'R') at (200, 200) on 1024 px", 0.0, height,
                f"{expected:.1f} +- 2", abs(height - expected) <= 2)


def lowpass_cue(conf: Confounder, image: np.ndarray, size: int, resize: str, seed: int) -> dict:
    native = image.shape[0]
    where = native if conf.resolution == "native" else (
        size if conf.resolution == "input" else int(conf.resolution))
    radius = conf.params["diameter"] / 2 / conf.params["reference_size"]  # cycles per pixel
    at_input = radius * where / size
    clean = _prepared(conf, image, False, size, resize, seed).astype(float)
    filtered = _prepared(conf, image, True, size, resize, seed).astype(float)
    change = float(np.abs(filtered - clean).mean())
    # Energy in the upper half of the input's band (above 0.25 cycles per pixel).
    band = ~lowpass_disc(clean.shape, 0.5 * 1024, 1024)
    energy = [float((np.abs(np.fft.fftshift(np.fft.fft2(x - x.mean()))) ** 2)[band].sum())
              for x in (clean, filtered)]
    kept = energy[1] / max(energy[0], 1e-12)
    where_text = (f"cut-off {radius:.3f} cycles/px at {where} px = {at_input:.2f} cycles/px at "
                  f"{size} px" + (" (beyond Nyquist 0.5)" if at_input > 0.5 else ""))
    return {**_row(conf, f"{where_text}; upper-band energy kept at the input "
                         f"{100 * kept:.0f} %", "ideal disc, diameter 500 px on 1024 px (radius "
                   "0.244 cycles/px): a subtle change",
                   0.0, change, "mean |change| > 0 grey levels", change > 0),
            "cutoff_at_input": at_input, "upper_band_kept": kept}


def xray_noise_cue(conf: Confounder, image: np.ndarray, size: int, resize: str,
                   seed: int, grey: int = 128) -> dict:
    flat = np.full(image.shape, grey, np.uint8)
    sds = [float((_prepared(conf, flat, c, size, resize, seed).astype(float) - grey).std())
           for c in (False, True)]
    p = conf.params
    where = image.shape[0] if conf.resolution == "native" else (
        size if conf.resolution == "input" else int(conf.resolution))
    per_pixel = (p["reference_size"] / where) ** 2 if p["dose_scaling"] == "area" else 1.0
    from .paper import reduced_photons

    low = reduced_photons(p["n0_baseline"], p["n0_confounded"], conf.strength)
    predicted = [xray_noise_sd(grey, n0 * per_pixel, p["hu_min"], p["hu_max"])
                 for n0 in (p["n0_baseline"], low)]
    passed = all(abs(m / e - 1) < 0.03 for m, e in zip(sds, predicted))
    return _row(conf, f"noise SD of a flat grey-{grey} region at the model input, grey levels",
                "about 1.8 -> 2.1 (2e7 vs 1.5e7 photons per pixel at 512 px)", sds[0], sds[1],
                f"{predicted[0]:.2f} -> {predicted[1]:.2f}", passed)


def noise_power_spectrum(noise: np.ndarray, pixel_mm: float = 1.0,
                         n_bins: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Radially averaged noise power spectrum of noise images (realisations x rows x cols, or
    one image): frequencies (bin centres, cycles per mm, up to Nyquist) and NPS (HU^2 mm^2
    for noise in HU).

    Each realisation's own mean is removed; NPS(u, v) = pixel area / pixel count x
    |DFT|^2, averaged over the realisations, so that its integral over the frequency plane is
    the noise variance (white noise of SD s: s^2 x pixel area at every frequency). Averaged in
    ``n_bins`` rings of equal width (default: half the shorter side) up to Nyquist, 0.5 /
    ``pixel_mm``; the corners beyond it are left out.
    """
    noise = np.asarray(noise, dtype=np.float64)
    if noise.ndim == 2:
        noise = noise[None]
    if noise.ndim != 3 or min(noise.shape[1:]) < 4:
        raise ValueError(f"noise_power_spectrum expects noise images (realisations x rows x "
                         f"cols, at least 4 x 4 px); got shape {noise.shape}.")
    rows, cols = noise.shape[1:]
    centred = noise - noise.mean(axis=(1, 2), keepdims=True)
    power = (np.abs(np.fft.fft2(centred)) ** 2).mean(axis=0) * pixel_mm ** 2 / (rows * cols)
    radius = np.hypot(*np.meshgrid(np.fft.fftfreq(rows, pixel_mm), np.fft.fftfreq(cols, pixel_mm),
                                   indexing="ij"))
    nyquist = 0.5 / pixel_mm
    n_bins = n_bins or min(rows, cols) // 2
    edges = np.linspace(0.0, nyquist, n_bins + 1)
    which = np.digitize(radius.ravel(), edges) - 1
    inside = (which >= 0) & (which < n_bins)
    total = np.bincount(which[inside], power.ravel()[inside], minlength=n_bins)
    count = np.bincount(which[inside], minlength=n_bins)
    return (edges[:-1] + edges[1:]) / 2, total / np.maximum(count, 1)


def highpass(image: np.ndarray, sigma: float = 2.0) -> np.ndarray:
    image = image.astype(float)
    return image - gaussian_filter(image, sigma)


def sharpness_ratio(image: np.ndarray, reference: np.ndarray, mask: np.ndarray) -> float:
    """Fine detail of ``image`` relative to ``reference``: the least-squares slope of its
    high-pass on the reference's. Independent noise leaves it at 1; blur lowers it."""
    a, b = highpass(image)[mask], highpass(reference)[mask]
    return float((a * b).sum() / max((b * b).sum(), 1e-12))


def ct_noise_cue(conf: Confounder, image: np.ndarray, size: int, resize: str,
                 seed: int) -> list[dict]:
    window = conf.params["window_centre"], conf.params["window_width"]
    rows = []
    for variant, label in ((conf, "clean and confounded both reconstructed"),
                           (get_confounder(conf.name, **{**conf.params, "fbp_baseline": False}),
                            "without the shared reconstruction (clean slices as stored)")):
        clean = _prepared(variant, image, False, size, resize, seed)
        noisy = _prepared(variant, image, True, size, resize, seed)
        body = (clean > 5) & (clean < 250)  # HU is meaningless where the window clips
        ratio = sharpness_ratio(noisy, clean, body)
        noise = float((grey_to_hu(noisy, *window) - grey_to_hu(clean, *window))[body].std())
        shared = variant.params["fbp_baseline"]
        rows.append(_row(variant, f"{label}: sharpness relative to clean (noise added "
                         f"{noise:.1f} HU SD)", "low-dose noise in the sinogram; clean and "
                         "low-dose differ only in dose", 1.0, ratio,
                         "1 +- 0.05, noise > 0" if shared else "(reconstructing only confounded slices: < 1, a blur cue)",
                         abs(ratio - 1) < 0.05 and noise > 0 if shared else True))
    return rows


def paper_cues(cxr: np.ndarray, ct: np.ndarray | None = None, *, input_size: int = 224,
               resize: str = "nearest", seed: int = 0,
               confounders: dict[str, dict] | None = None) -> pd.DataFrame:
    """The cue of each paper confounder at the model input (see the module docstring).

    ``cxr``: a radiograph at its stored size (the paper's: 1024 px); ``ct``: a CT slice (512
    px) for ``ct_noise``; ``confounders``: parameters per confounder (default: the paper's,
    ``ct_noise`` with the reference backend "skimage", whose numbers notebook 02 shows and
    checks; the default "nufft" gives its noise SD within about 1 %: bench_ct_noise.py).
    """
    confounders = confounders or {"tag": {}, "lowpass": {}, "xray_noise": {},
                                  "ct_noise": {"backend": "skimage"}}
    rows = []
    for name, params in confounders.items():
        conf = get_confounder(name, **params)
        if name == "tag":
            rows.append(tag_cue(conf, cxr, input_size, resize, seed))
        elif name == "lowpass":
            rows.append(lowpass_cue(conf, cxr, input_size, resize, seed))
        elif name in ("xray_noise", "xray_noise_ct"):
            rows.append(xray_noise_cue(conf, ct if name.endswith("_ct") else cxr, input_size,
                                       resize, seed))
        elif name == "ct_noise" and ct is not None:
            rows.extend(ct_noise_cue(conf, ct, input_size, resize, seed))
    return pd.DataFrame(rows)
