"""The paper's synthetic confounders: tag, denoising (low-pass), X-ray dose noise, CT dose noise.

Where they act (``resolution``) follows the paper: tag and low-pass on the stored radiograph
(NIH: 1024 px), X-ray dose noise after resizing it to 512 px with OpenCV's bilinear, and the
result is then resized to the model input (``nearest`` in the paper's Keras pipeline); see
:meth:`sm_utils.confounders.Confounder.prepare`. Every parameter is given for the paper's image
size (``reference_size``: 1024 px for tag and low-pass, 512 px for the dose models) and scaled
to the size of the image the confounder receives, so at the paper's resolution nothing is
scaled, and on a 256 px phantom the tag has the same *relative* size. ``strength`` is 1 for
the paper's setting and 0 for no effect.
"""

from __future__ import annotations

import functools
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .registry import ConfounderError, register_confounder
from .tomography import BACKENDS, check_backend

# Attenuation of water and air used by the paper's X-ray dose model (per unit length).
MU_WATER_XRAY, MU_AIR_XRAY = 0.1837, 0.1662
DOSE_SCALINGS = ("area", "none")
CT_N0_UNITS = ("mm", "bin")  # ct_noise's n0 on HU slices: per mm of detector, or per bin
NORMAL_APPROXIMATION_FROM = 1e5  # photons: above this, Poisson noise is drawn as normal


def to_uint8(values: np.ndarray) -> np.ndarray:
    """Round and clip floats to 0..255 uint8 (rounding keeps the mean, unlike truncation)."""
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def side(image: np.ndarray) -> float:
    """The image's size for scaling: the geometric mean of its sides."""
    return float(np.sqrt(image.shape[0] * image.shape[1]))


# --- text ------------------------------------------------------------------------------

@functools.lru_cache(maxsize=64)
def load_font(font: str, size_px: int) -> ImageFont.FreeTypeFont:
    """A TrueType font by file name, looked up among matplotlib's fonts (present everywhere)."""
    import matplotlib

    path = font if os.path.isabs(font) else os.path.join(matplotlib.get_data_path(), "fonts", "ttf", font)
    if not os.path.isfile(path):
        raise ConfounderError(
            f"font {font!r} not found (looked at {path}). Use a file shipped with matplotlib, "
            "e.g. 'DejaVuSans.ttf' or 'DejaVuSans-Bold.ttf', or an absolute path."
        )
    return ImageFont.truetype(path, size_px)


def text_mask(shape, text, xy, font, size_px,
              anchor: str = "lt") -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Anti-aliased coverage (0..1) of ``text`` placed at ``xy`` by Pillow's ``anchor``
    ("lt": the glyph box's top-left; "la": Pillow's default, left and ascender line).

    Returns the mask and the box (top, left, bottom, right) that holds every non-zero pixel.
    """
    canvas = Image.new("L", (shape[1], shape[0]), 0)
    draw = ImageDraw.Draw(canvas)
    face = load_font(font, max(1, round(size_px)))
    draw.text(xy, text, fill=255, font=face, anchor=anchor)
    left, top, right, bottom = draw.textbbox(xy, text, font=face, anchor=anchor)
    box = (int(np.floor(top)), int(np.floor(left)), int(np.ceil(bottom)), int(np.ceil(right)))
    return np.asarray(canvas, np.float32) / 255.0, box


def blend(image: np.ndarray, mask: np.ndarray, colour: float, strength: float) -> np.ndarray:
    """Paint ``colour`` where ``mask`` > 0, with opacity mask * strength; other pixels unchanged."""
    alpha = np.clip(mask * strength, 0.0, 1.0)
    out = image.astype(np.float32) + alpha * (float(colour) - image.astype(np.float32))
    return to_uint8(out)


def tag_geometry(shape, *, font_size, position, reference_size):
    """Font size and top-left position (x, y) in pixels of the actual image."""
    h, w = shape
    scale = np.sqrt(h * w) / reference_size
    x, y = position
    return font_size * scale, (x * w / reference_size, y * h / reference_size)


# The paper draws with Pillow's default anchor: x is the left edge, y the font's ascender line.
TAG_ANCHOR = "la"


def tag_box(shape, *, text="R", font_size=64.0, position=(200.0, 200.0),
            reference_size=1024, font="DejaVuSans.ttf", **_) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) of the tag on an image of ``shape`` (for checks and tests)."""
    size_px, xy = tag_geometry(shape, font_size=font_size, position=position,
                               reference_size=reference_size)
    return text_mask(shape, text, xy, font, size_px, anchor=TAG_ANCHOR)[1]


def tag_coverage(image, rng, *, strength, text, font_size, position, colour, reference_size,
                 font):
    """The tag's anti-aliased coverage (0..1) on ``image``: its pixel mask (any strength)."""
    size_px, xy = tag_geometry(image.shape, font_size=font_size, position=position,
                               reference_size=reference_size)
    return text_mask(image.shape, text, xy, font, size_px, anchor=TAG_ANCHOR)[0]


@register_confounder(
    "tag", category="environment/marker",
    description=("A burned-in text marker (the paper's white 'R') stands for the laterality or "
                 "hospital tags that some sites print on every image."),
    defaults={"text": "R", "font_size": 64.0, "position": (200.0, 200.0), "colour": 255,
              "reference_size": 1024, "font": "DejaVuSans.ttf", "resolution": "native"},
    mask=tag_coverage,
)
def tag(image, rng, *, strength, text, font_size, position, colour, reference_size, font):
    """White sans-serif "R", 64 px, drawn at (x, y) = (200, 200) on 1024 px as the paper does
    (``ImageDraw.text((200, 200), "R", fill="white")``, Pillow's default anchor).

    The paper asks matplotlib for a light sans-serif font; with matplotlib's own fonts that is
    DejaVu Sans, used here. ``strength`` is the tag's opacity. Pixels outside the glyphs are
    not changed.
    """
    mask = tag_coverage(image, rng, strength=strength, text=text, font_size=font_size,
                        position=position, colour=colour, reference_size=reference_size,
                        font=font)
    return blend(image, mask, colour, strength)


# --- denoising: ideal low-pass -----------------------------------------------------------

def lowpass_disc(shape, diameter: float, reference_size: int) -> np.ndarray:
    """Boolean mask of the kept frequencies in the centred (fftshift-ed) spectrum.

    Drawn as the paper does: a Pillow ellipse filling the box of side ``diameter`` (scaled from
    ``reference_size`` to the image) centred on (width / 2, height / 2); on a 1024 px image
    with diameter 500 that is the box (262, 262, 762, 762).
    """
    h, w = shape
    ex, ey = diameter * w / reference_size, diameter * h / reference_size
    canvas = Image.new("L", (w, h), 0)
    ImageDraw.Draw(canvas).ellipse((w / 2 - ex / 2, h / 2 - ey / 2, w / 2 + ex / 2, h / 2 + ey / 2),
                                   fill=1)
    return np.asarray(canvas, dtype=bool)


@register_confounder(
    "lowpass", category="environment/processing",
    description=("An ideal low-pass filter stands for vendor denoising/smoothing that some "
                 "devices apply before storing the image, removing fine texture."),
    defaults={"diameter": 500.0, "reference_size": 1024, "resolution": "native"},
)
def lowpass(image, rng, *, strength, diameter, reference_size):
    """Ideal circular low-pass in the centred 2-D FFT: disc diameter 500 px on 1024 px.

    Real part of the inverse, blended with the input by ``strength``, clipped to 0..255 and
    truncated to uint8, as the paper does (``astype(np.uint8)``; truncation lowers the mean by
    about half a grey level, part of the paper's cue).
    """
    spectrum = np.fft.fftshift(np.fft.fft2(image.astype(np.float64)))
    spectrum *= lowpass_disc(image.shape, diameter, reference_size)
    filtered = np.fft.ifft2(np.fft.ifftshift(spectrum)).real
    return np.clip(image + strength * (filtered - image), 0, 255).astype(np.uint8)


# --- X-ray dose noise --------------------------------------------------------------------

def effective_photons(n0: float, image: np.ndarray, reference_size: int, dose_scaling: str) -> float:
    """Photons per pixel at this image size.

    ``area``: the same dose per unit area as ``n0`` at ``reference_size`` (a 256 px pixel covers
    four 512 px pixels, so it gets 4 x n0: exactly what noise at 512 px then downsampling
    gives). ``none``: ``n0`` per pixel at any size (the paper's per-pixel noise level).
    """
    if dose_scaling not in DOSE_SCALINGS:
        raise ConfounderError(f"dose_scaling must be one of {list(DOSE_SCALINGS)}; got {dose_scaling!r}.")
    return n0 * (reference_size / side(image)) ** 2 if dose_scaling == "area" else n0


def xray_dose(image, rng, n0, *, hu_min, hu_max, reference_size, dose_scaling):
    """The paper's model: dither, grey -> pseudo-HU -> attenuation, Poisson(N0 e^-mu), back."""
    photons = effective_photons(n0, image, reference_size, dose_scaling)
    grey = image + rng.random(image.shape)  # dither U(0, 1); floor below keeps the mean
    hu = hu_min + grey / 255.0 * (hu_max - hu_min)
    mu = hu * (MU_WATER_XRAY - MU_AIR_XRAY) / 1000.0 + MU_WATER_XRAY
    expected = photons * np.exp(-mu)
    if expected.min() >= NORMAL_APPROXIMATION_FROM:
        # Poisson(lam) and round(N(lam, lam)) are indistinguishable at these counts (skewness
        # 1/sqrt(lam) < 0.3 %), and the normal draw is about 3x faster.
        counts = np.rint(expected + np.sqrt(expected) * rng.standard_normal(expected.shape))
    else:
        counts = rng.poisson(expected)
    counts = np.maximum(counts, 1)
    mu_noisy = -np.log(counts / photons)
    hu_noisy = (mu_noisy - MU_WATER_XRAY) * 1000.0 / (MU_WATER_XRAY - MU_AIR_XRAY)
    out = (hu_noisy - hu_min) / (hu_max - hu_min) * 255.0
    return np.clip(np.floor(out), 0, 255).astype(np.uint8)


def xray_noise_sd(grey: float, photons: float, hu_min: float = -1200.0,
                  hu_max: float = 800.0) -> float:
    """Predicted SD (grey levels) that :func:`xray_dose` adds to a flat image at ``grey``.

    Poisson noise of SD sigma = (grey per unit mu) / sqrt(N e^-mu), then dither + floor:
    the output is floor(u + n) with u ~ U(0, 1), n ~ N(0, sigma^2), whose variance is
    sigma^2 + E[frac(n) (1 - frac(n))] (1/6 when sigma is large, less when it is small).
    """
    hu = hu_min + (grey + 0.5) / 255.0 * (hu_max - hu_min)
    mu = hu * (MU_WATER_XRAY - MU_AIR_XRAY) / 1000.0 + MU_WATER_XRAY
    grey_per_mu = 1000.0 / (MU_WATER_XRAY - MU_AIR_XRAY) * 255.0 / (hu_max - hu_min)
    sigma = grey_per_mu / np.sqrt(photons * np.exp(-mu))
    n = np.linspace(-10 * sigma - 1, 10 * sigma + 1, 40001)
    weight = np.exp(-0.5 * (n / sigma) ** 2)
    frac = n - np.floor(n)
    rounding = float((weight * frac * (1 - frac)).sum() / weight.sum())
    return float(np.sqrt(sigma ** 2 + rounding))


def reduced_photons(n0_baseline: float, n0_confounded: float, strength: float) -> float:
    """Photon count at ``strength``: n0_baseline at 0, n0_confounded at 1, lower beyond 1.

    Interpolated in 1/N (noise variance is proportional to 1/N).
    """
    return n0_baseline / (1.0 + strength * (n0_baseline / n0_confounded - 1.0))


def _xray_noise(image, rng, *, strength, n0_baseline, n0_confounded, **params):
    return xray_dose(image, rng, reduced_photons(n0_baseline, n0_confounded, strength), **params)


def _xray_baseline(image, rng, *, strength, n0_baseline, n0_confounded, **params):
    return xray_dose(image, rng, n0_baseline, **params)


XRAY_DEFAULTS = {"n0_baseline": 2e7, "n0_confounded": 1.5e7, "hu_min": -1200.0,
                 "hu_max": 800.0, "reference_size": 512, "dose_scaling": "area",
                 "resolution": 512}

register_confounder(
    "xray_noise", _xray_noise, baseline=_xray_baseline, category="environment/acquisition",
    description=("A lower X-ray dose (1.5e7 instead of 2e7 photons per pixel) gives slightly "
                 "more quantum noise, as when one site or device uses a low-dose protocol."),
    defaults=XRAY_DEFAULTS, strength_range=(0.0, 100.0), choices={"dose_scaling": DOSE_SCALINGS},
)
register_confounder(
    "xray_noise_ct", _xray_noise, baseline=_xray_baseline, category="environment/acquisition",
    description=("The paper's X-ray dose-noise model applied to CT slices: a subtle, "
                 "image-domain noise increase that is not how CT noise really looks."),
    # LIDC-IDRI slices are stored at 512 px, the model's reference size: act on them as stored
    defaults={**XRAY_DEFAULTS, "resolution": "native"}, strength_range=(0.0, 100.0),
    choices={"dose_scaling": DOSE_SCALINGS},
)


# --- CT dose noise ------------------------------------------------------------------------

def grey_to_hu(image: np.ndarray, window_centre: float, window_width: float) -> np.ndarray:
    """8-bit grey level -> HU through a (centre, width) window (the inverse of windowing)."""
    return window_centre - window_width / 2 + image.astype(np.float64) / 255.0 * window_width


def hu_to_grey(hu: np.ndarray, window_centre: float, window_width: float) -> np.ndarray:
    return (hu - (window_centre - window_width / 2)) / window_width * 255.0


def ct_round_trip(image, rng, *, photons, window_centre, window_width, fov_cm, mu_water,
                  n_angles, backend="skimage") -> np.ndarray:
    """:func:`ct_round_trip_hu` of an 8-bit slice read through its window, its pixel size
    taken as ``fov_cm`` over its side; returns HU."""
    return ct_round_trip_hu(grey_to_hu(image, window_centre, window_width), rng, photons=photons,
                            pixel_cm=fov_cm / round(side(image)), mu_water=mu_water,
                            n_angles=n_angles, backend=backend)


def ct_round_trip_hu(hu, rng, *, photons, pixel_cm, mu_water, n_angles, backend="skimage",
                     device=None) -> np.ndarray:
    """Parallel-beam projection of a slice in HU with square pixels of ``pixel_cm``, optional
    Poisson photon noise (``photons`` per detector bin of one pixel's width, None: no noise),
    filtered back-projection (ramp filter); returns HU.

    ``backend`` (:mod:`sm_utils.confounders.tomography`): "skimage" the reference, "nufft" the
    same operators in the Fourier domain (20x and more faster), "torch" scikit-image's
    arithmetic on a torch ``device``. The noise is drawn from ``rng`` alike in all three.
    """
    from .tomography import round_trip

    image = np.asarray(hu, dtype=np.float64)
    # Attenuation per pixel length; no clipping below air so the round trip keeps the mean.
    mu_pixel = mu_water * (1.0 + image / 1000.0) * pixel_cm
    mu_back = round_trip(mu_pixel[None], n_angles, backend=backend, photons=[photons],
                         rngs=[rng], device=device)[0]
    return (mu_back / pixel_cm / mu_water - 1.0) * 1000.0


def _square_pixel_cm(pixel_mm) -> float:
    row, col = (float(v) for v in pixel_mm)
    if abs(row - col) > 0.01 * max(row, col):
        raise ConfounderError(
            f"ct_noise projects a slice with square pixels (row and column spacing within 1 %), "
            f"as every backend's geometry has one detector bin per pixel; this slice's pixel "
            f"spacing is {row:g} x {col:g} mm. Resample the series to square pixels first (or "
            f"leave it out of the CT grid): nothing is computed for it, so no slice gets noise "
            f"of another geometry."
        )
    return (row + col) / 20.0  # mm -> cm


def ct_bin_photons(n0: float, n0_per: str, pixel_mm: float) -> float:
    """Photons per view in one detector bin of a slice whose pixels are ``pixel_mm`` wide (the
    projection has one bin per pixel across).

    ``n0_per="mm"``: ``n0`` photons per mm of detector per view, a fixed dose whatever the
    series' pixel size: a bin gets ``n0 x pixel_mm``, and the noise in HU after filtered
    back-projection goes as pixel_mm ** -1.5 (fluence x pixel width x pixel area, as for any
    scan reconstructed at its pixel size). ``"bin"``: ``n0`` in every bin, whatever its width
    (the dose per mm is then n0 / pixel_mm; the noise in HU goes as 1 / pixel_mm).
    """
    if n0_per not in CT_N0_UNITS:
        raise ConfounderError(f"n0_per must be one of {list(CT_N0_UNITS)}; got {n0_per!r}.")
    return n0 * pixel_mm if n0_per == "mm" else n0


def _ct_hu_plan(confounded, pixel_mm, *, strength, n0, n0_per, fbp_baseline, **_):
    """What a slice in HU gets: (reconstructed?, its pixel size in cm, photons per bin or None
    for no noise). Confounded: the low-dose protocol at the slice's own pixel spacing (photons
    per bin: :func:`ct_bin_photons`), whatever the box or the model input; not confounded: the
    noise-free reconstruction with ``fbp_baseline``, else the slice as it is."""
    if confounded:
        if strength == 0 and not fbp_baseline:
            return False, None, None
        pixel_cm = _square_pixel_cm(pixel_mm)
        photons = None if strength == 0 else ct_bin_photons(n0, n0_per, pixel_cm * 10.0) / strength
        return True, pixel_cm, photons
    if not fbp_baseline:
        return False, None, None
    return True, _square_pixel_cm(pixel_mm), None


def _ct_noise_hu(hu, rng, *, pixel_mm, mu_water, n_angles, backend, **params):
    act, pixel_cm, photons = _ct_hu_plan(True, pixel_mm, **params)
    if not act:
        return hu
    return ct_round_trip_hu(hu, rng, photons=photons, pixel_cm=pixel_cm, mu_water=mu_water,
                            n_angles=n_angles, backend=check_backend(backend))


def _ct_baseline_hu(hu, rng, *, pixel_mm, mu_water, n_angles, backend, **params):
    act, pixel_cm, _ = _ct_hu_plan(False, pixel_mm, **params)
    if not act:
        return hu
    return ct_round_trip_hu(hu, rng, photons=None, pixel_cm=pixel_cm, mu_water=mu_water,
                            n_angles=n_angles, backend=check_backend(backend))


def ct_noise_hu_batch(hus, confounded, rngs, pixel_mms, *, device=None, mu_water, n_angles,
                      backend, **params) -> list[np.ndarray]:
    """``ct_noise`` on many CT slices in HU at once (what ``Confounder.inject_hu`` gives each,
    one at a time): the slices of one shape projected and reconstructed as one batch, on
    ``device`` for backend "torch". ``rngs[i]``: the slice's ``Confounder.image_rng``."""
    from .tomography import round_trip

    out = [np.asarray(hu, dtype=np.float64) for hu in hus]
    plans = [_ct_hu_plan(bool(c), p, **params) for c, p in zip(confounded, pixel_mms)]
    shapes: dict[tuple[int, ...], list[int]] = {}
    for i, (act, _, _) in enumerate(plans):
        if act:
            shapes.setdefault(out[i].shape, []).append(i)
    for group in shapes.values():
        mu = np.stack([mu_water * (1.0 + out[i] / 1000.0) * plans[i][1] for i in group])
        back = round_trip(mu, n_angles, backend=check_backend(backend), device=device,
                          photons=[plans[i][2] for i in group],
                          rngs=[rngs[i] if plans[i][2] is not None else None for i in group])
        for k, i in enumerate(group):
            out[i] = (back[k] / plans[i][1] / mu_water - 1.0) * 1000.0
    return out


def _ct_params(params):
    return {k: params[k] for k in ("window_centre", "window_width", "fov_cm", "mu_water",
                                   "n_angles", "backend")}


def _ct_noise(image, rng, *, strength, n0, reference_size, dose_scaling, fbp_baseline, **params):
    photons = None if strength == 0 else effective_photons(n0, image, reference_size, dose_scaling) / strength
    if photons is None and not fbp_baseline:
        return image.copy()
    hu = ct_round_trip(image, rng, photons=photons, **_ct_params(params))
    return to_uint8(hu_to_grey(hu, params["window_centre"], params["window_width"]))


def _ct_baseline(image, rng, *, strength, n0, reference_size, dose_scaling, fbp_baseline, **params):
    if not fbp_baseline:
        return image
    hu = ct_round_trip(image, rng, photons=None, **_ct_params(params))
    return to_uint8(hu_to_grey(hu, params["window_centre"], params["window_width"]))


register_confounder(
    "ct_noise", _ct_noise, baseline=_ct_baseline, category="environment/acquisition", memoise=True,
    description=("A low-dose CT protocol: Poisson photon noise in the sinogram (LoDoPaB-CT "
                 "style: 4096 photons per view per mm of detector on slices in HU, per detector "
                 "bin on 8-bit slices) reconstructed by filtered back-projection, giving the "
                 "streaky, correlated noise of low-dose scanners."),
    # fbp_baseline: every slice, confounded or not, goes through the same projection and
    # reconstruction (1000 angles, as LoDoPaB-CT), so only the dose differs; without it the
    # reconstruction's blur alone would mark the confounded slices. On CT slices stored in HU
    # (LIDC-IDRI) it acts in HU at the slice's pixel spacing (hu=), with n0 per mm of
    # detector (n0_per; "bin": per bin of one pixel, the dose then rising as pixels shrink);
    # window, fov_cm, reference_size and dose_scaling then play no part: they describe 8-bit
    # slices. backend: how the projection and reconstruction are computed
    # (sm_utils.confounders.tomography: "nufft" the fast default, "skimage" the reference,
    # "torch" on a torch device); a parameter, so part of every run's identity and memo key.
    hu=(_ct_noise_hu, _ct_baseline_hu),
    defaults={"n0": 4096.0, "n0_per": "mm", "reference_size": 512, "dose_scaling": "area",
              "window_centre": -600.0, "window_width": 1500.0, "fov_cm": 35.0, "mu_water": 0.2,
              "n_angles": 1000, "fbp_baseline": True, "backend": "nufft", "resolution": "native"},
    strength_range=(0.0, 100.0),
    # runs made before backend existed used scikit-image: a run on "nufft" gets its own id
    earlier={"backend": "skimage"},
    choices={"backend": BACKENDS, "n0_per": CT_N0_UNITS, "dose_scaling": DOSE_SCALINGS},
)
