"""Parallel-beam projection and filtered back-projection for CT dose noise (``ct_noise``).

One geometry, scikit-image's (``radon(circle=False)`` and ``iradon(filter_name="ramp")``): the
slice padded to a square of side ``ceil(sqrt(2) x side)``, one detector bin per pixel
(``n_bins`` bins, the rotation centre at pixel (rows // 2, cols // 2) and at bin n_bins // 2),
the image's bilinear interpolant summed along each ray, the ramp filter of Kak and Slaney
(eq. 61, zero-padded to a power of two), and a back-projection that interpolates each filtered
projection linearly. Three implementations (``backend``):

- ``"skimage"``: scikit-image itself, one angle at a time in float64: the reference (8.8-11.5 s
  per 512 px slice at 1,000 angles on one core).
- ``"nufft"`` (the default): the same operators in the Fourier domain (the Fourier slice
  theorem), computed with FINUFFT's non-uniform FFTs in float32 on one thread, 30-50x faster.
  The bilinear interpolant's spectrum (sinc^2 x sinc^2) and the sampling of each projection at
  the detector bins (its aliases one cycle per pixel away) are modelled in the projection; the
  back-projection's linear interpolation is the filtered projection's spectrum times sinc^2
  with its aliases up to 1.5 cycles per pixel (what lies beyond carries < 0.2 % of the noise
  power). Along each ray it integrates where scikit-image sums samples one pixel apart, so the
  two differ at sharp edges: ``benchmarks/bench_ct_noise.py`` measures by how much.
- ``"torch"``: scikit-image's arithmetic vectorised in PyTorch (float32) on a device: CUDA
  when given (:mod:`sm_utils.confounders.tomography_torch`), batched over slices and angles.

Only the projection and the reconstruction differ: the photon noise is always drawn by
:func:`round_trip` with numpy's ``Generator.poisson`` on the float64 sinogram in
scikit-image's layout (bins x angles), so one rng stream gives each backend its own, nearly
identical realisation. The backends' noise realisations are *not* the same bits: the backend
is a parameter of ``ct_noise`` and part of every run's identity and memo key.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Sequence

import numpy as np

from .validation import ConfounderError

BACKENDS = ("nufft", "torch", "skimage")
ZERO_COUNTS = 0.1  # counts where no photon arrives (as in LoDoPaB-CT): keeps log finite
NUFFT_EPS = 1e-3   # FINUFFT's relative tolerance (float32): the noise-free round trip moves 0.03 HU
NUFFT_UPSAMPLING = 1.25
FORWARD_ALIASES = 1  # detector-sampling aliases on each side in the projection
BACK_BAND = 1.5      # cycles per pixel kept of the back-projection's interpolation


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ConfounderError(
            f"ct_noise: backend must be one of {list(BACKENDS)}; got {backend!r}. 'nufft' is "
            "the fast default on a CPU, 'torch' runs on the grid's device (CUDA), 'skimage' is "
            "the slow reference."
        )
    return backend


def n_detector_bins(shape: Sequence[int]) -> int:
    """Bins of scikit-image's projection of an image of ``shape`` (``circle=False``)."""
    diagonal = np.sqrt(2) * max(shape)
    return int(shape[0] + int(np.ceil(diagonal - shape[0])))


def angles_deg(n_angles: int, shape: Sequence[int]) -> np.ndarray:
    """Projection angles in degrees over [0, 180); ``n_angles`` <= 0: one per pixel of side."""
    count = n_angles if n_angles > 0 else max(shape)
    return np.linspace(0.0, 180.0, count, endpoint=False)


def ramp_filter(size: int) -> np.ndarray:
    """scikit-image's ramp filter for a projection zero-padded to ``size`` (even): the Fourier
    transform of the ramp's sampled impulse response (Kak and Slaney, eq. 61), which keeps the
    DC term at the value the discrete ramp needs instead of 0."""
    n = np.concatenate((np.arange(1, size / 2 + 1, 2, dtype=int),
                        np.arange(size / 2 - 1, 0, -2, dtype=int)))
    impulse = np.zeros(size)
    impulse[0] = 0.25
    impulse[1::2] = -1 / (np.pi * n) ** 2
    return 2 * np.real(np.fft.fft(impulse))


def padded_size(n_bins: int) -> int:
    """The zero-padded projection length of the ramp filtering (scikit-image's)."""
    return max(64, int(2 ** np.ceil(np.log2(2 * n_bins))))


def filter_projections(sinogram: np.ndarray) -> np.ndarray:
    """Ramp-filtered projections (bins x angles, or batches of them on axis -2)."""
    n_bins = sinogram.shape[-2]
    size = padded_size(n_bins)
    spectrum = np.fft.rfft(sinogram, n=size, axis=-2) * ramp_filter(size)[: size // 2 + 1, None]
    return np.fft.irfft(spectrum, n=size, axis=-2)[..., :n_bins, :]


# --- the reference: scikit-image ----------------------------------------------------------

def _skimage_project(mu: np.ndarray, theta: np.ndarray) -> np.ndarray:
    from skimage.transform import radon

    return radon(mu, theta=theta, circle=False)


def _skimage_reconstruct(sinogram: np.ndarray, theta: np.ndarray, shape) -> np.ndarray:
    from skimage.transform import iradon

    side = max(shape)
    out = iradon(sinogram, theta=theta, output_size=side, circle=False, filter_name="ramp")
    # iradon puts the rotation centre at (side // 2, side // 2); the slice's is at
    # (rows // 2, cols // 2): cut the slice around it (for square slices: all of it)
    top, left = side // 2 - shape[0] // 2, side // 2 - shape[1] // 2
    return out[top: top + shape[0], left: left + shape[1]]


# --- the Fourier-domain operators (FINUFFT) -----------------------------------------------

class _NufftGeometry:
    """Frequencies, weights and FINUFFT plans of one (shape, angles), made once per thread."""

    def __init__(self, shape: tuple[int, int], n_angles: int):
        from scipy.fft import next_fast_len

        try:
            import finufft
        except ImportError as error:
            raise ConfounderError(
                "ct_noise: backend 'nufft' needs the package finufft, a dependency of sm_utils "
                f"that this Python lacks ({error}). Install it (`pip install -c constraints.txt "
                "finufft`, or `make setup`), or set the confounder's backend to 'torch' (a GPU) "
                "or 'skimage' (slow); each gives its own noise realisation and run ids."
            ) from error

        self.shape, self.theta = shape, angles_deg(n_angles, shape)
        self.n_bins = n_detector_bins(shape)
        # projection period in bins: more than the support of a projection, so no wrap-around
        self.period = next_fast_len(self.n_bins + 2)
        rad = np.deg2rad(self.theta)
        cos, sin = np.cos(rad)[:, None], np.sin(rad)[:, None]
        # detector axis in (col, row) pixel offsets: (cos, -sin) (scikit-image's rotation)
        base = np.arange(self.period // 2 + 1) / self.period  # rfft frequencies, cycles/pixel
        fwd = (base[None, :] + np.arange(-FORWARD_ALIASES, FORWARD_ALIASES + 1)[:, None]).ravel()
        fwd_col, fwd_row = fwd[None, :] * cos, -fwd[None, :] * sin
        self.forward_weight = (np.sinc(fwd_col) ** 2 * np.sinc(fwd_row) ** 2).astype(np.float32)
        back = np.arange(int(np.ceil(BACK_BAND * self.period))) / self.period
        self.back_index = np.arange(back.size) % self.period
        # pair (nu, -nu) of a real image: twice the nu > 0 half; sinc^2: linear interpolation
        self.back_weight = (np.where(back == 0, 1.0, 2.0) * np.sinc(back) ** 2 / self.period
                            * np.exp(2j * np.pi * back * (self.n_bins // 2))).astype(np.complex64)
        back_col, back_row = back[None, :] * cos, -back[None, :] * sin
        opts = {"eps": NUFFT_EPS, "dtype": np.complex64, "nthreads": 1,
                "upsampfac": NUFFT_UPSAMPLING}
        self.forward_plan = finufft.Plan(2, shape, isign=-1, **opts)
        self.forward_plan.setpts(*(np.ascontiguousarray(2 * np.pi * f.ravel(), np.float32)
                                   for f in (fwd_row, fwd_col)))
        self.back_plan = finufft.Plan(1, shape, isign=1, **opts)
        self.back_plan.setpts(*(np.ascontiguousarray(2 * np.pi * f.ravel(), np.float32)
                                for f in (back_row, back_col)))
        self.n_aliases = 2 * FORWARD_ALIASES + 1
        size = padded_size(self.n_bins)
        self.ramp = ramp_filter(size)[: size // 2 + 1].astype(np.float32)

    def project(self, mu: np.ndarray) -> np.ndarray:
        """Sinogram (bins x angles) of ``mu``: the bilinear interpolant's line integrals."""
        from scipy import fft

        spectrum = self.forward_plan.execute(mu.astype(np.complex64))
        spectrum = (spectrum.reshape(len(self.theta), -1) * self.forward_weight)
        spectrum = spectrum.reshape(len(self.theta), self.n_aliases, -1).sum(axis=1)
        periodic = fft.irfft(spectrum, n=self.period, axis=1)  # column j: bin offset j
        offsets = np.arange(self.n_bins) - self.n_bins // 2
        return periodic[:, offsets % self.period].T.astype(np.float64)

    def reconstruct(self, sinogram: np.ndarray) -> np.ndarray:
        """Filtered back-projection of a sinogram (bins x angles), scaled as scikit-image's."""
        from scipy import fft

        projections = np.ascontiguousarray(sinogram.T, dtype=np.float32)  # angles x bins
        size = padded_size(self.n_bins)
        filtered = fft.irfft(fft.rfft(projections, n=size, axis=1) * self.ramp, n=size,
                             axis=1)[:, : self.n_bins]
        spectrum = fft.fft(filtered, n=self.period, axis=1)[:, self.back_index]
        image = self.back_plan.execute((spectrum * self.back_weight).ravel())
        return image.real.astype(np.float64) * np.pi / (2 * len(self.theta))


_THREAD = threading.local()


def _nufft_geometry(shape: tuple[int, int], n_angles: int) -> _NufftGeometry:
    cache = getattr(_THREAD, "geometries", None)
    if cache is None:
        cache = _THREAD.geometries = {}
    key = (tuple(shape), int(n_angles))
    if key not in cache:
        if len(cache) >= 4:
            cache.pop(next(iter(cache)))
        cache[key] = _NufftGeometry(key[0], key[1])
    return cache[key]


# --- the round trip -------------------------------------------------------------------------

def project(mu: np.ndarray, n_angles: int, *, backend: str, device=None) -> np.ndarray:
    """Sinograms (batch x bins x angles) of a batch of slices (batch x rows x cols)."""
    check_backend(backend)
    mu = np.asarray(mu, dtype=np.float64)
    shape = mu.shape[1:]
    if backend == "torch":
        from .tomography_torch import project as torch_project

        return torch_project(mu, angles_deg(n_angles, shape), n_detector_bins(shape),
                             device=device)
    if backend == "skimage":
        return np.stack([_skimage_project(m, angles_deg(n_angles, shape)) for m in mu])
    geometry = _nufft_geometry(shape, n_angles)
    return np.stack([geometry.project(m) for m in mu])


def reconstruct(sinograms: np.ndarray, n_angles: int, shape: Sequence[int], *, backend: str,
                device=None) -> np.ndarray:
    """Filtered back-projections (batch x rows x cols) of sinograms (batch x bins x angles)."""
    check_backend(backend)
    shape = tuple(int(s) for s in shape)
    if backend == "torch":
        from .tomography_torch import reconstruct as torch_reconstruct

        size = padded_size(sinograms.shape[1])
        return torch_reconstruct(sinograms, angles_deg(n_angles, shape), shape,
                                 ramp_filter(size)[: size // 2 + 1], device=device)
    if backend == "skimage":
        return np.stack([_skimage_reconstruct(s, angles_deg(n_angles, shape), shape)
                         for s in sinograms])
    geometry = _nufft_geometry(shape, n_angles)
    return np.stack([geometry.reconstruct(s) for s in sinograms])


def add_photon_noise(sinogram: np.ndarray, photons: float,
                     rng: np.random.Generator) -> np.ndarray:
    """Line integrals measured with Poisson photon counts: ``photons`` per bin unattenuated,
    a bin that counts none set to 0.1 photon, then -log(counts / photons)."""
    counts = rng.poisson(photons * np.exp(-sinogram)).astype(np.float64)
    counts[counts == 0] = ZERO_COUNTS
    return -np.log(counts / photons)


def round_trip(mu: np.ndarray, n_angles: int, *, backend: str,
               photons: Sequence[float | None], rngs: Sequence[np.random.Generator | None],
               device=None) -> np.ndarray:
    """Project a batch of slices (batch x rows x cols, attenuation per pixel), add photon noise
    where ``photons[i]`` is not None (drawn from ``rngs[i]``), reconstruct; float64 out."""
    mu = np.asarray(mu, dtype=np.float64)
    if mu.ndim != 3 or len(photons) != len(mu) or len(rngs) != len(mu):
        raise ConfounderError(
            f"round_trip expects a batch of slices (batch x rows x cols) with one photon count "
            f"and one rng per slice; got shape {mu.shape}, {len(photons)} photon counts and "
            f"{len(rngs)} rngs."
        )
    sinograms = project(mu, n_angles, backend=backend, device=device)
    for i, (count, rng) in enumerate(zip(photons, rngs)):
        if count is not None:
            sinograms[i] = add_photon_noise(sinograms[i], count, rng)
    return reconstruct(sinograms, n_angles, mu.shape[1:], backend=backend, device=device)


@functools.lru_cache(maxsize=1)
def finufft_version() -> str:
    """The FINUFFT in use (for benchmarks and reports)."""
    import finufft

    return getattr(finufft, "__version__", "unknown")
