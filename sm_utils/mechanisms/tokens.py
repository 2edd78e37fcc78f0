"""Vision transformers in the mechanisms: where a ViT's tokens are, which of them are patches,
and how they become a feature vector (the patch mean) or a map on the patch grid.

A ViT's blocks output tokens (N, T, C): its prefix tokens (the CLS token, then any register
tokens) followed by one token per patch, row by row. T - (H/patch x W/patch) is the number of
prefix tokens, so nothing here needs to know which of them a model has. open_clip's own vision
transformer runs its blocks sequence-first, (T, N, C), unless its ``transformer.batch_first``
is True (open_clip 3: True by default; versions without the attribute: sequence-first).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

PATCH_MEAN = "patch_mean"

# (the list of blocks, the final norm) by module name, for each backbone a ViT source builds
_LAYOUTS = (
    ("backbone.blocks", "backbone.norm"),  # timm VisionTransformer
    ("backbone.encoder.layer", "backbone.layernorm"),  # transformers Dinov2Model
    ("backbone.transformer.resblocks", "backbone.ln_post"),  # open_clip VisionTransformer
    ("backbone.trunk.blocks", "backbone.trunk.norm"),  # open_clip timm tower (BiomedCLIP)
    ("blocks", "norm"),  # a timm VisionTransformer itself
)


@dataclass(frozen=True)
class TokenLayout:
    """Where a vision transformer's tokens are: the module names of its last block
    (``last``), of the block before it (``before_last``; None for a one-block model) and of
    its final norm, its patch size (h, w) and whether its blocks run sequence-first."""

    last: str
    before_last: str | None
    norm: str
    patch: tuple[int, int]
    seq_first: bool

    def grid(self, height: int, width: int) -> tuple[int, int]:
        return height // self.patch[0], width // self.patch[1]

    def patch_tokens(self, output, height: int, width: int) -> torch.Tensor:
        """A block's output -> its patch tokens (N, gh * gw, C), prefix tokens dropped."""
        tokens = output[0] if isinstance(output, (tuple, list)) else output
        if self.seq_first:
            tokens = tokens.transpose(0, 1)
        gh, gw = self.grid(height, width)
        prefix = tokens.shape[1] - gh * gw
        if tokens.ndim != 3 or prefix < 0:
            raise ValueError(f"expected tokens (N, T >= {gh * gw}, C) for a {gh} x {gw} patch "
                             f"grid; got {tuple(tokens.shape)}.")
        return tokens[:, prefix:]

    def patch_grid(self, output, height: int, width: int) -> torch.Tensor:
        """A block's output -> its patch tokens as a feature map (N, C, gh, gw)."""
        tokens = self.patch_tokens(output, height, width)
        gh, gw = self.grid(height, width)
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], gh, gw)


def _patch_size(model: nn.Module) -> tuple[int, int] | None:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    patch = cfg.get("patch_size") or getattr(getattr(model, "patch_embed", None), "patch_size",
                                             None)
    if patch is None:
        return None
    return (int(patch), int(patch)) if isinstance(patch, int) else (int(patch[0]), int(patch[1]))


def token_layout(model: nn.Module) -> TokenLayout | None:
    """The :class:`TokenLayout` of a vision transformer (a ViT source's
    ``FoundationClassifier``, a timm ViT); None for a CNN."""
    patch = _patch_size(model)
    if patch is None:
        return None
    modules = dict(model.named_modules())
    for blocks_name, norm_name in _LAYOUTS:
        blocks = modules.get(blocks_name)
        if isinstance(blocks, (nn.ModuleList, nn.Sequential)) and len(blocks) and \
                norm_name in modules:
            parent = modules[blocks_name.rsplit(".", 1)[0]] if "." in blocks_name else model
            seq_first = blocks_name.endswith("transformer.resblocks") and not getattr(
                parent, "batch_first", False)
            n = len(blocks)
            return TokenLayout(last=f"{blocks_name}.{n - 1}",
                               before_last=f"{blocks_name}.{n - 2}" if n > 1 else None,
                               norm=norm_name, patch=patch, seq_first=seq_first)
    return None
