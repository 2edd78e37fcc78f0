import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from sm_utils.confounders import apply_prevalence, get_confounder
from sm_utils.data import (
    PAPER_AUGMENTATION,
    Augmentation,
    ConfoundedImageDataset,
    DataError,
    ImageCache,
    apply_affine,
    make_loader,
)
from sm_utils.manifest import Manifest, load_manifest


@pytest.fixture
def odd_images(tmp_path):
    """Four images of different sizes and modes (grey, RGB, non-square)."""
    rng = np.random.default_rng(0)
    rows = []
    for i, (shape, mode) in enumerate([((80, 80), "L"), ((60, 100), "L"),
                                       ((64, 64, 3), "RGB"), ((48, 48), "L")]):
        pixels = rng.integers(0, 256, shape, dtype=np.uint8)
        Image.fromarray(pixels, mode=mode).save(tmp_path / f"im{i}.png")
        rows.append({"image_id": f"im{i}", "path": f"im{i}.png", "label": i % 2,
                     "patient_id": f"p{i}"})
    return Manifest(table=pd.DataFrame(rows), root=tmp_path)


def test_cache_decodes_resizes_and_is_reused(odd_images, tmp_path):
    cache = ImageCache.for_manifest(odd_images, 40, tmp_path / "cache")
    assert cache.array.shape == (4, 40, 40) and cache.array.dtype == np.uint8
    reference = np.asarray(Image.open(tmp_path / "im1.png").convert("L").resize(
        (40, 40), Image.Resampling.BILINEAR, reducing_gap=None))
    np.testing.assert_array_equal(cache.get("im1"), reference)
    files = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(files) == 2  # the array and its index, no temporary left behind
    mtime = cache.path.stat().st_mtime_ns
    again = ImageCache.for_manifest(odd_images, 40, tmp_path / "cache")
    assert again.path == cache.path and again.path.stat().st_mtime_ns == mtime
    other_size = ImageCache.for_manifest(odd_images, 32, tmp_path / "cache")
    assert other_size.path != cache.path


def test_cache_key_changes_when_an_image_changes(odd_images, tmp_path):
    before = ImageCache.key(odd_images, 40)
    Image.fromarray(np.zeros((30, 30), np.uint8)).save(tmp_path / "im0.png")
    assert ImageCache.key(odd_images, 40) != before


def test_unreadable_images_are_all_named_in_one_clear_error(odd_images, tmp_path):
    (tmp_path / "im2.png").write_bytes(b"not a png")
    whole = (tmp_path / "im0.png").read_bytes()
    (tmp_path / "im0.png").write_bytes(whole[: len(whole) // 2])  # truncated
    with pytest.raises(DataError, match=r"2 of 4 images of the manifest cannot be read") as err:
        ImageCache.for_manifest(odd_images, 40, tmp_path / "cache")
    assert "im0.png" in str(err.value) and "im2.png" in str(err.value)
    assert not list((tmp_path / "cache").glob("*.u8"))  # no half-built cache


def test_augmentation_draws_as_keras_2_15_does():
    """rotation_range=10 (degrees), shifts 0.1 of the side, shear_range=0.1 in degrees (Keras
    2.x converts it with np.deg2rad), zoom_range=0.1 drawn per axis."""
    rng = np.random.default_rng(1)
    params = [PAPER_AUGMENTATION.sample(rng, 100, 80) for _ in range(2000)]
    draws = {key: np.array([p[key] for p in params]) for key in params[0]}
    assert 9.5 < np.abs(draws["theta"]).max() <= 10
    assert 9.5 < np.abs(draws["tx"]).max() <= 10 and 7.6 < np.abs(draws["ty"]).max() <= 8  # rows, cols
    assert 0.095 < np.abs(draws["shear"]).max() <= 0.1  # degrees: at most 0.1 degree
    for axis in ("zx", "zy"):
        assert 0.9 <= draws[axis].min() < 0.905 and 1.095 < draws[axis].max() <= 1.1
    assert np.corrcoef(draws["zx"], draws["zy"])[0, 1] < 0.1  # a zoom per axis, not one


def test_the_transform_is_kerass_matrix_sampled_as_scipy_does():
    """Keras 2.15 applies its matrix with scipy.ndimage.affine_transform(order=1,
    mode="nearest"); the batched grid_sample gives the same pixels up to rounding."""
    from scipy import ndimage

    rng = np.random.default_rng(0)
    image = ndimage.gaussian_filter(rng.random((48, 64)) * 255, 2).astype(np.uint8)
    strong = Augmentation(rotation_degrees=30, shift=0.2, shear_degrees=20, zoom=0.3)
    matrices = strong.draw([np.random.default_rng(k) for k in range(8)], 48, 64)
    ours = apply_affine(torch.from_numpy(np.stack([image] * 8))[:, None], matrices)
    for matrix, out in zip(matrices, ours[:, 0].numpy()):
        keras = ndimage.affine_transform(image.astype(float), matrix[:2, :2], matrix[:2, 2],
                                         order=1, mode="nearest")
        assert np.abs(np.round(keras) - out).max() <= 1  # float32 vs float64 at .5
        assert np.mean(np.round(keras) == out) > 0.99
    # Keras' shifts by hand: its matrix is built in (x, y) and swapped for row-major arrays,
    # so tx (drawn from height_shift_range, times the height) moves the columns and ty the
    # rows: output (r, c) samples input (r, c + tx), or (r + ty, c); beyond the edge the
    # edge pixel repeats (fill_mode "nearest"), there is no black border.
    def shifted(tx, ty):
        matrix = Augmentation.matrix({"theta": 0.0, "tx": tx, "ty": ty, "shear": 0.0, "zx": 1.0,
                                      "zy": 1.0}, 48, 64)
        return apply_affine(torch.from_numpy(image)[None, None], matrix[None])[0, 0].numpy()

    across = shifted(5.0, 0.0)
    np.testing.assert_array_equal(across[:, :59], image[:, 5:])
    np.testing.assert_array_equal(across[:, 59:], np.repeat(image[:, -1:], 5, axis=1))
    down = shifted(0.0, 20.0)
    np.testing.assert_array_equal(down[:28], image[20:])
    np.testing.assert_array_equal(down[28:], np.repeat(image[-1:], 20, axis=0))
    # an identity draw leaves the image unchanged (no hidden flip)
    none = Augmentation(rotation_degrees=0, shift=0, shear_degrees=0, zoom=0)
    tensor = torch.from_numpy(image)[None]
    assert torch.equal(none(tensor, rng), tensor)
    moved = PAPER_AUGMENTATION(tensor, np.random.default_rng(2))
    assert moved.dtype == torch.uint8 and moved.shape == tensor.shape
    assert not torch.equal(moved, tensor)


def test_the_matrix_is_kerass_2_15_matrix_worked_out_by_hand():
    """Keras 2.15.0, keras/preprocessing/image.py: apply_affine_transform composes rotation @
    shift @ shear @ zoom in its (x, y), transform_matrix_offset_center moves the origin to
    (x / 2 - 0.5, y / 2 - 0.5) with (x, y) = (height, width), and for channels-last arrays
    rows and columns 0 and 1 are swapped. Written out here from those formulae, not from ours."""
    height, width = 48, 64  # not square: the height's centre and the width's are not confused
    draw = {"theta": 7.3, "tx": -3.1, "ty": 4.6, "shear": 0.08, "zx": 0.93, "zy": 1.06}
    t, s = np.deg2rad(draw["theta"]), np.deg2rad(draw["shear"])
    rotation = np.array([[np.cos(t), -np.sin(t), 0.0], [np.sin(t), np.cos(t), 0.0], [0, 0, 1]])
    shift = np.array([[1.0, 0.0, draw["tx"]], [0.0, 1.0, draw["ty"]], [0, 0, 1]])
    shear = np.array([[1.0, -np.sin(s), 0.0], [0.0, np.cos(s), 0.0], [0, 0, 1]])
    zoom = np.array([[draw["zx"], 0.0, 0.0], [0.0, draw["zy"], 0.0], [0, 0, 1]])
    o_x, o_y = height / 2 - 0.5, width / 2 - 0.5
    to_centre = np.array([[1.0, 0.0, o_x], [0.0, 1.0, o_y], [0, 0, 1]])
    from_centre = np.array([[1.0, 0.0, -o_x], [0.0, 1.0, -o_y], [0, 0, 1]])
    xy = to_centre @ rotation @ shift @ shear @ zoom @ from_centre
    # Keras' swap of columns 0, 1 and then rows 0, 1, element by element
    keras = np.array([[xy[1, 1], xy[1, 0], xy[1, 2]],
                      [xy[0, 1], xy[0, 0], xy[0, 2]],
                      [0.0, 0.0, 1.0]])
    ours = Augmentation.matrix(draw, height, width)
    np.testing.assert_allclose(ours, keras, rtol=0, atol=1e-6)
    # a pure rotation of a square image keeps its middle, (n - 1) / 2, in place
    n = 32
    turn = Augmentation.matrix({"theta": 9.0, "tx": 0.0, "ty": 0.0, "shear": 0.0, "zx": 1.0,
                                "zy": 1.0}, n, n)
    middle = np.array([(n - 1) / 2, (n - 1) / 2, 1.0])
    np.testing.assert_allclose(turn @ middle, middle, rtol=0, atol=1e-9)


@pytest.fixture(scope="module")
def phantom(phantom_cxr, tmp_path_factory):
    manifest = load_manifest(phantom_cxr)
    cache = ImageCache.for_manifest(manifest, 64, tmp_path_factory.mktemp("cache"))
    return manifest, cache


def test_nearest_cache_keeps_stored_pixels_as_keras_does(odd_images, tmp_path):
    cache = ImageCache.for_manifest(odd_images, 40, tmp_path / "cache", resize="nearest")
    stored = np.asarray(Image.open(tmp_path / "im0.png").convert("L"))
    assert np.array_equal(cache.get("im0"), np.asarray(Image.fromarray(stored).resize(
        (40, 40), Image.Resampling.NEAREST)))
    assert np.isin(cache.get("im0"), stored).all()
    bilinear = ImageCache.for_manifest(odd_images, 40, tmp_path / "cache")
    assert bilinear.path != cache.path and not np.array_equal(bilinear.get("im0"), cache.get("im0"))
    with pytest.raises(Exception, match="resize method must be one of"):
        ImageCache.for_manifest(odd_images, 40, tmp_path / "cache", resize="cubic")


def test_dataset_applies_the_confounder_to_confounded_rows_only(phantom):
    manifest, cache = phantom
    conf = get_confounder("tag")
    rows = apply_prevalence(manifest.rows(0, "train"), conf, 1.0, 5, "train")
    data = ConfoundedImageDataset(rows, cache, confounder=conf, seed=5, root=manifest.root)
    for i in range(len(data)):
        raw = cache.get(rows.iloc[i]["image_id"])
        image, label = data[i]
        assert image.shape == (1, 64, 64) and image.dtype == torch.uint8
        assert label == rows.iloc[i]["label"]
        changed = not np.array_equal(image[0].numpy(), raw)
        assert changed == bool(rows.iloc[i]["confounded"])
    assert rows["confounded"].sum() == rows["label"].sum() > 0


def test_confounder_at_the_stored_resolution_then_resized_like_the_rest(phantom, tmp_path):
    """A native-resolution confounder works on the stored file, and its output reaches the
    model input by the same resize as the unchanged images (here the cache's bilinear)."""
    from sm_utils.imaging import load_grey, resize_grey

    manifest, _ = phantom
    cache = ImageCache.for_manifest(manifest, 32, tmp_path)
    conf = get_confounder("lowpass")
    rows = apply_prevalence(manifest.rows(0, "train"), conf, 0.5, 5, "train").reset_index(drop=True)
    data = ConfoundedImageDataset(rows, cache, confounder=conf, seed=5, root=manifest.root)
    confounded = int(np.flatnonzero(rows["confounded"])[0])
    clean = int(np.flatnonzero(~rows["confounded"])[0])
    stored = load_grey(manifest.image_path(rows.at[confounded, "path"]))
    assert stored.shape[0] > 32  # the phantom is stored larger than the model input
    expected = resize_grey(conf.inject(stored, True, 5, rows.at[confounded, "image_id"]), 32,
                           "bilinear")
    assert np.array_equal(data.image(confounded), expected)
    assert np.array_equal(data.image(clean), cache.get(rows.at[clean, "image_id"]))
    at_input = ConfoundedImageDataset(rows, cache, confounder=get_confounder(
        "lowpass", resolution="input"), seed=5)
    assert not np.array_equal(at_input.image(confounded), data.image(confounded))
    with pytest.raises(DataError, match="acts on the stored images.*pass root="):
        ConfoundedImageDataset(rows, cache, confounder=conf, seed=5)


def test_dose_noise_baseline_reaches_every_image(phantom):
    manifest, cache = phantom
    conf = get_confounder("xray_noise")
    rows = apply_prevalence(manifest.rows(0, "test"), conf, 0.0, 5, "clean")
    data = ConfoundedImageDataset(rows, cache, confounder=conf, seed=5, root=manifest.root)
    assert not rows["confounded"].any()
    assert all(not np.array_equal(data.image(i), cache.get(rows.iloc[i]["image_id"]))
               for i in range(len(rows)))


def test_augmentation_is_seeded_by_epoch_and_row_not_by_workers(phantom):
    manifest, cache = phantom
    rows = manifest.rows(0, "train").assign(confounded=False)
    data = ConfoundedImageDataset(rows, cache, seed=3, augmentation=PAPER_AUGMENTATION)
    first = data[4][0]
    assert torch.equal(first, data[4][0])
    data.set_epoch(1)
    assert not torch.equal(first, data[4][0])
    data.set_epoch(0)
    serial = torch.cat([x for x, _ in make_loader(data, batch_size=8, shuffle=True, seed=9)])
    parallel = torch.cat([x for x, _ in make_loader(data, batch_size=8, shuffle=True, seed=9,
                                                    num_workers=2)])
    assert torch.equal(serial, parallel)
    other_seed = torch.cat([x for x, _ in make_loader(data, batch_size=8, shuffle=True, seed=10)])
    assert not torch.equal(serial, other_seed)


def test_rows_missing_from_the_cache_are_refused(phantom):
    _, cache = phantom
    rows = pd.DataFrame({"image_id": ["nope"], "label": [1]})
    with pytest.raises(DataError, match="not in the image cache"):
        ConfoundedImageDataset(rows, cache)


def test_resident_loader_gives_the_dataloaders_batches(phantom):
    """On the CPU the device-resident loader (the GPU path) is the DataLoader, batch for batch:
    the same seeded order and the same per-image augmentation."""
    from sm_utils.data import ResidentLoader

    manifest, cache = phantom
    rows = manifest.rows(0, "train").assign(confounded=False)
    data = ConfoundedImageDataset(rows, cache, seed=3, augmentation=PAPER_AUGMENTATION)
    reference = make_loader(data, batch_size=8, shuffle=True, seed=9, drop_last=True)
    resident = ResidentLoader(data, batch_size=8, shuffle=True, seed=9, device="cpu",
                              drop_last=True)
    assert len(resident) == len(reference) == len(data) // 8
    for epoch in (1, 2):
        data.set_epoch(epoch)
        pairs = list(zip(reference, resident, strict=True))
        for (x_ref, y_ref), (x, y) in pairs:
            assert torch.equal(x_ref, x) and torch.equal(y_ref, y)
    first_batch_epochs = []
    for epoch in (1, 2):  # a new order and a new augmentation draw each epoch
        data.set_epoch(epoch)
        first_batch_epochs.append(next(iter(resident))[0])
    assert not torch.equal(*first_batch_epochs)
    plain = ResidentLoader(data, batch_size=5, shuffle=False, seed=0, device="cpu")
    data.augmentation = None
    assert torch.equal(next(iter(plain))[0][:, 0], torch.from_numpy(np.stack(
        [data.image(i) for i in range(5)])))
