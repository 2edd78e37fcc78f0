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


def ct_noise_sd_hu(tmp_path, pixel_spacing: float, n_angles: int = 200) -> float:
    """SD (HU) of what ct_noise adds to the model inputs of a LIDC build from DICOM files with
    this pixel spacing: low-dose minus normal-dose reconstruction of the same slices."""
    root = tmp_path / f"lidc_{pixel_spacing}"
    _, table = make_lidc_root(root, n_patients=6, pixel_spacing=pixel_spacing)
    window = (-850.0, 1000.0)
    manifest = build_dataset("lidc_idri", tmp_path / f"out_{pixel_spacing}", root=root,
                             annotations=table, image="slice", window_centre=window[0],
                             window_width=window[1], **SPLITS)
    cache = ImageCache.for_manifest(manifest, 40, tmp_path / "cache", resize="nearest")
    conf = get_confounder("ct_noise", n_angles=n_angles)
    images = {}
    for confounded in (True, False):
        rows = manifest.table.assign(confounded=confounded)
        data = ConfoundedImageDataset(rows, cache, confounder=conf, seed=5, root=manifest.root,
                                      resize="nearest")
        images[confounded] = np.stack([data.image(i) for i in range(len(rows))]).astype(float)
    noise_grey = images[True] - images[False]
    return float(noise_grey.std() * window[1] / 255.0)


def test_ct_noise_acts_in_hu_at_the_slices_own_pixel_spacing(tmp_path):
    # Filtered back-projection of N photons per detector bin of one pixel's width: the noise of
    # mu is pi / sqrt(12 M N) per pixel, and HU = mu / (pixel size x mu_water) x 1000, so the
    # same dose on half-size pixels gives twice the noise in HU. (The lung attenuates
    # the fakes' 28 mm little: e^-mu L > 0.99.)
    sd = {mm: ct_noise_sd_hu(tmp_path, mm) for mm in (0.5, 1.0)}
    assert sd[0.5] / sd[1.0] == pytest.approx(2.0, rel=0.1)
    # Absolute: theory x 0.70 (linear interpolation in the back-projection averages
    # neighbouring filtered samples; measured 0.69-0.71 on water discs at 0.5-2 mm).
    theory = 1000.0 / (0.1 * 0.2) * np.pi / np.sqrt(12 * 200 * 4096)
    assert sd[1.0] == pytest.approx(0.70 * theory, rel=0.15)


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
    assert examples[0.5]["noise_sd_hu"] / example["noise_sd_hu"] == pytest.approx(2.0, rel=0.15)
