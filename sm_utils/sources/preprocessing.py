"""Each source's preprocessing recipe: uint8 greyscale in, the float input its weights
expect out (Keras caffe, timm ImageNet mean/std, EfficientNet-Lite's (x - 127) / 128)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..weights import (
    SourceError,
)
from .architectures import KERAS_ARCH, _timm_pretrained_cfg


@dataclass(frozen=True)
class Preprocessing:
    """uint8 grey (N, H, W) / (N, 1, H, W) or RGB (N, 3, H, W) -> float (N, 3, H, W).

    Output = (x - mean) / std * scale, per channel, after grey is repeated to 3 channels and
    the channels put in ``channel_order``. ``mean`` and ``std`` are in 0-255 pixel units and
    in ``channel_order`` (Keras caffe means are B, G, R).

    ``input_size`` (height, width) and ``patch_size``: what a source with a fixed input says
    (a vision transformer: the size its model is built for and the side of its patches); None
    where the source does not fix them (the CNNs). Left out of :meth:`describe` when None.
    """

    name: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    scale: float = 1.0
    channel_order: str = "RGB"
    input_size: tuple[int, int] | None = None
    patch_size: int | None = None

    def __post_init__(self):
        if self.channel_order not in ("RGB", "BGR"):
            raise SourceError(f"channel_order must be 'RGB' or 'BGR', got {self.channel_order!r}.")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise SourceError(f"mean and std need 3 values each, got {self.mean} and {self.std}.")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:
            x = x.unsqueeze(1)
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise SourceError(
                f"Preprocessing expects images shaped (N, H, W), (N, 1, H, W) or (N, 3, H, W); "
                f"got {tuple(x.shape)}."
            )
        x = x.to(torch.float32)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        elif self.channel_order == "BGR":
            x = x.flip(1)  # input colour images are RGB
        mean = torch.tensor(self.mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std * self.scale

    def describe(self) -> dict:
        described = {
            **asdict(self),
            "mean": list(self.mean),
            "std": list(self.std),
            "formula": f"(x[{self.channel_order}] - mean) / std * scale, x in 0..255, "
            "grey repeated to 3 channels",
        }
        for optional in ("input_size", "patch_size"):  # the CNN sources' records stay as they were
            if described[optional] is None:
                del described[optional]
        if self.input_size is not None:
            described["input_size"] = list(self.input_size)
        return described

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        return cls(
            name=str(d["name"]),
            mean=tuple(float(v) for v in d["mean"]),
            std=tuple(float(v) for v in d.get("std", (1.0, 1.0, 1.0))),
            scale=float(d.get("scale", 1.0)),
            channel_order=str(d.get("channel_order", "RGB")),
            input_size=tuple(int(v) for v in d["input_size"]) if d.get("input_size") else None,
            patch_size=int(d["patch_size"]) if d.get("patch_size") else None,
        )


# Keras applications' "caffe" mode: RGB -> BGR, subtract the ImageNet BGR means, no std.
CAFFE = Preprocessing("keras_caffe", mean=(103.939, 116.779, 123.68), channel_order="BGR")
# The paper's RadImageNet arm: caffe mode, then x 1/255 (Keras ImageDataGenerator applies its
# preprocessing_function before rescale).
CAFFE_RESCALED = Preprocessing(
    "keras_caffe_x_1/255", mean=CAFFE.mean, channel_order="BGR", scale=1 / 255
)
# TF EfficientNet-Lite checkpoints were trained on (x - 127) / 128.
LITE = Preprocessing("efficientnet_lite", mean=(127.0,) * 3, std=(128.0,) * 3)


def timm_preprocessing(arch: str) -> Preprocessing:
    """Normalisation from timm's pretrained config of ``arch`` (RGB, mean/std in 0..255)."""
    cfg = _timm_pretrained_cfg(arch)
    mean = tuple(float(m) * 255 for m in (cfg.mean if cfg else (0.485, 0.456, 0.406)))
    std = tuple(float(s) * 255 for s in (cfg.std if cfg else (0.229, 0.224, 0.225)))
    return Preprocessing(f"timm:{arch}", mean=mean, std=std)


def default_preprocessing(arch: str) -> Preprocessing:
    return CAFFE if arch == KERAS_ARCH else timm_preprocessing(arch)
