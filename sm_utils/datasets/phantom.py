"""The offline default datasets: phantom chest radiographs and phantom lung CT slices."""

from __future__ import annotations

from pathlib import Path

from ..manifest import Manifest
from ..phantoms import PhantomConfig, make_phantom_dataset
from . import register_dataset


def _builder(modality: str):
    def build(
        out_dir: str | Path, *, n_patients: int = 200, image_size: int = 128,
        difficulty: float | None = None, prevalence: float = 0.4, seed: int = 0, n_folds: int = 5,
        test_fraction: float = 0.2, val_fraction: float = 0.1,
    ) -> Manifest:
        config = PhantomConfig(modality=modality, n_patients=n_patients, image_size=image_size,
                               difficulty=difficulty, prevalence=prevalence, seed=seed)
        return make_phantom_dataset(out_dir, config=config, n_folds=n_folds,
                                    test_fraction=test_fraction, val_fraction=val_fraction)
    build.__name__ = f"build_phantom_{modality}"
    build.__doc__ = f"Synthetic {modality.upper()} phantoms (offline default data)."
    return build


build_phantom_cxr = register_dataset("phantom_cxr")(_builder("cxr"))
build_phantom_ct = register_dataset("phantom_ct")(_builder("ct"))
