"""Measured behaviour of the synthetic confounders (issue 4, item 7)."""

from __future__ import annotations

import numpy as np
import pytest

from sm_utils.confounders import ConfounderError, get_confounder, list_confounders
from sm_utils.confounders.paper import (
    grey_to_hu,
    lowpass_disc,
    reduced_photons,
    tag_box,
    xray_noise_sd,
)


def textured(size: int, seed: int = 0) -> np.ndarray:
    """A mid-grey image with texture at every frequency (no clipping by the confounders)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:size, :size] / size
    smooth = 60 * np.sin(6 * x) * np.cos(4 * y)
    return np.clip(np.rint(120 + smooth + rng.normal(0, 15, (size, size))), 0, 255).astype(np.uint8)


def outside_energy(image: np.ndarray, disc: np.ndarray) -> float:
    spectrum = np.fft.fftshift(np.fft.fft2(image.astype(float) - image.mean()))
    return float((np.abs(spectrum[~disc]) ** 2).sum() / (np.abs(spectrum) ** 2).sum())


SYNTHETIC = list_confounders("synthetic")


@pytest.mark.parametrize("size", [64, 256])
def test_tag_changes_only_pixels_inside_its_box(size):
    image = textured(size)
    conf = get_confounder("tag")
    out = conf.apply(image, conf.image_rng(0, "a"))
    top, left, bottom, right = tag_box(image.shape, **conf.params)
    changed = out != image
    inside = np.zeros_like(changed)
    inside[top:bottom, left:right] = True
    assert changed.sum() > 0
    assert not (changed & ~inside).any()
    # The box sits where the paper puts it, scaled: drawn at (200, 200) of 1024 with Pillow's
    # default anchor (x: left edge, y: ascender line, 13 px above the top of the "R").
    paper_top = tag_box((1024, 1024))[0]
    assert paper_top == 213
    assert abs(top - paper_top / 1024 * size) <= 1 and abs(left - 200 / 1024 * size) <= 0.05 * size
    # 64 px on 1024 px: the glyph is about 0.73 em high at any size.
    assert 0.5 * 64 / 1024 * size <= bottom - top <= 64 / 1024 * size + 1
    # The glyph strokes are white (at 64 px the 4 px glyph is only partly covered pixels).
    assert out[changed].max() >= (255 if size >= 128 else 170)


def test_tag_at_1024_px_is_the_papers_drawing():
    """The paper: ImageDraw.text((200, 200), "R", font=<sans-serif, 64 px>, fill="white")."""
    from matplotlib import get_data_path
    from PIL import Image, ImageDraw, ImageFont

    image = textured(1024)
    paper = Image.fromarray(image)
    font = ImageFont.truetype(f"{get_data_path()}/fonts/ttf/DejaVuSans.ttf", 64)
    ImageDraw.Draw(paper).text((200, 200), "R", font=font, fill="white")
    conf = get_confounder("tag")
    ours = conf.apply(image, conf.image_rng(0, "a")).astype(int)
    difference = np.abs(ours - np.asarray(paper, dtype=int))
    assert (np.asarray(paper) != image).sum() > 500  # the glyph is there
    assert difference.max() <= 1  # Pillow's integer blending rounds half-way cases up
    assert (difference > 0).sum() <= 10


def test_tag_parameters_move_and_recolour_it():
    image = textured(128)
    conf = get_confounder("tag", text="AB", position=(600.0, 700.0), colour=0)
    out = conf.apply(image, conf.image_rng(0, "a"))
    top, left, bottom, right = tag_box(image.shape, **conf.params)
    ys, xs = np.nonzero(out != image)
    assert ys.min() >= top and ys.max() < bottom and xs.min() >= left and xs.max() < right
    assert top >= 700 / 1024 * 128 - 1 and out[ys, xs].min() == 0


@pytest.mark.parametrize("size", [64, 256])
def test_lowpass_removes_energy_outside_disc_and_keeps_mean(size):
    image = textured(size)
    conf = get_confounder("lowpass")
    out = conf.apply(image, conf.image_rng(0, "a"))
    disc = lowpass_disc(image.shape, 500.0, 1024)
    # Disc of diameter 500/1024 of the side: about pi/4 * 0.488^2 = 19 % of the spectrum.
    assert 0.15 < disc.mean() < 0.23
    before, after = outside_energy(image, disc), outside_energy(out, disc)
    assert before > 0.1  # the white-noise texture has energy at high frequency
    assert after < 0.01 * before  # what remains is 8-bit rounding
    # The paper truncates to uint8 (astype): the mean falls by half a grey level on average.
    assert -0.6 < float(out.mean()) - float(image.mean()) < -0.4


def test_lowpass_strength_is_a_dose_response():
    image = textured(128)
    disc = lowpass_disc(image.shape, 500.0, 1024)
    energies = [outside_energy(get_confounder("lowpass", strength=s).apply(image, None), disc)
                for s in (0.0, 0.5, 1.0)]
    assert energies[0] > energies[1] > energies[2]


def noise_sd(conf, image, confounded: bool, seed: int = 0) -> float:
    rng = conf.image_rng(seed, "flat")
    out = conf.apply(image, rng) if confounded else conf.baseline(image, rng)
    return float((out.astype(float) - image).std())


def test_xray_noise_sd_ratio_is_what_photon_counts_imply():
    flat = np.full((256, 256), 128, np.uint8)
    conf = get_confounder("xray_noise", dose_scaling="none")  # the paper's per-pixel level
    base, low = noise_sd(conf, flat, False), noise_sd(conf, flat, True)
    # Poisson SD of mu is 1/sqrt(N0 e^-mu); dither + floor add variance ~1/6 grey level^2.
    hu = -1200 + 128.5 / 255 * 2000
    mu = hu * (0.1837 - 0.1662) / 1000 + 0.1837
    grey_per_mu = 1000 / (0.1837 - 0.1662) * 255 / 2000
    expected = [np.sqrt(grey_per_mu ** 2 / (n0 * np.exp(-mu)) + 1 / 6) for n0 in (2e7, 1.5e7)]
    assert base == pytest.approx(expected[0], rel=0.03)  # DESIGN.md: about 1.8 grey levels
    assert low == pytest.approx(expected[1], rel=0.03)  # and about 2.1
    assert low / base == pytest.approx(expected[1] / expected[0], abs=0.02)
    assert low / base > 1.1


@pytest.mark.parametrize("size, scaling, strength", [
    (64, "area", 1.0), (128, "area", 4.0), (64, "none", 1.0), (256, "area", 1.0),
])
def test_xray_noise_sd_matches_the_model_at_any_size(size, scaling, strength):
    flat = np.full((size, size), 90, np.uint8)
    conf = get_confounder("xray_noise", strength=strength, dose_scaling=scaling)
    per_pixel = 1.0 if scaling == "none" else (512 / size) ** 2
    photons = reduced_photons(2e7, 1.5e7, strength)
    assert noise_sd(conf, flat, False) == pytest.approx(xray_noise_sd(90, 2e7 * per_pixel), rel=0.03)
    assert noise_sd(conf, flat, True) == pytest.approx(xray_noise_sd(90, photons * per_pixel), rel=0.03)


def test_xray_noise_area_scaling_halves_poisson_sd_at_half_size():
    conf = get_confounder("xray_noise")  # dose_scaling="area": the same dose per unit area
    at_512 = noise_sd(conf, np.full((512, 512), 128, np.uint8), False)
    at_256 = noise_sd(conf, np.full((256, 256), 128, np.uint8), False)
    poisson = [np.sqrt(sd ** 2 - 1 / 6) for sd in (at_512, at_256)]
    assert poisson[1] / poisson[0] == pytest.approx(0.5, abs=0.05)


def test_xray_noise_keeps_mean_and_strength_zero_equals_baseline():
    image = textured(128)
    conf = get_confounder("xray_noise", dose_scaling="none")
    out = conf.apply(image, conf.image_rng(3, "x"))
    assert abs(float(out.mean()) - float(image.mean())) < 0.1
    weak = get_confounder("xray_noise", strength=0.0, dose_scaling="none")
    assert np.array_equal(weak.apply(image, weak.image_rng(3, "x")),
                          weak.baseline(image, weak.image_rng(3, "x")))


@pytest.mark.parametrize("name, params, min_ratio", [
    ("ct_noise", {"fbp_baseline": False}, None),  # clean images untouched: no noise at all
    ("ct_noise", {}, 3.0),  # default: both reconstructed, only the noise differs
    ("xray_noise_ct", {"dose_scaling": "none"}, 1.08),  # paper level: SD x sqrt(2e7/1.5e7)
])
def test_ct_noise_raises_sd_of_uniform_region_keeping_mean_hu(name, params, min_ratio):
    size = 128
    y, x = np.mgrid[:size, :size] - size / 2 + 0.5
    # Grey 60 is air (about -1000 HU) in the lung window; a disc of -550 HU in the middle.
    phantom = np.where(np.hypot(y, x) < 0.35 * size, 136, 60).astype(np.uint8)
    conf = get_confounder(name, **params)
    out = conf.apply(phantom, conf.image_rng(0, "ct"))
    base = conf.baseline(phantom, conf.image_rng(0, "ct"))
    region = (slice(size // 2 - 16, size // 2 + 16),) * 2
    hu_in = grey_to_hu(phantom[region], -600, 1500)
    hu_out, hu_base = (grey_to_hu(a[region], -600, 1500) for a in (out, base))
    assert hu_in.std() == 0 and hu_in.mean() == pytest.approx(-550, abs=1)
    assert hu_out.std() > 3.0  # CT noise is about 4.6 HU at 128 px (1000 angles, dose per area)
    if min_ratio is None:
        assert hu_base.std() == 0
    else:
        assert hu_out.std() > min_ratio * hu_base.std()
    assert abs(hu_out.mean() - hu_in.mean()) < 0.1 * hu_out.std() + 1.0


def test_ct_noise_more_dose_less_noise():
    size = 96
    y, x = np.mgrid[:size, :size] - size / 2
    phantom = np.where(np.hypot(y, x) < 0.35 * size, 136, 60).astype(np.uint8)
    region = (slice(size // 2 - 10, size // 2 + 10),) * 2
    sds = []
    for strength in (0.5, 2.0):  # strength divides the photon count
        conf = get_confounder("ct_noise", strength=strength)
        sds.append(conf.apply(phantom, conf.image_rng(0, "ct"))[region].astype(float).std())
    assert sds[1] > 1.5 * sds[0]


def test_gamma_follows_its_curve():
    ramp = np.tile(np.arange(256, dtype=np.uint8), (8, 1))
    conf = get_confounder("gamma", gamma=0.5)
    out = conf.apply(ramp, None)
    assert out[0, 64] == round(255 * (64 / 255) ** 0.5)
    assert out[0, 0] == 0 and out[0, 255] == 255


def test_jpeg_leaves_block_artefacts():
    image = textured(128)
    out = get_confounder("jpeg").apply(image, None)
    diff = out.astype(float) - image
    # Differences jump across the 8 x 8 block grid more than inside blocks.
    cols = np.abs(np.diff(out.astype(float), axis=1)).mean(axis=0)
    assert cols[7::8].mean() > cols[np.arange(127) % 8 != 7].mean() * 0.9
    assert 2.0 < np.abs(diff).mean() < 25.0


def test_collimation_fills_only_borders():
    image = textured(128)
    conf = get_confounder("collimation")
    out = conf.apply(image, conf.image_rng(0, "c"))
    centre = (slice(20, 108),) * 2  # inside the widest border (0.08 + 0.03 of 128 = 14 px)
    assert np.array_equal(out[centre], image[centre])
    assert (out[:6, :] == 0).all() and (out[:, -6:] == 0).all()  # narrowest: 0.05 of 128


def test_marker_position_varies_between_images_and_stays_in_frame():
    image = textured(256)
    conf = get_confounder("marker")
    centres = set()
    for i in range(12):
        out = conf.apply(image, conf.image_rng(0, f"img{i}"))
        ys, xs = np.nonzero(out != image)
        assert 0 < len(ys) < 0.05 * image.size
        centres.add((ys.mean() > 128, xs.mean() > 128))
    assert len(centres) >= 3  # several corners over 12 images


def test_support_device_is_a_thin_bright_line():
    image = np.full((256, 256), 80, np.uint8)
    conf = get_confounder("support_device")
    out = conf.apply(image, conf.image_rng(0, "d"))
    changed = out != image
    assert 0.003 < changed.mean() < 0.05 and out.max() >= 200
    assert changed[:3].any()  # it enters from the top border


def test_resample_blurs():
    image = textured(128)
    out = get_confounder("resample").apply(image, None)
    disc = lowpass_disc(image.shape, 512.0, 1024)  # the upper half of the frequencies is lost
    assert outside_energy(out, disc) < 0.5 * outside_energy(image, disc)


@pytest.mark.parametrize("name", SYNTHETIC)
def test_synthetic_confounders_are_deterministic_and_shape_preserving(name):
    image = textured(64, seed=1)
    conf = get_confounder(name)
    first = conf.apply(image, conf.image_rng(7, "img-1"))
    again = conf.apply(image, conf.image_rng(7, "img-1"))
    assert first.dtype == np.uint8 and first.shape == image.shape
    assert np.array_equal(first, again)
    assert not np.array_equal(first, image)
    assert np.array_equal(image, textured(64, seed=1))  # the input is not modified


@pytest.mark.parametrize("name", SYNTHETIC)
def test_strength_zero_is_no_change_except_baseline(name):
    image = textured(64, seed=2)
    conf = get_confounder(name, strength=0.0)
    out = conf.apply(image, conf.image_rng(0, "z"))
    expected = conf.baseline(image, conf.image_rng(0, "z"))
    assert np.array_equal(out, expected)


def test_non_square_images_work():
    image = textured(128)[:, :96].copy()
    for name in SYNTHETIC:
        conf = get_confounder(name)
        assert conf.apply(image, conf.image_rng(0, "r")).shape == (128, 96)


def test_image_rng_depends_on_seed_image_and_confounder():
    tag, low = get_confounder("tag"), get_confounder("lowpass")
    draws = [c.image_rng(s, i).integers(1 << 30)
             for c, s, i in [(tag, 0, "a"), (tag, 1, "a"), (tag, 0, "b"), (low, 0, "a")]]
    assert len(set(draws)) == 4
    assert tag.image_rng(0, "a").integers(1 << 30) == draws[0]


@pytest.mark.parametrize("bad", [
    np.zeros((32, 32), np.float32),
    np.zeros((32, 32, 3), np.uint8),
    np.zeros((4, 4), np.uint8),
    [[0, 1], [2, 3]],
])
def test_bad_images_are_rejected_clearly(bad):
    with pytest.raises(ConfounderError, match="2-D uint8|numpy uint8"):
        get_confounder("tag").apply(bad, np.random.default_rng(0))


def test_checks_pass_on_phantoms_and_fail_on_a_wrong_confounder(monkeypatch):
    from sm_utils.confounders import checks, paper
    from sm_utils.phantoms import render_ct, render_cxr, sample_patient

    patient = sample_patient(0, 1)
    cxr = render_cxr(patient, size=128, finding=True, difficulty=0.5, rng=np.random.default_rng(0))
    ct = render_ct(patient, size=96, finding=True, difficulty=0.5, rng=np.random.default_rng(0))
    for name in SYNTHETIC:
        record = checks.check_confounder(get_confounder(name), ct if "ct" in name else cxr)
        assert record["passed"], record
    # A tag drawn away from its documented box is caught.
    tag = get_confounder("tag")
    moved = get_confounder("tag", position=(600.0, 600.0)).apply(cxr, None)
    assert not checks._tag(tag, cxr, cxr, moved)["passed"]
    # Noise at twice the intended dose reduction is caught.
    monkeypatch.setattr(paper, "reduced_photons", lambda n0, n1, s: n1 / 2)
    record = checks.check_confounder(get_confounder("xray_noise"), cxr)
    assert not record["passed"], record
