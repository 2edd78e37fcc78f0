"""Measured evidence that each confounder did what it claims (shown by notebook 02).

:func:`check_confounder` applies a synthetic confounder to one image and returns one record:
what was measured, its value on the clean and on the confounded image, what the confounder's
definition predicts, and whether the measurement agrees. :func:`check_sampled` does the same
for the attribute-label correlation of a sampled confounder.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd

from .paper import (
    effective_photons,
    grey_to_hu,
    lowpass_disc,
    reduced_photons,
    tag_box,
    xray_noise_sd,
)
from .prevalence import _wanted, apply_prevalence, attribute_values
from .registry import Confounder

Check = Callable[[Confounder, np.ndarray, np.ndarray, np.ndarray], dict]
_CHECKS: dict[str, Check] = {}


def register_check(name: str) -> Callable[[Check], Check]:
    """Attach a measurement to confounder ``name`` (used by notebook 02)."""
    def add(fn: Check) -> Check:
        _CHECKS[name] = fn
        return fn
    return add


def _record(measure, clean, confounded, expected, passed) -> dict:
    return {"measure": measure, "clean": float(clean), "confounded": float(confounded),
            "expected": expected, "passed": bool(passed)}


def high_frequency_fraction(image: np.ndarray, disc: np.ndarray) -> float:
    spectrum = np.abs(np.fft.fftshift(np.fft.fft2(image.astype(float) - image.mean()))) ** 2
    return float(spectrum[~disc].sum() / max(spectrum.sum(), 1e-12))


@register_check("tag")
def _tag(conf, image, base, out):
    top, left, bottom, right = tag_box(image.shape, **conf.params)
    changed = out != base
    inside = np.zeros_like(changed)
    inside[top:bottom, left:right] = True
    return _record("changed pixels outside the tag box (inside: "
                   f"{int((changed & inside).sum())})", 0, (changed & ~inside).sum(), "0",
                   changed.any() and not (changed & ~inside).any())


@register_check("lowpass")
def _lowpass(conf, image, base, out):
    disc = lowpass_disc(image.shape, conf.params["diameter"], conf.params["reference_size"])
    before, after = high_frequency_fraction(base, disc), high_frequency_fraction(out, disc)
    # Clipping to 0..255 and 8-bit storage put a little energy back outside the disc (more
    # on images with black borders, where the filter's ringing is clipped).
    # The paper truncates to uint8: the mean falls by about half a grey level.
    mean_shift = float(out.mean()) - float(base.mean())
    return _record(f"share of spectral energy outside the disc (mean shift {mean_shift:+.2f})",
                   before, after, "< 5 % of clean, mean -0.5",
                   after < 0.05 * before and -0.75 < mean_shift < -0.25)


def _xray(conf, image, base, out):
    # Noise is measured on a flat image at the image's median grey (real images are not flat).
    flat = np.full(image.shape, int(np.median(image)), np.uint8)
    sd_base = float((conf.baseline(flat, conf.image_rng(0, "flat")).astype(float) - flat).std())
    sd_conf = float((conf.apply(flat, conf.image_rng(0, "flat")).astype(float) - flat).std())
    p = conf.params
    photons = reduced_photons(p["n0_baseline"], p["n0_confounded"], conf.strength)
    implied = np.sqrt(p["n0_baseline"] / photons)
    # The model predicts both SDs, including what dither + 8-bit rounding add.
    grey = float(flat[0, 0])
    model = {k: p[k] for k in ("hu_min", "hu_max")}
    scale = effective_photons(1.0, flat, p["reference_size"], p["dose_scaling"])
    predicted = [xray_noise_sd(grey, n0 * scale, **model) for n0 in (p["n0_baseline"], photons)]
    ratio = sd_conf / max(sd_base, 1e-12)
    return _record(f"noise SD in a flat region, grey levels (ratio {ratio:.3f}; Poisson alone "
                   f"{implied:.3f})", sd_base, sd_conf,
                   f"{predicted[0]:.3f} -> {predicted[1]:.3f} (ratio {predicted[1] / predicted[0]:.3f})",
                   abs(sd_base / predicted[0] - 1) < 0.03 and abs(sd_conf / predicted[1] - 1) < 0.03)


register_check("xray_noise")(_xray)
register_check("xray_noise_ct")(_xray)


@register_check("ct_noise")
def _ct(conf, image, base, out):
    window = conf.params["window_centre"], conf.params["window_width"]
    inside = (image > 5) & (image < 250)  # HU differences are meaningless where clipped
    diff = grey_to_hu(out, *window) - grey_to_hu(base, *window)
    return _record(f"SD of the HU change (mean change {diff[inside].mean():.1f} HU)", 0,
                   diff[inside].std(), "SD > 0, mean change ~ 0",
                   diff[inside].std() > 1.0 and abs(diff[inside].mean()) < 0.2 * diff[inside].std() + 2)


@register_check("gamma")
def _gamma(conf, image, base, out):
    exponent = conf.params["gamma"] ** conf.strength
    curve = np.clip(np.rint(255 * (base / 255.0) ** exponent), 0, 255)
    error = np.abs(out - curve).max()
    return _record("largest deviation from the gamma curve, grey levels", 0, error, "0", error == 0)


def blockiness(image: np.ndarray) -> float:
    """Mean jump across 8-pixel column boundaries over the mean jump elsewhere."""
    jumps = np.abs(np.diff(image.astype(float), axis=1)).mean(axis=0)
    on_grid = np.arange(jumps.size) % 8 == 7
    return float(jumps[on_grid].mean() / max(jumps[~on_grid].mean(), 1e-12))


@register_check("jpeg")
def _jpeg(conf, image, base, out):
    before, after = blockiness(base), blockiness(out)
    return _record("8x8 blockiness (jump across block edges / elsewhere)", before, after,
                   "higher than clean", after > before)


@register_check("collimation")
def _collimation(conf, image, base, out):
    h, w = image.shape
    edge = max(1, round((conf.params["border"] - conf.params["jitter"]) * min(h, w)) - 1)
    ring = np.concatenate([out[:edge].ravel(), out[-edge:].ravel(), out[:, :edge].ravel(),
                           out[:, -edge:].ravel()])
    clean_ring = np.concatenate([base[:edge].ravel(), base[-edge:].ravel(),
                                 base[:, :edge].ravel(), base[:, -edge:].ravel()])
    fill = conf.params["fill"]
    return _record(f"fraction of the outer {edge} px equal to fill {fill}",
                   (clean_ring == fill).mean(), (ring == fill).mean(), "1 when strength is 1",
                   (ring == fill).mean() == 1.0 or conf.strength < 1)


def _changed_fraction(measure: str, low: float, high: float):
    def check(conf, image, base, out):
        fraction = float((out != base).mean())
        return _record(measure, 0, fraction, f"{low:g}..{high:g}", low < fraction < high)
    return check


register_check("marker")(_changed_fraction("fraction of pixels changed by the marker", 0, 0.05))
register_check("support_device")(_changed_fraction("fraction of pixels on the tube", 0, 0.08))


@register_check("resample")
def _resample(conf, image, base, out):
    disc = lowpass_disc(image.shape, 1024 * conf.params["factor"], 1024)
    before, after = high_frequency_fraction(base, disc), high_frequency_fraction(out, disc)
    return _record("energy above the resampled Nyquist frequency", before, after,
                   "lower than clean", after < before)


def _generic(conf, image, base, out):
    changed = float((out != base).mean())
    return _record("fraction of pixels changed", 0, changed, "> 0", changed > 0)


def check_confounder(conf: Confounder, image: np.ndarray, seed: int = 0,
                     image_id: str = "check") -> dict:
    """Apply ``conf`` to ``image`` (as a confounded and as a clean row) and measure it."""
    base = conf.inject(image, False, seed, image_id)
    out = conf.inject(image, True, seed, image_id)
    record = _CHECKS.get(conf.name, _generic)(conf, image, base, out)
    return {"confounder": conf.name, "category": conf.category, **record}


def designed_phi(groups: dict[str, int]) -> float:
    """phi coefficient of the 2 x 2 table (attribute value vs label) the design asks for."""
    a, b = groups["value+"], groups["reference+"]
    c, d = groups["value-"], groups["reference-"]
    denominator = np.sqrt(float((a + b) * (c + d) * (a + c) * (b + d)))
    return float((a * d - b * c) / denominator) if denominator > 0 else 0.0


def check_sampled(conf: Confounder, rows: pd.DataFrame, p: float, seed: int) -> list[dict]:
    """Attribute-label correlation (phi) in the train, iid, ood and clean selections."""
    records = []
    for test_set in ("train", "ood", "clean"):
        try:
            chosen = apply_prevalence(rows, conf, p, seed, test_set)
        except ValueError as error:  # too few rows for this set: report, do not stop
            records.append({"confounder": conf.name, "category": conf.category,
                             "measure": f"{test_set}: {error}", "clean": np.nan,
                             "confounded": np.nan, "expected": "", "passed": False})
            continue
        has = chosen["confounded"].to_numpy()
        labels = chosen["label"].to_numpy()
        phi = float(np.corrcoef(has, labels)[0, 1]) if has.std() > 0 and labels.std() > 0 else 0.0
        n_pos, n_neg = int((labels == 1).sum()), int((labels == 0).sum())
        expected = designed_phi(_wanted(n_pos, n_neg, p, test_set))
        passed = abs(phi - expected) < 1e-6
        records.append({
            "confounder": conf.name, "category": conf.category,
            "measure": f"{test_set}: phi(attribute={conf.params['value']}, label) over "
                       f"{len(chosen)} rows ({n_pos} positive)",
            "clean": np.nan, "confounded": phi,
            "expected": f"{expected:.3f}", "passed": passed})
    return records


__all__ = ["attribute_values", "check_confounder", "check_sampled", "register_check"]
