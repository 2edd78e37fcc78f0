"""A foundation source's model rebuilt without its weights file, from what
:meth:`FoundationClassifier.architecture` recorded: for a fine-tuned model kept as a state
dict (``sm_utils.mechanisms.save_run_model``), which is then loaded into it."""

from __future__ import annotations

from collections.abc import Mapping

from ..weights import SourceError
from .foundation import KINDS, FoundationClassifier
from .openclip import tower_from_config
from .timm_vit import vit_backbone
from .transformers_folder import backbone_from_config

# kind -> the function that builds its backbone, randomly initialised, from its spec
_BACKBONES = {"timm": vit_backbone, "transformers": backbone_from_config,
              "open_clip": tower_from_config}


def rebuild_foundation(architecture: Mapping, *, num_classes: int,
                       drop_rate: float) -> FoundationClassifier:
    """A randomly initialised :class:`FoundationClassifier` of the recorded ``architecture``
    (torch's global RNG; no file is read): the same modules, so a fine-tuned state dict of the
    model it was recorded from loads into it with every key (``strict=True``)."""
    kind = architecture.get("kind")
    if kind not in _BACKBONES or not architecture.get("backbone"):
        raise SourceError(
            f"cannot rebuild a foundation model from {dict(architecture)!r}: expected kind one of "
            f"{KINDS} and the backbone's spec, as FoundationClassifier.architecture() records."
        )
    return FoundationClassifier(
        _BACKBONES[kind](architecture["backbone"]), kind=kind,
        num_features=int(architecture["num_features"]), num_classes=num_classes,
        drop_rate=drop_rate, arch_name=str(architecture["arch_name"]),
        pretrained_cfg=architecture.get("pretrained_cfg"),
        backbone_spec=architecture["backbone"],
    )
