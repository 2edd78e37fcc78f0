"""How learnable is the phantom task? Train a small CNN briefly and print the clean test AUC.

    python benchmarks/phantom_learnability.py --modality cxr --difficulty 0.5

The default difficulty should give an AUC that is clearly above chance but below perfect
(roughly 0.75 to 0.95), so that confounders have room to act.
"""

from __future__ import annotations

import argparse
import tempfile
import time

# isort: off
import sm_utils  # noqa: F401  (before numpy and torch: pins the CPU numerics)
# isort: on
import numpy as np
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score
from torch import nn

from sm_utils.datasets import build_dataset


def small_cnn(channels: int = 32) -> nn.Module:
    """~100k parameters: four conv-bn-relu-pool blocks and a linear head."""
    layers, c_in = [], 1
    for c_out in (channels // 2, channels, channels * 2, channels * 2):
        layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                   nn.ReLU(inplace=True), nn.MaxPool2d(2)]
        c_in = c_out
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.3), nn.Linear(c_in, 2))


def load(manifest, rows):
    images = np.stack([np.asarray(Image.open(manifest.image_path(p))) for p in rows["path"]])
    x = torch.from_numpy(images).float().unsqueeze(1) / 255.0
    return (x - 0.5) / 0.25, torch.from_numpy(rows["label"].to_numpy())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modality", default="cxr", choices=["cxr", "ct"])
    parser.add_argument("--difficulty", type=float, default=0.5)
    parser.add_argument("--patients", type=int, default=400)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        manifest = build_dataset(f"phantom_{args.modality}", tmp, n_patients=args.patients,
                                 image_size=args.size, difficulty=args.difficulty, seed=args.seed)
        gen_s = time.perf_counter() - t0
        x_train, y_train = load(manifest, manifest.rows(0, "train"))
        x_test, y_test = load(manifest, manifest.rows(0, "test"))

    model = small_cnn()
    n_params = sum(p.numel() for p in model.parameters())
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    for _ in range(args.epochs):
        model.train()
        for idx in torch.randperm(len(x_train), generator=generator).split(32):
            optimiser.zero_grad()
            nn.functional.cross_entropy(model(x_train[idx]), y_train[idx]).backward()
            optimiser.step()
    train_s = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        scores = model(x_test).softmax(1)[:, 1].numpy()
    auc = roc_auc_score(y_test.numpy(), scores)
    print(f"modality={args.modality} difficulty={args.difficulty} size={args.size} "
          f"images={len(manifest.table)} train={len(x_train)} test={len(x_test)} params={n_params}")
    print(f"generation {gen_s:.1f} s, training {train_s:.1f} s "
          f"({args.epochs * len(x_train) / train_s:.0f} img/s), clean test AUC {auc:.3f}")


if __name__ == "__main__":
    main()
