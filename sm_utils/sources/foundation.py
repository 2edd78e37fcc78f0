"""What the foundation-model sources share: the classifier around a pretrained backbone, the
input-size check against the patch size, and the checks of a checkpoint's keys.

The three published formats each have their module, which registers its sources:
``timm_vit`` (a timm ViT checkpoint, e.g. DINOv2), ``transformers_folder`` (a Hugging Face
``transformers`` model folder, e.g. RAD-DINO) and ``openclip`` (an open_clip model's vision
tower, e.g. BiomedCLIP, OpenAI CLIP). Every one reads local files only (nothing is
downloaded) and loads weights safely (safetensors, or ``torch.load(weights_only=True)``).

A model from these sources is a :class:`FoundationClassifier`: ``backbone`` (the library's own
module, as the library builds it) -> features -> ``head_drop`` -> ``head`` (a fresh linear
layer). ``forward_features`` gives what the head reads: the CLS token after the final layer
norm for a ViT (timm's pre-logits, ``transformers``' ``pooler_output`` of a Dinov2Model), the
image embedding (``encode_image`` before normalisation) for an open_clip tower.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from ..weights import SourceError, WeightsError, mismatch_lines

KINDS = ("timm", "transformers", "open_clip")


class FoundationClassifier(nn.Module):
    """A pretrained backbone's features -> dropout -> linear head (fresh, torch's global RNG).

    ``kind`` says how the backbone gives its features (:data:`KINDS`); ``pretrained_cfg``
    carries the architecture's name, the classifier's name (``head``), input size, patch size
    and normalisation, as timm models carry theirs. ``unused_keys``: the keys of the weights
    file that were deliberately left out (the file's own classifier, a CLIP text tower).
    ``backbone_spec``: what builds the backbone again without its weights file (JSON-ready;
    :meth:`architecture`, :func:`sm_utils.sources.rebuild.rebuild_foundation`).
    """

    def __init__(self, backbone: nn.Module, *, kind: str, num_features: int, num_classes: int,
                 drop_rate: float, arch_name: str, pretrained_cfg: Mapping | None = None,
                 unused_keys: Iterable[str] = (), backbone_spec: Mapping | None = None):
        super().__init__()
        if kind not in KINDS:
            raise SourceError(f"kind must be one of {KINDS}, got {kind!r}.")
        self.kind = kind
        self.backbone = backbone
        self.num_features = int(num_features)
        self.num_classes = int(num_classes)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, self.num_classes)
        self.arch_name = arch_name
        self.pretrained_cfg = {"architecture": arch_name, "classifier": "head",
                               **dict(pretrained_cfg or {})}
        self.unused_keys = tuple(sorted(unused_keys))
        self.backbone_spec = dict(backbone_spec or {})

    def architecture(self) -> dict:
        """What rebuilds this model, randomly initialised, without the source's weights file
        (JSON-ready): kind, architecture name, width, pretrained_cfg and the backbone's spec."""
        return {"kind": self.kind, "arch_name": self.arch_name,
                "num_features": self.num_features, "pretrained_cfg": self.pretrained_cfg,
                "backbone": self.backbone_spec}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, num_features): what the head reads."""
        if self.kind == "transformers":
            # the CLS token after the final layer norm (a Dinov2Model's pooler_output)
            return self.backbone(pixel_values=x).last_hidden_state[:, 0]
        # timm with num_classes=0: the pooled pre-logits (a ViT's CLS token after its norm);
        # open_clip: the vision tower's image embedding
        return self.backbone(x)

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        features = self.head_drop(features)
        return features if pre_logits else self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Linear:
        return self.head


def square(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    h, w = (int(v) for v in size)
    return (h, w)


def check_patch_multiple(size: int | tuple[int, int], patch: int | tuple[int, int],
                         what: str) -> tuple[int, int]:
    """Return ``size`` as (h, w); SourceError unless the patch size divides both sides."""
    h, w = square(size)
    ph, pw = square(patch)
    bad = [(side, p) for side, p in ((h, ph), (w, pw)) if side < p or side % p]
    if bad:
        side, p = bad[0]
        lower, upper = max(p, side // p * p), (side // p + 1) * p
        raise SourceError(
            f"{what}: input size {h}x{w} does not fit its {ph}x{pw} patches ({side} is not a "
            f"multiple of {p}), so part of every image would be dropped or the model could not "
            f"run. Use image_size={lower} or {upper} (a multiple of {p})."
        )
    return (h, w)


def refuse_head_keeping(source: str, keep_pretrained_head: bool) -> None:
    if keep_pretrained_head:
        raise SourceError(
            f"Source {source!r} has no pretrained classifier to keep: its weights are a feature "
            "extractor and the model gets a fresh head. Use keep_pretrained_head=False."
        )


def _listing(names: Iterable[str], limit: int = 8) -> str:
    names = sorted(names)
    more = len(names) - limit
    return ", ".join(names[:limit]) + (f", ... and {more} more" if more > 0 else "")


def key_sample(keys: Iterable[str], limit: int = 8) -> str:
    """A few keys of a checkpoint, for error messages."""
    return _listing(keys, limit)


def refuse_mismatch(path: Path, what: str, *, missing: Sequence[str], unexpected: Sequence[str],
                    mismatched: Sequence[str] = (), fix: str) -> None:
    """One WeightsError listing the missing, unexpected and mismatched keys, if any."""
    lines = mismatch_lines([
        ("missing keys (would stay randomly initialised)", sorted(missing), 12),
        ("unexpected keys (in the file, not in the model)", sorted(unexpected), 12),
        ("shape mismatches", list(mismatched), 6),
    ])
    if lines:
        raise WeightsError("\n  ".join([f"{path}: the weights do not fit {what}.", *lines, fix]))
