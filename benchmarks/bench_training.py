"""Training speed: images per second of the model step, of the data loader, and of both.

CPU, the offline demo's configuration (tf_efficientnet_lite0, 64 px, batch 32, 1 thread)::

    python benchmarks/bench_training.py

GPU, the paper's architecture (target: >= 2,000 training images/s on an H100, with the data
loader keeping up)::

    python benchmarks/bench_training.py --device cuda --arch resnet50 --image-size 224 \\
        --bf16 --channels-last

Three numbers are printed:
- ``model``: forward + backward + Adam step on a batch already on the device (the model's
  ceiling);
- ``loader``: the data pipeline alone (memory-mapped uint8 cache -> confounder -> the paper's
  augmentation -> collate -> pinned memory), iterated without a model;
- ``end-to-end``: the two together, as ``sm_utils.training`` runs them.
Images are smooth random uint8 images in a real memory-mapped cache file; the confounder is the
text tag on half of them (its cost does not depend on the content).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

# isort: off
import sm_utils  # noqa: F401  (before numpy and torch: pins the CPU numerics)
# isort: on
import numpy as np
import pandas as pd
import torch
from torch import nn

from sm_utils.data import PAPER_AUGMENTATION, ConfoundedImageDataset, ImageCache, make_loader
from sm_utils.sources import make_architecture, timm_preprocessing
from sm_utils.training import (
    _autocast,
    configure_device,
    freeze_backbone,
    reset_head,
    set_training,
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--arch", default="tf_efficientnet_lite0")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=None, help="default: 32 CPU, 256 GPU")
    parser.add_argument("--steps", type=int, default=None, help="timed steps; default 10 CPU, 300 GPU")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps; default 2 CPU, 30 GPU")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (CPU only)")
    parser.add_argument("--num-workers", type=int, default=None,
                        help="data-loader workers; default 0 CPU, min(16, cores) GPU")
    parser.add_argument("--n-images", type=int, default=None,
                        help="images in the cache; default 512 CPU, 8192 GPU")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    parser.add_argument("--channels-last", action="store_true", help="channels_last (GPU)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--confounder", default="tag", help="confounder on half the images, or none")
    parser.add_argument("--mode", default="finetune", choices=["finetune", "linear_probe"],
                        help="train every layer, or only the head on the frozen backbone")
    args = parser.parse_args()
    gpu = args.device == "cuda"
    args.batch_size = args.batch_size or (256 if gpu else 32)
    args.steps = args.steps or (300 if gpu else 10)
    args.warmup = args.warmup if args.warmup is not None else (30 if gpu else 2)
    args.num_workers = args.num_workers if args.num_workers is not None else (
        min(16, os.cpu_count() or 1) if gpu else 0)
    args.n_images = args.n_images or (8192 if gpu else 512)
    return args


def make_cache(folder: Path, n: int, size: int, seed: int = 0) -> ImageCache:
    """A memory-mapped uint8 cache of ``n`` smooth random images (no PNG decoding measured)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (64, size // 8 + 1, size // 8 + 1), dtype=np.uint8)
    path = folder / f"bench_{size}px.u8"
    array = np.memmap(path, dtype=np.uint8, mode="w+", shape=(n, size, size))
    for i in range(n):  # upsampled noise: smooth, cheap, different per image
        tile = np.kron(base[i % 64], np.ones((8, 8), np.uint8))[:size, :size]
        array[i] = np.roll(tile, i, axis=1)
    array.flush()
    del array
    return ImageCache(path, [f"img{i}" for i in range(n)], size)


def make_dataset(cache: ImageCache, confounder: str) -> ConfoundedImageDataset:
    n = len(cache.image_ids)
    rows = pd.DataFrame({"image_id": cache.image_ids, "label": np.arange(n) % 2,
                         "confounded": np.arange(n) % 4 == 1})
    conf = None
    if confounder != "none":
        from sm_utils.confounders import get_confounder

        conf = get_confounder(confounder, resolution="input")  # the images live only in the cache
    return ConfoundedImageDataset(rows, cache, confounder=conf, seed=0,
                                  augmentation=PAPER_AUGMENTATION)


class Repeated(torch.utils.data.Dataset):
    """``dataset`` cycled to ``length`` items, so one loader (one worker start) serves a run."""

    def __init__(self, dataset, length: int):
        self.dataset, self.length = dataset, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        return self.dataset[i % len(self.dataset)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loader_speed(loader, steps: int, warmup: int) -> float:
    """Images/s of the data loader alone (batches are moved to pinned memory, not the GPU)."""
    count, started = 0, None
    for step, (images, _) in enumerate(loader):
        if step == warmup:
            count, started = 0, time.perf_counter()
        if step > warmup:  # batches that arrived inside the timed window
            count += len(images)
        if step >= warmup + steps:
            break
    return count / (time.perf_counter() - started)


def train_step_fn(model, prep, device, args):
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    loss_fn = nn.CrossEntropyLoss()

    def step(images: torch.Tensor, labels: torch.Tensor) -> None:
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        x = prep(images)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with _autocast(device) if args.bf16 else torch.autocast(device.type, enabled=False):
            loss = loss_fn(model(x).float(), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    with configure_device(device, threads=args.threads) as record, \
            tempfile.TemporaryDirectory() as tmp:
        if device.type == "cpu":
            torch.use_deterministic_algorithms(False)  # speed here; runs keep determinism
        print(f"device: {record.get('gpu', 'cpu')}  threads: {torch.get_num_threads()}  "
              f"arch: {args.arch}  size: {args.image_size}  batch: {args.batch_size}  "
              f"bf16: {args.bf16}  channels_last: {args.channels_last}  "
              f"workers: {args.num_workers}  mode: {args.mode}")
        model = make_architecture(args.arch, num_classes=2, drop_rate=0.5)
        reset_head(model)
        if args.mode == "linear_probe":  # as sm_utils.training.train_model(frozen=True)
            freeze_backbone(model)
        set_training(model.to(device), frozen=args.mode == "linear_probe")
        if args.channels_last:
            model.to(memory_format=torch.channels_last)
        if args.compile:
            model = torch.compile(model)
        prep = timm_preprocessing(args.arch)
        step = train_step_fn(model, prep, device, args)

        # 1. the model step on a batch already on the device
        images = torch.randint(0, 256, (args.batch_size, 1, args.image_size, args.image_size),
                               dtype=torch.uint8, device=device)
        labels = torch.randint(0, 2, (args.batch_size,), device=device)
        for _ in range(args.warmup):
            step(images, labels)
        sync(device)
        tic = time.perf_counter()
        for _ in range(args.steps):
            step(images, labels)
        sync(device)
        model_ips = args.steps * args.batch_size / (time.perf_counter() - tic)
        what = ("forward + backward + Adam" if args.mode == "finetune"
                else "forward + the head's backward and Adam")
        print(f"model       {model_ips:9.1f} images/s  ({what}, data on device)")

        # 2. the data loader alone (one loader for all batches: workers start once)
        cache = make_cache(Path(tmp), args.n_images, args.image_size)
        total = (args.warmup + args.steps + 2) * args.batch_size
        dataset = Repeated(make_dataset(cache, args.confounder), total)
        loader_args = {"batch_size": args.batch_size, "shuffle": True, "seed": 0,
                       "num_workers": args.num_workers, "pin_memory": device.type == "cuda",
                       "drop_last": True}
        loader_ips = loader_speed(make_loader(dataset, **loader_args), args.steps, args.warmup)
        print(f"loader      {loader_ips:9.1f} images/s  (cache -> {args.confounder} -> augmentation "
              f"-> collate{' -> pinned' if device.type == 'cuda' else ''}, "
              f"{args.num_workers} workers)")

        # 3. end to end
        count, tic = 0, None
        for index, (images, labels) in enumerate(make_loader(dataset, **loader_args)):
            if index == args.warmup:
                sync(device)
                count, tic = 0, time.perf_counter()
            step(images, labels)
            if index >= args.warmup:
                count += len(images)
            if index + 1 >= args.warmup + args.steps:
                break
        sync(device)
        e2e_ips = count / (time.perf_counter() - tic)
        print(f"end-to-end  {e2e_ips:9.1f} images/s  (loader + model, as in fine-tuning)")
        bound = "data loader" if loader_ips < model_ips else "model"
        print(f"bound by: {bound}")


if __name__ == "__main__":
    main()
