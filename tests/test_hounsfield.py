"""CT slices in HU: storage, regions of interest, and dose noise at the slice's own pixel size,
from DICOM fixtures through the data pipeline."""

from __future__ import annotations

import numpy as np
import pytest
from fakes.lidc_files import make_lidc_root

from sm_utils.confounders import ConfounderError, get_confounder
from sm_utils.data import ConfoundedImageDataset, ImageCache
from sm_utils.datasets import build_dataset
from sm_utils.hounsfield import (
    HounsfieldError,
    SliceView,
    read_hu_png,
    roi_box,
    slice_view,
    window_to_uint8,
    write_hu_png,
)
from sm_utils.manifest import load_manifest

SPLITS = {"n_folds": 2, "test_fraction": 0.34, "val_fraction": 0.34}


def test_hu_png_keeps_every_whole_hu_and_clips_scanner_padding(tmp_path):
    hu = np.array([[-3024.0, -1024.0, -1000.0, -850.4], [0.0, 40.6, 1500.0, 3071.0]])
    write_hu_png(tmp_path / "s.png", hu)
    np.testing.assert_array_equal(read_hu_png(tmp_path / "s.png"),
                                  [[-1024, -1024, -1000, -850], [0, 41, 1500, 3071]])


def test_an_8_bit_png_is_not_read_as_hu(tmp_path):
    from PIL import Image

    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "grey.png")
    with pytest.raises(HounsfieldError, match=r"expected a 16-bit grey PNG.*mode 'L'.*Rebuild"):
        read_hu_png(tmp_path / "grey.png")


def test_roi_box_has_the_physical_size_at_any_spacing():
    assert roi_box(256.0, 300.0, (0.7, 0.7), 64.0, (512, 512)) == (211, 255, 302, 346)  # 91 px, 256 in the middle
    assert roi_box(256.0, 300.0, (1.0, 0.5), 64.0, (512, 512)) == (224, 236, 288, 364)
    with pytest.raises(HounsfieldError, match=r"series X: .*64 mm \(91 x 91 px.*outside the "
                                              r"slice of 512 x 512 px.*smaller roi_mm"):
        roi_box(20.0, 300.0, (0.7, 0.7), 64.0, (512, 512), "series X")


def test_a_view_cuts_then_windows_and_rows_describe_their_view():
    hu = np.arange(100, dtype=float).reshape(10, 10) * 10 - 1000
    view = SliceView(window=(-600.0, 1500.0), pixel_mm=(0.7, 0.7), box=(2, 3, 6, 8))
    np.testing.assert_array_equal(view.grey(hu), window_to_uint8(hu[2:6, 3:8], -600, 1500))
    row = {"image_id": "a", "window_centre": -600, "window_width": 1500,
           "pixel_spacing_row_mm": 0.7, "pixel_spacing_col_mm": 0.7, "roi_row0": 2,
           "roi_col0": 3, "roi_row1": 6, "roi_col1": 8}
    assert slice_view(row) == view
    assert slice_view({"image_id": "b"}) is None  # an 8-bit image
    with pytest.raises(HounsfieldError, match=r"'c' is a CT slice in HU.*lacks "
                                              r"\['pixel_spacing_row_mm'"):
        slice_view({"image_id": "c", "window_centre": -600, "window_width": 1500})


def ct_noise_sd_hu(tmp_path, pixel_spacing: float, n_angles: int = 200, **params) -> float:
    """SD (HU) of what ct_noise adds to the model inputs of a LIDC build from DICOM files with
    this pixel spacing: low-dose minus normal-dose reconstruction of the same slices."""
    root = tmp_path / f"lidc_{pixel_spacing}"
    window = (-850.0, 1000.0)
    if not root.exists():
        _, table = make_lidc_root(root, n_patients=6, pixel_spacing=pixel_spacing)
        build_dataset("lidc_idri", tmp_path / f"out_{pixel_spacing}", root=root,
                      annotations=table, image="slice", window_centre=window[0],
                      window_width=window[1], **SPLITS)
    manifest = load_manifest(tmp_path / f"out_{pixel_spacing}" / "manifest.csv")
    cache = ImageCache.for_manifest(manifest, 40, tmp_path / "cache", resize="nearest")
    conf = get_confounder("ct_noise", n_angles=n_angles, **params)
    images = {}
    for confounded in (True, False):
        rows = manifest.table.assign(confounded=confounded)
        data = ConfoundedImageDataset(rows, cache, confounder=conf, seed=5, root=manifest.root,
                                      resize="nearest")
        images[confounded] = np.stack([data.image(i) for i in range(len(rows))]).astype(float)
    noise_grey = images[True] - images[False]
    return float(noise_grey.std() * window[1] / 255.0)


def fbp_noise_hu(photons_per_bin: float, pixel_mm: float, n_angles: int = 200) -> float:
    """Filtered back-projection of N photons per view in a detector bin one pixel (a) wide: the
    noise of mu x a is pi / sqrt(12 M N), so in HU (mu / mu_water x 1000, mu_water 0.2 / cm)
    it is 1000 pi / (mu_water a sqrt(12 M N)). Measured: x 0.70 (the back-projection's linear
    interpolation averages neighbouring samples; 0.69-0.71 on water discs at 0.5-2 mm)."""
    return 0.70 * 1000.0 / (0.2 * pixel_mm / 10) * np.pi / np.sqrt(12 * n_angles * photons_per_bin)


def test_ct_noise_at_one_dose_per_mm_of_detector_grows_as_pixel_size_to_the_minus_1_5(tmp_path):
    """The default, n0 = 4096 photons per view per mm of detector: a bin one pixel wide gets
    4096 x pixel_mm photons, so the same dose on pixels half the size gives 2 ** 1.5 times the
    noise in HU. (The lung attenuates the fakes' 28 mm little: e^-mu L > 0.99.)"""
    sd = {mm: ct_noise_sd_hu(tmp_path, mm) for mm in (0.5, 1.0)}
    assert sd[0.5] / sd[1.0] == pytest.approx(2 ** 1.5, rel=0.1)
    for mm in (0.5, 1.0):
        assert sd[mm] == pytest.approx(fbp_noise_hu(4096 * mm, mm), rel=0.15)


def test_ct_noise_with_n0_per_bin_of_one_pixel_grows_as_one_over_pixel_size(tmp_path):
    """n0_per="bin": 4096 photons in every bin one pixel wide, whatever its width (a higher dose
    per mm on smaller pixels): the noise in HU goes as 1 / pixel size, twice on half-size
    pixels."""
    sd = {mm: ct_noise_sd_hu(tmp_path, mm, n0_per="bin") for mm in (0.5, 1.0)}
    assert sd[0.5] / sd[1.0] == pytest.approx(2.0, rel=0.1)
    for mm in (0.5, 1.0):
        assert sd[mm] == pytest.approx(fbp_noise_hu(4096, mm), rel=0.15)
    with pytest.raises(ConfounderError, match=r"n0_per must be one of \['mm', 'bin'\]"):
        ct_noise_sd_hu(tmp_path, 1.0, n0_per="cm")


def test_a_dose_on_the_cut_box_is_refused(tmp_path):
    _, table = make_lidc_root(tmp_path / "lidc", n_patients=6)
    manifest = build_dataset("lidc_idri", tmp_path / "out", root=tmp_path / "lidc",
                             annotations=table, roi_mm=8.4, **SPLITS)
    cache = ImageCache.for_manifest(manifest, 32, tmp_path / "cache")
    rows = manifest.table.assign(confounded=True)
    for name in ("ct_noise", "xray_noise_ct"):
        with pytest.raises(ConfounderError, match=rf"{name}.*resolution 'input' would add its dose to "
                                            r"the cut and resized region of interest.*'native'"):
            ConfoundedImageDataset(rows, cache, confounder=get_confounder(name, resolution="input"),
                                   seed=1, root=manifest.root)
    with pytest.raises(ConfounderError, match=r"on CT slices in HU.*got 512"):
        ConfoundedImageDataset(rows, cache, confounder=get_confounder("xray_noise_ct",
                                                                      resolution=512),
                               seed=1, root=manifest.root)


def test_notebook_examples_show_a_ct_row_as_the_model_sees_it(tmp_path):
    from sm_utils.data import load_stored, row_views
    from sm_utils.viz import example_grid, stored_grey

    _, table = make_lidc_root(tmp_path / "lidc", n_patients=6)
    manifest = build_dataset("lidc_idri", tmp_path / "out", root=tmp_path / "lidc",
                             annotations=table, roi_mm=8.4, **SPLITS)
    row = manifest.table.iloc[0]
    (view,) = row_views(manifest.table.iloc[[0]])
    np.testing.assert_array_equal(stored_grey(manifest, row),
                                  load_stored(manifest.root / row["path"], view))
    fig = example_grid(manifest, by=("label",), per_group=2)
    assert fig.axes[0].images[0].get_array().shape == (12, 12)  # the box, not the 16-bit slice


def test_notebook_02s_ct_example_is_what_a_run_makes_of_the_slice():
    from sm_utils.confounders.slices import prepare_slice
    from sm_utils.confounding import ct_dose_example

    hu = np.full((64, 64), -850.0)
    hu[28:36, 28:36] = 40.0
    conf = get_confounder("ct_noise", n_angles=200)
    examples = {mm: ct_dose_example(hu, mm, (32, 32), roi_mm=32 * mm, input_size=48,
                                    resize="nearest", seed=3, conf=conf) for mm in (0.5, 1.0)}
    example = examples[1.0]
    assert example["box"] == (16, 16, 48, 48) and example["roi_px"] == 32
    view = SliceView(window=(-600.0, 1500.0), pixel_mm=(1.0, 1.0), box=example["box"])
    for name, confounded in (("normal dose", False), ("low dose", True)):
        made = prepare_slice(conf, hu, confounded, 3, "example", size=48, resize="nearest",
                             view=view)
        np.testing.assert_array_equal(example[name], made)
    # one dose per mm of detector: half-size pixels, 2 ** 1.5 the noise in HU
    assert examples[0.5]["noise_sd_hu"] / example["noise_sd_hu"] == pytest.approx(2 ** 1.5,
                                                                                 rel=0.15)
