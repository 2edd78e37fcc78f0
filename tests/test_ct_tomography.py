"""CT dose noise backends (sm_utils.confounders.tomography): the fast ones against the
scikit-image reference, on small slices (the 512 px comparison: benchmarks/bench_ct_noise.py),
the noise power spectrum, determinism, identity and bad input."""

from __future__ import annotations

import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from sm_utils.confounders import ConfounderError, get_confounder, identity_params
from sm_utils.confounders import tomography as tomo
from sm_utils.confounders.cues import noise_power_spectrum
from sm_utils.confounders.paper import ct_bin_photons
from sm_utils.confounders.tomography_torch import with_memory_fallback
from sm_utils.phantoms import render_ct_hu, sample_patient

PIXEL_CM, MU_WATER = 0.07, 0.2
TO_HU = 1000.0 / (MU_WATER * PIXEL_CM)


def phantom_hu(size=96, index=0):
    return render_ct_hu(sample_patient(3, index), size=size, finding=True, difficulty=1.0,
                        rng=np.random.default_rng(index)).astype(np.float64)


def fixture_hu(tmp_path: Path, size=64):
    """A slice of the tests' DICOM fixture series, read back with pydicom, air outside."""
    from fakes.lidc_files import FakeNodule, write_ct_series

    from sm_utils.datasets.dicom import read_series

    series = write_ct_series(tmp_path / "series", "P", [FakeNodule(2, 20, 30, 4.0, (4, 5))],
                             n_slices=4, size=size)
    hu = read_series(series.files).slice_hu(2).astype(np.float64)
    rr, cc = np.mgrid[:size, :size] - size / 2
    return np.where(np.hypot(rr, cc) < 0.45 * size, hu, -1000.0)


def mu_of(hu):
    return (MU_WATER * (1.0 + hu / 1000.0) * PIXEL_CM)[None]


def noisy_and_clean(hu, backend, seeds, n_angles):
    mu = mu_of(hu)
    photons = ct_bin_photons(4096.0, "mm", PIXEL_CM * 10)
    clean = tomo.round_trip(mu, n_angles, backend=backend, photons=[None], rngs=[None])[0]
    noisy = [tomo.round_trip(mu, n_angles, backend=backend, photons=[photons],
                             rngs=[np.random.default_rng(s)])[0] for s in seeds]
    return np.stack(noisy) * TO_HU - 1000.0, clean * TO_HU - 1000.0


@pytest.mark.parametrize("slice_kind", ["phantom", "dicom"])
def test_nufft_gives_the_references_mean_noise_sd_and_noise_power(slice_kind, tmp_path):
    """Statistical agreement with scikit-image (different realisations of the same noise
    model): mean HU, noise SD and the noise power spectrum within 5 %, the noise-free round
    trips within a few HU against a noise SD of tens."""
    hu = phantom_hu() if slice_kind == "phantom" else fixture_hu(tmp_path)
    seeds, n_angles = range(6), 180
    ref_noisy, ref_clean = noisy_and_clean(hu, "skimage", seeds, n_angles)
    new_noisy, new_clean = noisy_and_clean(hu, "nufft", seeds, n_angles)
    ref_noise, new_noise = ref_noisy - ref_clean, new_noisy - new_clean
    body = hu > -900
    sd = ref_noise[:, body].std()
    assert 30 < sd < 200  # a real noise level, so the ratios below mean something
    assert new_noise[:, body].std() / sd == pytest.approx(1, abs=0.05)
    assert abs(new_noisy[:, body].mean() - ref_noisy[:, body].mean()) < 0.05 * sd
    assert np.abs(new_clean - ref_clean).mean() < 0.1 * sd
    _, ref_nps = noise_power_spectrum(ref_noise, 0.7, n_bins=4)
    _, new_nps = noise_power_spectrum(new_noise, 0.7, n_bins=4)
    np.testing.assert_allclose(new_nps / ref_nps, 1, atol=0.05)


def test_nufft_reconstructs_the_same_noise_as_the_reference():
    """The same noisy sinogram through both reconstructions: noise SD and NPS per ring within
    3 % (the back-projection's linear interpolation modelled in the spectrum)."""
    hu = phantom_hu(128)
    sino = tomo.project(mu_of(hu), 200, backend="skimage")[0]
    photons = ct_bin_photons(4096.0, "mm", 7.0)
    noisy = np.stack([tomo.add_photon_noise(sino, photons, np.random.default_rng(s))
                      for s in range(3)])
    noise = {b: tomo.reconstruct(noisy, 200, hu.shape, backend=b)
             - tomo.reconstruct(sino[None], 200, hu.shape, backend=b) for b in ("skimage", "nufft")}
    assert noise["nufft"].std() / noise["skimage"].std() == pytest.approx(1, abs=0.01)
    ratio = noise_power_spectrum(noise["nufft"], n_bins=16)[1] / noise_power_spectrum(
        noise["skimage"], n_bins=16)[1]
    np.testing.assert_allclose(ratio, 1, atol=0.03)
    assert np.corrcoef(noise["nufft"].ravel(), noise["skimage"].ravel())[0, 1] > 0.99


@pytest.mark.parametrize("shape", [(64, 64), (48, 64), (65, 51)])
def test_torch_backend_is_the_references_arithmetic(shape):
    """Backend torch on the CPU (the GPU path's code) equals scikit-image to float32
    rounding, square or not (both centre the slice on pixel (rows // 2, cols // 2))."""
    mu = np.random.default_rng(1).random((2, *shape)) * 0.01
    ref = tomo.project(mu, 50, backend="skimage")
    new = tomo.project(mu, 50, backend="torch", device="cpu")
    np.testing.assert_allclose(new, ref, atol=1e-5 * np.abs(ref).max())
    back_ref = tomo.reconstruct(ref, 50, shape, backend="skimage")
    back_new = tomo.reconstruct(ref, 50, shape, backend="torch", device="cpu")
    np.testing.assert_allclose(back_new, back_ref, atol=1e-4 * np.abs(back_ref).max())
    back_nufft = tomo.reconstruct(ref, 50, shape, backend="nufft")
    assert np.abs(back_nufft - back_ref).mean() < 0.03 * np.abs(back_ref).mean()


def test_ramp_filter_is_scikit_images():
    radon_transform = pytest.importorskip("skimage.transform.radon_transform")
    for size in (64, 2048):
        np.testing.assert_allclose(tomo.ramp_filter(size),
                                   radon_transform._get_fourier_filter(size, "ramp")[:, 0])


def test_noise_power_spectrum_of_white_and_of_smoothed_noise():
    """White noise of SD s on pixels of a mm: s^2 a^2 at every frequency; its 2-D sum is the
    variance (Parseval); smoothing takes power from the high frequencies only."""
    from scipy.ndimage import uniform_filter

    white = np.random.default_rng(0).normal(0, 3.0, (20, 64, 64))
    freqs, nps = noise_power_spectrum(white, pixel_mm=0.5, n_bins=8)
    assert freqs[-1] < 1.0 and freqs[0] > 0  # cycles per mm, up to Nyquist 1 / (2 x 0.5)
    np.testing.assert_allclose(nps, 9.0 * 0.25, rtol=0.05)
    _, smooth = noise_power_spectrum(uniform_filter(white, size=(1, 3, 3)), 0.5, n_bins=8)
    assert smooth[0] / nps[0] > 0.8 and smooth[-1] / nps[-1] < 0.1
    _, one = noise_power_spectrum(white[0], 0.5, n_bins=8)  # one image: the same estimate
    assert one.mean() == pytest.approx(9.0 * 0.25, rel=0.1)
    with pytest.raises(ValueError, match=r"expects noise images.*got shape \(3,\)"):
        noise_power_spectrum(np.zeros(3))


def test_same_seed_same_noise_other_backend_other_noise_and_other_id():
    conf = {b: get_confounder("ct_noise", n_angles=60, backend=b) for b in tomo.BACKENDS}
    hu = phantom_hu(64)
    out = {b: c.inject_hu(hu, True, 7, "slice-1", pixel_mm=(0.7, 0.7)) for b, c in conf.items()}
    again = conf["nufft"].inject_hu(hu, True, 7, "slice-1", pixel_mm=(0.7, 0.7))
    np.testing.assert_array_equal(out["nufft"], again)
    assert not np.array_equal(out["nufft"], out["skimage"])
    assert conf["nufft"].spec()["backend"] == "nufft"
    # runs: the default is written out (a new id); the reference keeps the ids of runs made
    # before the parameter existed
    assert identity_params("ct_noise", {}) == {"backend": "nufft"}
    assert identity_params("ct_noise", {"backend": "skimage", "n_angles": 60}) == {"n_angles": 60}
    assert identity_params("tag", {"text": "L"}) == {"text": "L"}


def test_grid_cells_and_run_configs_agree_on_the_backend():
    from sm_utils.runs import RunConfig

    config = RunConfig(manifest="m.csv", confounder="ct_noise", confounder_params={"n0": 1e4})
    assert config.confounder_params == {"n0": 1e4, "backend": "nufft"}
    config = RunConfig(manifest="m.csv", confounder="ct_noise",
                       confounder_params={"backend": "skimage"})
    assert config.confounder_params == {}


def test_bad_input_is_named_with_its_fix():
    hu = phantom_hu(64)
    with pytest.raises(ConfounderError, match=r"backend must be one of \['nufft', 'torch', "
                                              r"'skimage'\]; got 'astra'"):
        get_confounder("ct_noise", backend="astra").inject_hu(hu, True, 0, "a",
                                                             pixel_mm=(0.7, 0.7))
    for backend in tomo.BACKENDS:
        conf = get_confounder("ct_noise", n_angles=20, backend=backend)
        with pytest.raises(ConfounderError, match=r"square pixels.*0\.7 x 0\.9 mm\. "
                                                  r"Resample the series"):
            conf.inject_hu(hu, False, 0, "a", pixel_mm=(0.7, 0.9))
    if not torch.cuda.is_available():
        with pytest.raises(ConfounderError, match=r"device 'cuda'.*no CUDA GPU.*'nufft'"):
            tomo.project(mu_of(hu), 20, backend="torch", device="cuda")


def test_out_of_gpu_memory_halves_the_chunk_then_falls_back_to_the_cpu():
    """A slice too large for the GPU: smaller chunks of angles first, then the CPU with a
    warning, with the same work (so the same numbers), never a silent change."""
    calls = []

    def work(device, chunk):
        calls.append((device.type, chunk))
        if device.type == "cuda" and chunk > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return device.type, chunk

    assert with_memory_fallback(work, torch.device("cuda"), lambda d: 8, "a slice") == ("cuda", 2)
    assert calls == [("cuda", 8), ("cuda", 4), ("cuda", 2)]

    def never_fits(device, chunk):
        if device.type == "cuda":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return device.type, chunk

    with warnings.catch_warnings(record=True) as caught, \
            pytest.MonkeyPatch.context() as patch:
        warnings.simplefilter("always")
        patch.setattr(torch.cuda, "empty_cache", lambda: None)
        assert with_memory_fallback(never_fits, torch.device("cuda"),
                                    lambda d: 4 if d.type == "cuda" else 16, "a slice") == ("cpu", 16)
    assert any("does not fit in the memory of cuda" in str(w.message)
               and "same numbers" in str(w.message) for w in caught)


def test_the_grid_fills_every_ct_memo_once_batched_and_runs_read_them(tmp_path, monkeypatch):
    """sm_utils.grid.memos: the memos of every cell's CT rows (confounded and baseline, every
    split) computed before the cells, at the paths a run looks for, with the run's bits."""
    from fakes.lidc_files import make_lidc_root

    from sm_utils.confounders import paper
    from sm_utils.data import ConfoundedImageDataset, ImageCache
    from sm_utils.datasets import build_dataset
    from sm_utils.grid.memos import fill_memos, memoised_hu_confounder, missing_memos, prefill
    from sm_utils.manifest import load_manifest
    from sm_utils.runs import RunConfig, get_run_confounder, split_rows

    monkeypatch.setenv("SM_CACHE_DIR", str(tmp_path / "cache"))
    _, table = make_lidc_root(tmp_path / "lidc", n_patients=6)
    build_dataset("lidc_idri", tmp_path / "data", root=tmp_path / "lidc", annotations=table,
                  image="slice", n_folds=2, test_fraction=0.34, val_fraction=0.34)
    cells = [{"manifest": str(tmp_path / "data" / "manifest.csv"), "confounder": "ct_noise",
              "confounder_params": {"n_angles": 30}, "p": p, "fold": 0, "image_size": 32,
              "resize": "nearest", "seed": 5, "runs_dir": "x", "device": "cpu"}
             for p in (0.5, 1.0)]
    assert memoised_hu_confounder(cells[0]) and not memoised_hu_confounder(
        {**cells[0], "confounder": "tag", "confounder_params": {}})
    missing = missing_memos(cells)
    lines = []
    done = prefill([SimpleNamespace(params=c) for c in cells], "cpu", log=lines.append)
    # in a child process; baseline slices are shared by both prevalences: each memo once
    assert done["written"] == done["memos"] == len(missing) > 0
    assert f"ct memos: {len(missing)} written" in lines[-1]
    assert missing_memos(cells) == {} and fill_memos(cells, log=lambda line: None)["written"] == 0

    # a run now reads every memo (computing one would fail) and gets what it computes itself
    config = RunConfig.from_dict({k: v for k, v in cells[1].items()})
    manifest = load_manifest(config.manifest)
    conf = get_run_confounder(config)
    rows = split_rows(config, manifest, conf)["train"]
    cache = ImageCache.for_manifest(manifest, 32, tmp_path / "cache", resize="nearest")

    def images(confounder):
        data = ConfoundedImageDataset(rows, cache, confounder=confounder, seed=5,
                                      root=manifest.root, resize="nearest")
        return np.stack([data.image(i) for i in range(len(rows))])

    fresh = images(conf)
    with monkeypatch.context() as patch:
        patch.setattr(paper, "ct_round_trip_hu", lambda *a, **k: pytest.fail("recomputed"))
        memoised = images(conf.memoised_under(tmp_path / "cache" / "confounders"))
    np.testing.assert_array_equal(memoised, fresh)
    assert rows["confounded"].any() and not rows["confounded"].all()
