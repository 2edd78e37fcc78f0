"""The data pipeline of fine-tuning: a uint8 image cache, confounders on the fly, augmentation.

- :class:`ImageCache`: every image of a manifest decoded (8-bit grey) and resized once to
  ``size x size`` (with a method of :mod:`sm_utils.imaging`: ``nearest`` as the paper's Keras
  loader, ``bilinear`` anti-aliased) into one memory-mapped uint8 array, so epochs never
  re-decode PNGs. The cache file is keyed by the manifest's paths (with file sizes and
  modification times), its root, the size and the method; the grid's runs share one cache per
  (manifest, size, method).
- :class:`ConfoundedImageDataset`: rows of one split; each item is the model-input image of the
  row, confounded or not (``Confounder.prepare``: the confounder on confounded rows, the
  baseline, e.g. normal-dose noise, on the others, at the confounder's resolution, then resized
  to the input), then the paper's augmentation when training. The images a confounder changes
  are computed once when the dataset is made (and kept on disk across runs when the confounder
  has a cache); the others come from the image cache. Items are uint8 tensors (1, H, W);
  normalisation is the source's business (``prep`` in :mod:`sm_utils.sources`), applied to
  whole batches on the training device.

Augmentation is the paper's Keras 2.15 ``ImageDataGenerator(rotation_range=10,
width_shift_range=0.1, height_shift_range=0.1, shear_range=0.1, zoom_range=0.1)`` (no flips,
``fill_mode="nearest"``), as Keras computes it (:class:`Augmentation`): the same random draws
(rotation and shear in degrees, so the shear is at most 0.1 degree; shifts in fractions of the
side; a zoom per axis), the same transform matrix about the image centre, and bilinear
sampling with the edge pixels repeated, done for a whole batch at once with ``grid_sample``
(border padding) on the device that holds it. What differs: the draws come from numpy's
generator seeded by (seed, epoch, row), not Keras' global one (so an epoch's augmentation does
not depend on data-loader workers), and the result is rounded to uint8 (Keras passes floats
on to the preprocessing).
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from .hounsfield import HounsfieldError, SliceView, read_hu_png, slice_view
from .imaging import ImageError, check_resize_method, load_grey, resize_grey
from .io import atomic_path, atomic_write_json, stable_hash
from .manifest import Manifest
from .paths import default_cache_dir
from .progress import available_cpus, progress_bar

CACHE_VERSION = 2
MIN_IMAGE_SIZE = 32


class DataError(ValueError):
    """Images or rows that the data pipeline cannot use as given."""


# --- augmentation ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Augmentation:
    """Keras 2.15's ``ImageDataGenerator`` random affine transform; the defaults are the
    paper's settings (``rotation_range=10``, ``height_shift_range=width_shift_range=0.1``,
    ``shear_range=0.1``, ``zoom_range=0.1``, ``fill_mode="nearest"``)."""

    rotation_degrees: float = 10.0
    shift: float = 0.1             # of the side, rows and columns each
    shear_degrees: float = 0.1     # Keras' shear_range is in degrees (np.deg2rad in Keras 2.x)
    zoom: float = 0.1              # rows and columns each scaled by [1 - zoom, 1 + zoom]

    def sample(self, rng: np.random.Generator, height: int, width: int) -> dict[str, float]:
        """One image's parameters, drawn as Keras' ``get_random_transform`` draws them."""
        theta = rng.uniform(-self.rotation_degrees, self.rotation_degrees)
        tx = rng.uniform(-self.shift, self.shift) * height
        ty = rng.uniform(-self.shift, self.shift) * width
        shear = rng.uniform(-self.shear_degrees, self.shear_degrees)
        zx, zy = rng.uniform(1.0 - self.zoom, 1.0 + self.zoom, 2)
        return {"theta": float(theta), "tx": float(tx), "ty": float(ty), "shear": float(shear),
                "zx": float(zx), "zy": float(zy)}

    @staticmethod
    def matrix(params: dict[str, float], height: int, width: int) -> np.ndarray:
        """The 3 x 3 matrix that maps an output pixel's (row, column) to the input position it
        samples, as Keras' ``apply_affine_transform`` builds it: rotation, shift, shear and
        zoom, about the centre (h / 2 - 0.5, w / 2 - 0.5) as Keras 2.15's
        ``transform_matrix_offset_center`` puts it (the older keras-preprocessing used + 0.5),
        then Keras' swap of its x and y axes for row-major arrays."""
        theta, shear = np.deg2rad(params["theta"]), np.deg2rad(params["shear"])
        rotation = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0],
                             [0, 0, 1]])
        shift = np.array([[1, 0, params["tx"]], [0, 1, params["ty"]], [0, 0, 1]])
        shearing = np.array([[1, -np.sin(shear), 0], [0, np.cos(shear), 0], [0, 0, 1]])
        zoom = np.array([[params["zx"], 0, 0], [0, params["zy"], 0], [0, 0, 1]])
        matrix = rotation @ shift @ shearing @ zoom
        o_x, o_y = height / 2 - 0.5, width / 2 - 0.5
        centred = (np.array([[1, 0, o_x], [0, 1, o_y], [0, 0, 1]]) @ matrix
                   @ np.array([[1, 0, -o_x], [0, 1, -o_y], [0, 0, 1]]))
        swap = np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1]])
        return swap @ centred @ swap

    def draw(self, rngs: Sequence[np.random.Generator], height: int, width: int) -> np.ndarray:
        """(N, 3, 3) matrices, one per generator."""
        return np.stack([self.matrix(self.sample(rng, height, width), height, width)
                         for rng in rngs])

    def __call__(self, image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """Augment one uint8 tensor (C, H, W); the result is uint8 of the same shape."""
        return apply_affine(image.unsqueeze(0), self.draw([rng], *image.shape[-2:]))[0]


def apply_affine(images: torch.Tensor, matrices: np.ndarray) -> torch.Tensor:
    """Transform a batch of uint8 images (N, C, H, W) by (N, 3, 3) matrices (output (row,
    column) -> input position, :meth:`Augmentation.matrix`): bilinear sampling, positions
    outside the image take the nearest edge pixel (Keras' ``fill_mode="nearest"`` with
    ``order=1``, as ``scipy.ndimage.affine_transform``), in one ``grid_sample`` on the images'
    device; rounded back to uint8."""
    _, _, height, width = images.shape
    # grid_sample works in (x, y) = (column, row), normalised so that -1 and 1 are the centres
    # of the first and last pixels (align_corners=True); convert the index-space matrices.
    to_xy = np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1]])
    scale = np.diag([2.0 / max(width - 1, 1), 2.0 / max(height - 1, 1), 1.0])
    unit = np.array([[1, 0, -1], [0, 1, -1], [0, 0, 1]], dtype=float)
    normalise = unit @ scale
    theta = normalise @ to_xy @ matrices @ to_xy @ np.linalg.inv(normalise)
    theta = torch.as_tensor(theta[:, :2, :], dtype=torch.float32, device=images.device)
    grid = torch.nn.functional.affine_grid(theta, list(images.shape), align_corners=True)
    out = torch.nn.functional.grid_sample(images.float(), grid, mode="bilinear",
                                          padding_mode="border", align_corners=True)
    return out.round_().clamp_(0, 255).to(torch.uint8)


PAPER_AUGMENTATION = Augmentation()


# --- the uint8 image cache ---------------------------------------------------------------------


def load_stored(path: Path, view: SliceView | None = None) -> np.ndarray:
    """A row's stored image as 8-bit grey at its own resolution: the file as it is, or for a CT
    slice in HU (``view``, :mod:`sm_utils.hounsfield`) its box, windowed."""
    try:
        return load_grey(path) if view is None else view.grey(read_hu_png(path))
    except (ImageError, HounsfieldError) as err:
        raise DataError(str(err)) from err


def row_views(rows: pd.DataFrame) -> list[SliceView | None]:
    """Each row's :class:`~sm_utils.hounsfield.SliceView` (None: an 8-bit image)."""
    if "window_centre" not in rows.columns:
        return [None] * len(rows)
    try:
        return [slice_view(row) for row in rows.to_dict("records")]
    except HounsfieldError as err:
        raise DataError(str(err)) from err


def _load_resized(path: Path, size: int, resize: str = "bilinear",
                  view: SliceView | None = None) -> np.ndarray:
    """The row's image as grey uint8, squashed to ``size`` x ``size`` (as Keras'
    flow_from_dataframe)."""
    try:
        return resize_grey(load_stored(path, view), size, resize)
    except ImageError as err:
        raise DataError(str(err)) from err


def _load_or_error(path: Path, size: int, resize: str,
                   view: SliceView | None) -> tuple[np.ndarray | None, str | None]:
    try:
        return _load_resized(path, size, resize, view), None
    except DataError as err:
        return None, str(err)


class ImageCache:
    """All images of a manifest, grey uint8, ``size x size``, in one memory-mapped file.

    Build (or reuse) with :meth:`for_manifest`; look images up by ``image_id`` with
    :meth:`get` or by position with ``cache.array[i]``.
    """

    def __init__(self, array_path: Path | None, image_ids: Sequence[str], size: int,
                 array: np.ndarray | None = None):
        self.path = Path(array_path) if array_path is not None else None
        self.size = int(size)
        self.image_ids = [str(i) for i in image_ids]
        self.index = {image_id: i for i, image_id in enumerate(self.image_ids)}
        if array is None:
            array = np.memmap(self.path, dtype=np.uint8, mode="r",
                              shape=(len(self.image_ids), self.size, self.size))
        self.array = array

    @classmethod
    def in_memory(cls, array: np.ndarray, image_ids: Sequence[str]) -> ImageCache:
        """A cache over images already in memory (uint8 (N, S, S)), e.g. rendered phantoms."""
        array = np.asarray(array)
        if array.dtype != np.uint8 or array.ndim != 3 or array.shape[1] != array.shape[2]:
            raise DataError(f"expected uint8 images (N, S, S); got {array.dtype} {array.shape}.")
        if len(image_ids) != len(array):
            raise DataError(f"{len(image_ids)} ids for {len(array)} images; give one id each.")
        return cls(None, image_ids, array.shape[1], array=array)

    @staticmethod
    def key(manifest: Manifest, size: int, resize: str = "bilinear") -> str:
        """Cache key: root, size, resize method and every (image_id, path, file size, mtime),
        with a CT row's window, pixel spacing and box."""
        files = []
        views = row_views(manifest.table)
        for image_id, rel, view in zip(manifest.table["image_id"], manifest.table["path"], views):
            stat = manifest.image_path(rel).stat()
            files.append([image_id, rel, stat.st_size, stat.st_mtime_ns]
                         + ([] if view is None else [view.key()]))
        return stable_hash({"version": CACHE_VERSION, "root": str(Path(manifest.root).resolve()),
                            "size": int(size), "resize": resize, "files": files}, length=16)

    @classmethod
    def for_manifest(
        cls, manifest: Manifest, size: int, cache_dir: str | Path | None = None,
        *, threads: int | None = None, resize: str = "bilinear", progress: bool | None = None,
    ) -> ImageCache:
        """Open the cache of ``manifest`` at ``size``, building it first if it is absent, with
        ``threads`` decoding (None: every core this process may use, :func:`available_cpus`;
        the bytes are the same whatever the number).

        ``progress``: a bar while building (None: on a terminal only, see
        :mod:`sm_utils.progress`); it changes nothing in the cache.
        """
        if not isinstance(size, (int, np.integer)) or size < MIN_IMAGE_SIZE:
            raise DataError(f"image size must be an integer >= {MIN_IMAGE_SIZE}; got {size!r}.")
        check_resize_method(resize)
        cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        key = cls.key(manifest, size, resize)
        array_path = cache_dir / f"{key}_{size}px.u8"
        index_path = cache_dir / f"{key}_{size}px.json"
        ids = manifest.table["image_id"].astype(str).tolist()
        if not (array_path.is_file() and index_path.is_file()):
            cls._build(manifest, size, array_path, threads or available_cpus(), resize, progress)
            atomic_write_json(index_path, {"image_ids": ids, "size": int(size), "resize": resize,
                                           "root": str(Path(manifest.root).resolve())})
        return cls(array_path, ids, size)

    @staticmethod
    def _build(manifest: Manifest, size: int, array_path: Path, threads: int,
               resize: str = "bilinear", progress: bool | None = None) -> None:
        paths = [manifest.image_path(p) for p in manifest.table["path"]]
        views = row_views(manifest.table)
        # Written to a temporary file and renamed, so a killed build leaves no partial cache
        # (two processes building the same cache both produce the same bytes).
        with atomic_path(array_path) as tmp:
            out = np.memmap(tmp, dtype=np.uint8, mode="w+", shape=(len(paths), size, size))
            failed = []
            with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
                loaded = pool.map(lambda p, v: _load_or_error(p, size, resize, v), paths, views)
                bar = progress_bar(loaded, f"image cache {size} px ({resize})", "image",
                                   total=len(paths), enabled=progress)
                with bar:
                    for i, (pixels, error) in enumerate(bar):
                        if error is None:
                            out[i] = pixels
                        else:
                            failed.append(error)
            out.flush()
            del out
            if failed:  # every one named, not the first of them per run
                shown = "\n".join(f"  {e}" for e in failed[:20])
                more = f"\n  ... and {len(failed) - 20} more" if len(failed) > 20 else ""
                raise DataError(f"{len(failed)} of {len(paths)} images of the manifest cannot be "
                                f"read:\n{shown}{more}\nRebuild the data set (its builder "
                                "checks every image; unreadable_images='drop' leaves them out).")

    def get(self, image_id: str) -> np.ndarray:
        try:
            return np.asarray(self.array[self.index[str(image_id)]])
        except KeyError:
            raise DataError(
                f"image {image_id!r} is not in the cache {self.path.name}; the cache holds the "
                "images of another manifest. Build the cache from the manifest the rows come from."
            ) from None


# --- the dataset -------------------------------------------------------------------------------

class ConfoundedImageDataset(Dataset):
    """Rows of one split as (uint8 tensor (1, H, W), label) with the confounder injected.

    ``rows`` needs ``image_id``, ``label`` and a boolean ``confounded`` column (as
    ``sm_utils.confounders.apply_prevalence`` returns; missing means no row is confounded).
    ``confounder`` is a ``sm_utils.confounders`` Confounder or None. Synthetic confounders
    change pixels via ``confounder.prepare`` (every confounded row, and every row when the
    confounder has a baseline such as normal-dose noise), computed here once; sampled ones
    (e.g. sex) act only through which rows were chosen, so pixels are left as they are.
    A confounder acting on the stored image (``resolution`` other than "input") needs ``root``
    (the manifest's data root; rows then need ``path``) and the ``resize`` method the cache
    was built with, so that changed and unchanged images reach the model input the same way.
    """

    def __init__(
        self, rows: pd.DataFrame, cache: ImageCache, *, confounder: Any = None, seed: int = 0,
        augmentation: Augmentation | None = None, root: str | Path | None = None,
        resize: str = "bilinear", progress: bool = False,
    ):
        missing = [c for c in ("image_id", "label") if c not in rows.columns]
        if missing:
            raise DataError(f"rows lack column(s) {missing}; found {list(rows.columns)}.")
        self.rows = rows.reset_index(drop=True)
        self.cache = cache
        self.confounder = confounder
        self.seed = int(seed)
        self.augmentation = augmentation
        self.epoch = 0
        self.positions = np.array([cache.index.get(str(i), -1) for i in self.rows["image_id"]])
        if (self.positions < 0).any():
            absent = self.rows.loc[self.positions < 0, "image_id"].head(5).tolist()
            raise DataError(
                f"{int((self.positions < 0).sum())} row(s) are not in the image cache, e.g. "
                f"{absent}. Build the cache from the manifest these rows come from."
            )
        self.labels = self.rows["label"].astype(int).to_numpy()
        confounded = self.rows.get("confounded", False)
        self.confounded = np.broadcast_to(np.asarray(confounded, dtype=bool), len(self.rows)).copy()
        synthetic = confounder is not None and getattr(confounder, "kind", None) == "synthetic"
        self.changed: dict[int, np.ndarray] = {}
        if synthetic:
            self._prepare(confounder, root, resize, progress)

    def _prepare(self, conf, root, resize: str, progress: bool) -> None:
        """Model-input pixels of every row the confounder changes."""
        from tqdm import tqdm  # not tqdm.auto: no widget (and no IProgress warning) in notebooks

        from .progress import bars_disabled

        native = conf.resolution != "input"
        hounsfield = "window_centre" in self.rows.columns
        if (native or hounsfield) and (root is None or "path" not in self.rows.columns):
            raise DataError(
                f"confounder {conf.name!r} acts on the stored images (resolution "
                f"{conf.resolution!r}); pass root= (the manifest's data root) and rows with a "
                "'path' column, or set the confounder's resolution to 'input'."
            )
        todo = np.arange(len(self.rows)) if conf.has_baseline else np.flatnonzero(self.confounded)
        views = row_views(self.rows)
        bar = tqdm(todo, desc=f"{conf.name} images", unit="image", leave=False,
                   disable=True if not progress or len(todo) == 0 else bars_disabled())
        for i in bar:
            image_id = self.rows.at[i, "image_id"]
            view = views[i]
            if native or view is not None:
                # a CT slice in HU always goes from its stored slice: the confounder decides
                # whether it acts there or on the model input (Confounder.prepare)
                path = Path(root) / self.rows.at[i, "path"]
                load = load_grey if view is None else read_hu_png
                original, key = (lambda path=path, load=load: load(path)), _file_digest(path)
            else:
                original, key = np.array(self.cache.array[self.positions[i]]), None
            try:
                self.changed[int(i)] = conf.prepare(original, bool(self.confounded[i]),
                                                    self.seed, image_id, size=self.cache.size,
                                                    resize=resize, original_key=key, view=view)
            except HounsfieldError as err:
                raise DataError(str(err)) from err

    def __len__(self) -> int:
        return len(self.rows)

    def set_epoch(self, epoch: int) -> None:
        """Change the augmentation draw (call before iterating each epoch)."""
        self.epoch = int(epoch)

    def image(self, i: int) -> np.ndarray:
        """The model-input image of row ``i`` with the confounder (or its baseline) applied."""
        if i in self.changed:
            return self.changed[i]
        return np.array(self.cache.array[self.positions[i]])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        tensor = torch.from_numpy(np.ascontiguousarray(self.image(i))).unsqueeze(0)
        if self.augmentation is not None:
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.epoch, int(i), 7]))
            tensor = self.augmentation(tensor, rng)
        return tensor, int(self.labels[i])


def _file_digest(path: Path) -> str:
    """SHA-256 of a stored image's bytes: what a cached confounded image was made from."""
    import hashlib

    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError as err:
        raise DataError(f"cannot read image {path}: {err}. Check the manifest's data root.") from err


def seed_worker(worker_id: int) -> None:
    """DataLoader worker init: one torch thread per worker (workers are the parallelism)."""
    torch.set_num_threads(1)


def make_loader(
    dataset: Dataset, *, batch_size: int, shuffle: bool, seed: int, num_workers: int = 0,
    pin_memory: bool = False, drop_last: bool = False,
) -> torch.utils.data.DataLoader:
    """A DataLoader whose shuffling is seeded (same order on every machine for a seed)."""
    generator = torch.Generator()
    generator.manual_seed(int(seed))
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, generator=generator,
        num_workers=num_workers, pin_memory=pin_memory, drop_last=drop_last,
        worker_init_fn=seed_worker if num_workers else None,
        persistent_workers=False, prefetch_factor=4 if num_workers else None,
    )


class ResidentLoader:
    """Batches of a dataset whose images all stay on the training device (e.g. the GPU).

    The model-input images of every row (confounded or not: ``dataset.image``) are copied to
    ``device`` once, as uint8, when the loader is made; an epoch then copies nothing: batches are
    indexed on the device and augmented there, a batch at a time (:func:`apply_affine`, with
    each image's parameters drawn exactly as :class:`ConfoundedImageDataset` draws them). The
    order of the rows is the DataLoader's (the same seeded sampler), so on the CPU this loader
    gives the batches :func:`make_loader` gives, bit for bit.
    """

    def __init__(self, dataset: ConfoundedImageDataset, *, batch_size: int, shuffle: bool,
                 seed: int, device: torch.device | str, drop_last: bool = False):
        self.dataset = dataset
        self.device = torch.device(device)
        images = np.stack([dataset.image(i) for i in range(len(dataset))]) if len(dataset) else \
            np.zeros((0, dataset.cache.size, dataset.cache.size), np.uint8)
        self.images = torch.from_numpy(images).unsqueeze(1).to(self.device)
        self.labels = torch.from_numpy(dataset.labels.astype(np.int64)).to(self.device)
        # The rows' order: a DataLoader over the row indices, seeded as make_loader seeds its own
        generator = torch.Generator()
        generator.manual_seed(int(seed))
        self.batches = torch.utils.data.DataLoader(range(len(dataset)), batch_size=batch_size,
                                                   shuffle=shuffle, generator=generator,
                                                   drop_last=drop_last)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        augmentation = self.dataset.augmentation
        for batch in self.batches:
            index = batch.to(self.device)
            images = self.images[index]
            if augmentation is not None:
                rngs = [np.random.default_rng(np.random.SeedSequence(
                    [self.dataset.seed, self.dataset.epoch, int(i), 7])) for i in batch.tolist()]
                images = apply_affine(images, augmentation.draw(rngs, *images.shape[-2:]))
            yield images, self.labels[index]
