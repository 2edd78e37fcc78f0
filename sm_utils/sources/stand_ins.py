"""Small randomly initialised vision transformers saved in each format a foundation model is
published in, so the foundation grid's whole path (loading, fine-tuning, linear probing,
mechanisms) runs offline: ``configs/foundation_demo.yaml`` builds them with
:func:`save_random_source` before its cells. They stand in for DINOv2, RAD-DINO and CLIP-style
files; their results say nothing about those models.

- ``timm``: a timm ViT state dict (``vit_tiny_patch16_224`` by default) as ``.safetensors``,
  for the ``timm_vit`` (and ``dinov2``) sources;
- ``transformers``: a ``Dinov2Model`` folder written by ``save_pretrained`` with a
  ``preprocessor_config.json``, as RAD-DINO is published (``rad_dino``, ``transformers_vit``);
- ``open_clip``: a whole CLIP state dict (vision and text towers) as
  ``open_clip_model.safetensors`` with its ``open_clip_config.json``, as open_clip models are
  published on the Hugging Face hub (``open_clip`` with ``arch: hf-hub:<any name>``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..io import atomic_path
from ..weights import SourceError
from .transformers_folder import IMAGENET_MEAN, IMAGENET_STD, no_progress_bars

FORMATS = ("timm", "transformers", "open_clip")


def save_random_source(out: str | os.PathLike, file_format: str, *, image_size: int = 64,
                       patch_size: int = 8, width: int = 64, depth: int = 4, heads: int = 4,
                       arch: str = "vit_tiny_patch16_224", seed: int = 0) -> Path:
    """Write a randomly initialised ViT (torch seeded with ``seed``) at ``out`` in ``file_format``
    (:data:`FORMATS`); returns ``out``. ``timm`` uses the timm architecture ``arch`` as it is
    (its own width, depth and patch size); the other two are built at ``width``, ``depth``,
    ``heads`` and ``patch_size`` for ``image_size`` px inputs. A folder is written whole
    before it appears under its name. Torch's global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return _save(Path(out), file_format, image_size=image_size, patch_size=patch_size,
                     width=width, depth=depth, heads=heads, arch=arch)


def _save(out: Path, file_format: str, *, image_size: int, patch_size: int, width: int,
          depth: int, heads: int, arch: str) -> Path:
    if file_format not in FORMATS:
        raise SourceError(f"file_format must be one of {list(FORMATS)}; got {file_format!r}.")
    out.parent.mkdir(parents=True, exist_ok=True)
    if file_format == "timm":
        import timm
        from safetensors.torch import save_file

        model = timm.create_model(arch, pretrained=False, img_size=int(image_size))
        with atomic_path(out) as tmp:
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
        return out
    staging = out.with_name(f".{out.name}.partial")
    if staging.exists():
        import shutil

        shutil.rmtree(staging)
    staging.mkdir()
    if file_format == "transformers":
        _dinov2_folder(staging, image_size, patch_size, width, depth, heads)
    else:
        _open_clip_folder(staging, image_size, patch_size, width, depth, heads)
    staging.rename(out)
    return out


def _dinov2_folder(folder: Path, image_size: int, patch_size: int, width: int, depth: int,
                   heads: int) -> None:
    from transformers import Dinov2Config, Dinov2Model

    config = Dinov2Config(hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads,
                          intermediate_size=4 * width, patch_size=patch_size,
                          image_size=image_size)
    with no_progress_bars():  # no "Writing model shards" bar in grid logs
        Dinov2Model(config).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": {"height": image_size, "width": image_size}, "do_center_crop": True,
        "do_normalize": True, "do_rescale": True, "rescale_factor": 1 / 255,
        "image_mean": list(IMAGENET_MEAN), "image_std": list(IMAGENET_STD),
        "image_processor_type": "BitImageProcessor", "size": {"shortest_edge": image_size},
    }, indent=2))


def _open_clip_folder(folder: Path, image_size: int, patch_size: int, width: int, depth: int,
                      heads: int) -> None:
    import open_clip
    from safetensors.torch import save_file

    vision = {"image_size": image_size, "layers": depth, "width": width,
              "patch_size": patch_size, "head_width": width // heads}
    text = {"context_length": 16, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1}
    model = open_clip.CLIP(embed_dim=width, vision_cfg=vision, text_cfg=text, quick_gelu=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(folder / "open_clip_model.safetensors"))
    (folder / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": {"embed_dim": width, "quick_gelu": True, "vision_cfg": vision,
                      "text_cfg": text},
        "preprocess_cfg": {"mean": list(open_clip.OPENAI_DATASET_MEAN),
                           "std": list(open_clip.OPENAI_DATASET_STD)},
    }, indent=2))
