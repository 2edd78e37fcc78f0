"""scikit-image's ``radon`` and ``iradon`` arithmetic in PyTorch: CT dose noise on a GPU.

The same operations as :mod:`skimage.transform` (``circle=False``, ramp filter, linear
interpolation), vectorised over slices and angles in float32 on any torch device:

- projection: each angle's rotation of the zero-padded slice sampled bilinearly
  (``grid_sample``, zeros outside, as scikit-image's ``warp`` with ``mode="constant"``) and
  summed along the rays; the slices of a batch are the channels of one ``grid_sample``;
- reconstruction: the ramp filter (given, :func:`sm_utils.confounders.tomography.ramp_filter`)
  by FFT, then each filtered projection interpolated linearly at every pixel and summed.

Angles are processed in chunks sized to the device's free memory. Out of GPU memory, a chunk is
halved and retried (the sums are the same, up to float32 rounding); if even one angle does not
fit, the slice is computed on the CPU with the same code and a warning says so, so a slice too
large for the GPU gives the same numbers, slower, never different noise (the noise is drawn on
the CPU by the caller in every case).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import numpy as np

from .validation import ConfounderError

CPU_CHUNK_BYTES = 256 * 2 ** 20  # working memory per chunk on the CPU
GPU_MEMORY_SHARE = 0.25          # of the free GPU memory, per chunk


def resolve_device(device=None):
    """A torch device: ``None`` is the CPU; "cuda" without CUDA is refused, naming the fix."""
    import torch

    device = torch.device("cpu" if device is None else device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfounderError(
            f"ct_noise: device {str(device)!r} was asked for, but torch finds no CUDA GPU here "
            f"(torch {torch.__version__}). Run on a GPU machine, or use device 'cpu' or the "
            "backend 'nufft' on a CPU."
        )
    return device


def _chunk_angles(device, bytes_per_angle: int, n_angles: int) -> int:
    import torch

    budget = CPU_CHUNK_BYTES
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = int(free * GPU_MEMORY_SHARE)
    return int(min(n_angles, max(1, budget // max(bytes_per_angle, 1))))


def with_memory_fallback(work: Callable, device, chunk_for: Callable, what: str):
    """``work(device, chunk)`` with ``chunk = chunk_for(device)`` angles at a time, halving the
    chunk on running out of GPU memory, and on the CPU (with a warning naming ``what``) when a
    single angle does not fit."""
    import torch

    chunk = chunk_for(device)
    while True:
        try:
            return work(device, chunk)
        except torch.cuda.OutOfMemoryError as error:
            if device.type == "cpu":
                raise
            torch.cuda.empty_cache()
            if chunk > 1:
                chunk = max(1, chunk // 2)
                continue
            warnings.warn(
                f"ct_noise: {what} does not fit in the memory of {device} even one angle at a "
                f"time ({error.__class__.__name__}); computing it on the CPU with the same "
                "arithmetic (the same numbers, slower). Free GPU memory or use fewer slices "
                "per batch to stay on the GPU.", RuntimeWarning, stacklevel=3)
            device = torch.device("cpu")
            chunk = chunk_for(device)


def project(mu: np.ndarray, theta_deg: np.ndarray, n_bins: int, *, device=None) -> np.ndarray:
    """Sinograms (batch x bins x angles, float64) of slices (batch x rows x cols)."""
    import torch

    device = resolve_device(device)
    batch, rows, cols = mu.shape
    centre = n_bins // 2
    pad_row = (rows + n_bins - rows) // 2 - rows // 2  # scikit-image's pad before the slice
    pad_col = (cols + n_bins - cols) // 2 - cols // 2
    theta = np.deg2rad(np.asarray(theta_deg, dtype=np.float64))

    def work(dev, chunk):
        image = torch.as_tensor(mu, dtype=torch.float32, device=dev)[None]  # slices = channels
        steps = torch.arange(n_bins, dtype=torch.float32, device=dev) - centre
        along, across = steps[:, None], steps[None, :]  # y (summed), x (the bin)
        # grid_sample's coordinates (align_corners): -1 at the first pixel, 1 at the last
        scale_col, scale_row = 2.0 / max(cols - 1, 1), 2.0 / max(rows - 1, 1)
        out = torch.empty((batch, len(theta), n_bins), dtype=torch.float32, device=dev)
        for start in range(0, len(theta), chunk):
            part = theta[start: start + chunk]
            cos = torch.as_tensor(np.cos(part), dtype=torch.float32, device=dev)[:, None, None]
            sin = torch.as_tensor(np.sin(part), dtype=torch.float32, device=dev)[:, None, None]
            grid = torch.empty((len(part), n_bins, n_bins, 2), dtype=torch.float32, device=dev)
            # column, row = centre + R (bin, step) - the padding in front of the slice
            grid[..., 0] = ((centre - pad_col) * scale_col - 1) + (cos * scale_col) * across \
                + (sin * scale_col) * along
            grid[..., 1] = ((centre - pad_row) * scale_row - 1) - (sin * scale_row) * across \
                + (cos * scale_row) * along
            sampled = torch.nn.functional.grid_sample(
                image, grid.reshape(1, -1, n_bins, 2), mode="bilinear", padding_mode="zeros",
                align_corners=True)  # (chunk x y) rows of the sampled image
            out[:, start: start + len(part)] = sampled.reshape(
                batch, len(part), n_bins, n_bins).sum(dim=2)
        return out.transpose(1, 2).double().cpu().numpy()

    per_angle = n_bins * n_bins * 4 * (2 + 2 * batch)
    return with_memory_fallback(work, device,
                                lambda dev: _chunk_angles(dev, per_angle, len(theta)),
                                f"the projection of {batch} slice(s) of {rows} x {cols} px")


def reconstruct(sinograms: np.ndarray, theta_deg: np.ndarray, shape: Sequence[int],
                ramp: np.ndarray, *, device=None) -> np.ndarray:
    """Filtered back-projections (batch x rows x cols, float64) of sinograms (batch x bins x
    angles); ``ramp``: the filter on the rfft frequencies of the padded projection."""
    import torch

    device = resolve_device(device)
    batch, n_bins, n_angles = sinograms.shape
    rows, cols = (int(s) for s in shape)
    size = 2 * (len(ramp) - 1)
    theta = np.deg2rad(np.asarray(theta_deg, dtype=np.float64))

    def work(dev, chunk):
        sino = torch.as_tensor(sinograms, dtype=torch.float32, device=dev).transpose(1, 2)
        spectrum = torch.fft.rfft(sino, n=size, dim=2) * torch.as_tensor(
            ramp, dtype=torch.float32, device=dev)
        filtered = torch.fft.irfft(spectrum, n=size, dim=2)[..., :n_bins]  # batch x angles x bins
        # a zero on each side: linear interpolation reaches 0 just outside the detector
        filtered = torch.nn.functional.pad(filtered, (1, 1)).contiguous()
        row = torch.arange(rows, dtype=torch.float32, device=dev)[:, None] - rows // 2
        col = torch.arange(cols, dtype=torch.float32, device=dev)[None, :] - cols // 2
        image = torch.zeros((batch, rows * cols), dtype=torch.float32, device=dev)
        for start in range(0, n_angles, chunk):
            part = theta[start: start + chunk]
            cos = torch.as_tensor(np.cos(part), dtype=torch.float32, device=dev)[:, None, None]
            sin = torch.as_tensor(np.sin(part), dtype=torch.float32, device=dev)[:, None, None]
            # the bin index of each pixel's ray, + 1 for the zero padded in front
            t = (col * cos - row * sin + (n_bins // 2 + 1)).reshape(len(part), -1)
            inside = (t >= 1) & (t <= n_bins)
            low = t.floor().clamp(0, n_bins)
            weight = (t - low) * inside
            index = low.long()[None].expand(batch, -1, -1)
            values = filtered[:, start: start + len(part)]
            left = torch.gather(values, 2, index)
            right = torch.gather(values, 2, index + 1)
            image += ((left + weight * (right - left)) * inside).sum(dim=1)
        scale = math.pi / (2 * n_angles)
        return (image.double() * scale).reshape(batch, rows, cols).cpu().numpy()

    per_angle = rows * cols * (4 * 5 + 8 * batch + 4 * 4 * batch)
    return with_memory_fallback(work, device,
                                lambda dev: _chunk_angles(dev, per_angle, n_angles),
                                f"the reconstruction of {batch} slice(s) of {rows} x {cols} px")
