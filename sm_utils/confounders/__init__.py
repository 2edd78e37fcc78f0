"""Confounders: the instrument of the study (issue 4).

A confounder has a name, a MICCAT category, a kind and parameters (always including
``strength``: 1 = the paper's setting, 0 = no effect)::

    from sm_utils.confounders import get_confounder, apply_prevalence
    conf = get_confounder("tag", strength=1.0)
    rows = apply_prevalence(train_rows, conf, p=0.5, seed=0, test_set="train")
    image = conf.inject(image, row.confounded, seed=0, image_id=row.image_id)

*Synthetic* confounders change pixels on the fly (a pure function on a uint8 (H, W) image);
*sampled* ones (sex, age, view) choose rows by an attribute. Data pipelines call, for every
image of every split, ``conf.inject(image, confounded, seed, image_id)``, which is
``conf.apply(image, rng)`` when the row is confounded and ``conf.baseline(image, rng)``
otherwise (identity except for X-ray dose noise, where every image gets the normal dose as in
the paper), with ``rng = conf.image_rng(seed, image_id)``.

Images arrive at the training size; parameters given for the paper's native size
(``reference_size``: 1024 px for tag and low-pass, 512 px for the dose models) are scaled to it.
Dose noise keeps the dose per unit area (``dose_scaling="area"``: the same as adding the noise
at 512 px and then resizing); ``dose_scaling="none"`` keeps the paper's per-pixel noise level.
``conf.inject`` is a pure function of (parameters, seed, image id, image), so a slow confounder
(``ct_noise``: seconds per 512 px image) can be memoised on disk with ``conf.with_cache(folder)``.

Adding a confounder is a small function plus a registration::

    import numpy as np
    from sm_utils.confounders import register_confounder

    @register_confounder(
        "invert", category="environment/processing",
        description="Some archives store radiographs with inverted polarity (bone dark).",
        defaults={"level": 255},
    )
    def invert(image, rng, *, strength, level):
        flipped = level - image.astype(np.float32)
        return np.clip(np.rint(image + strength * (flipped - image)), 0, 255).astype(np.uint8)

after which ``get_confounder("invert", strength=0.5)`` works everywhere (notebooks, grid).
"""

from . import miccat, paper  # noqa: F401  (register the built-in confounders)
from .prevalence import (
    PREVALENCE_GRID,
    TEST_SETS,
    apply_prevalence,
    attribute_values,
    n_confounded,
)
from .registry import (
    CATEGORIES,
    Confounder,
    ConfounderError,
    confounder_table,
    get_confounder,
    identity_params,
    list_confounders,
    register_confounder,
)

__all__ = [
    "CATEGORIES", "PREVALENCE_GRID", "TEST_SETS", "Confounder", "ConfounderError",
    "apply_prevalence", "attribute_values", "confounder_table", "get_confounder", "identity_params",
    "list_confounders", "n_confounded", "register_confounder",
]
