"""Mechanisms of shortcut learning (issue 12): is the confounder encoded, and where does the model look?

Two measurements, each for a source before fine-tuning or for a fine-tuned model:

- **Encodedness probe** (:func:`probe_model`, :func:`probe_source`): penultimate features (the
  pooled features the classifier reads) of a balanced set of images with and without the
  confounder, and a linear probe (scikit-learn: standardisation + ``LogisticRegression``)
  cross-validated with folds grouped by patient (``StratifiedGroupKFold``). Reported: the AUC
  of its out-of-fold scores with a patient-level bootstrap interval. Synthetic confounders
  (tag, low-pass, ...): every chosen image twice, clean (its baseline) and confounded, both
  versions in the same fold; sampled ones (sex): images with the attribute's value against
  images with the reference, balanced within each class of the disease label so that the
  probe cannot reach the attribute through the disease. AUC 0.5: not linearly decodable;
  1.0: trivially encoded. :func:`probe_sweep` sweeps the confounder's strength.
- **Attribution** (:func:`attribution_for_run`): a class activation map of the positive class
  on the confounded o.o.d. test images (for a synthetic confounder: the negatives, which carry
  it), and the share of the map's mass that falls inside the confounder's pixel mask
  (:meth:`sm_utils.confounders.Confounder.input_mask`; only localised confounders, tag, marker
  and support device, have one) beside the mask's share of the image area (what a map
  spread evenly would put there: the chance level).

Why captum and not ``grad-cam`` (pytorch-grad-cam): captum is pure PyTorch (its dependencies
are torch, numpy, matplotlib and tqdm, already here), while ``grad-cam`` pulls
``opencv-python``, which needs the system's libGL and is a large binary wheel.

Which map (``method``): ``"hirescam"`` (default; HiResCAM, Draelos & Carin 2020: the channel sum
of gradient x activation, element-wise, ReLU; captum ``LayerGradientXActivation``) or
``"gradcam"`` (Grad-CAM, Selvaraju et al. 2017: activations weighted by their spatially
*averaged* gradients, ReLU; captum ``LayerGradCam``), both of the evidence for the positive
class over the negative one (``contrast=True``: logit 1 - logit 0, what the softmax decision
depends on). Measured on the demo (64 px phantoms, the paper's tag: a 9-pixel "R"): for models
whose o.o.d. AUC (0.04-0.18) shows they use the tag, Grad-CAM put at most 2.8x the mask's area
share inside it at any layer of Lite0 (averaging the gradient over the image throws away where
it is, and the map follows the activations: the whole chest), HiResCAM 6-8x at ``blocks.2`` and
13-23x at ``blocks.1``, against 1.5-2.7x for models trained without the tag. The notebook shows
both methods.

Layer: the final feature map is coarse (2 x 2 for a 64 px input to EfficientNet-Lite0, stride
32), too coarse to say whether a 3 x 3 px tag is looked at; ``layer="auto"`` takes the deepest
of the model's top-level blocks whose map still has at least 16 x 16 cells (``blocks.1``,
stride 4, for Lite0 at 64 px; ``blocks.2`` at 224 px).

Vision transformers (the foundation sources, :mod:`.tokens`): ``layer="penultimate"`` is the
CLS token the head reads, ``layer="patch_mean"`` the mean of the last block's patch tokens
after the final norm (CLS and register tokens left out); attribution maps the patch tokens of
the block before the last one (the tokens the last block reads: the last block's own patch
tokens never reach a head that reads the CLS token) on the patch grid. docs/MECHANISMS.md.

Grids: :func:`mechanisms_for_run` does both for a fine-tuned model in the process that trained
it (:func:`measure_run` is the hook ``execute_run`` is given), :func:`run_mechanisms` for a finished run directory
whose fine-tuned weights were kept (:func:`save_run_model`, ``model.safetensors``), and
:func:`encodedness_vs_drop` relates the pre-fine-tuning probe AUC of each source to its o.o.d.
AUC drop (Spearman, permutation p) per confounder.

Modules: ``features``, ``probe_sets``, ``probe``, ``attribution``, ``tokens`` (a ViT's
tokens), ``per_run`` (a run's
mechanisms; :func:`measure_run`), ``fine_tuning`` (models kept in memory, attribution sweeps),
``encodedness`` (against the o.o.d. drop; what a grid measured) and ``figures``; every public
name is importable from ``sm_utils.mechanisms`` itself.
"""

from __future__ import annotations

from .attribution import (
    ATTRIBUTION_METHODS,
    AUTO,
    MIN_CAM_SIDE,
    AttributionMaps,
    activation_maps,
    attribution_for_run,
    attribution_maps,
    cam_layer,
    mask_shares,
    summarise_attribution,
)
from .encodedness import (
    MEAN_ATTRIBUTION_COLUMNS,
    SOURCE_PROBES_FILE,
    encodedness_points,
    encodedness_vs_drop,
    grid_attribution,
    grid_probes,
    ood_drop,
    spearman_permutation,
)
from .features import PENULTIMATE, MechanismError, extract_features, feature_layers
from .figures import (
    plot_attribution_examples,
    plot_attribution_vs_p,
    plot_encodedness_vs_drop,
    plot_probe_heatmap,
    plot_strength_sweep,
)
from .fine_tuning import FineTuned, attribution_sweep, fine_tune
from .per_run import (
    MECHANISMS_FILE,
    MODEL_FILE,
    load_run_model,
    measure_run,
    mechanisms_for_run,
    run_mechanisms,
    save_run_model,
)
from .probe import (
    DEFAULT_STRENGTHS,
    fit_probe,
    grouped_bootstrap_auc,
    probe_model,
    probe_source,
    probe_sweep,
    probe_table,
)
from .probe_sets import ProbeSet, probe_set
from .tokens import PATCH_MEAN, TokenLayout, token_layout

__all__ = [
    "ATTRIBUTION_METHODS",
    "AUTO",
    "DEFAULT_STRENGTHS",
    "MEAN_ATTRIBUTION_COLUMNS",
    "MECHANISMS_FILE",
    "MIN_CAM_SIDE",
    "MODEL_FILE",
    "PATCH_MEAN",
    "PENULTIMATE",
    "SOURCE_PROBES_FILE",
    "AttributionMaps",
    "FineTuned",
    "MechanismError",
    "ProbeSet",
    "TokenLayout",
    "activation_maps",
    "attribution_for_run",
    "attribution_maps",
    "attribution_sweep",
    "cam_layer",
    "encodedness_points",
    "encodedness_vs_drop",
    "extract_features",
    "feature_layers",
    "fine_tune",
    "fit_probe",
    "grid_attribution",
    "grid_probes",
    "grouped_bootstrap_auc",
    "load_run_model",
    "mask_shares",
    "measure_run",
    "mechanisms_for_run",
    "ood_drop",
    "plot_attribution_examples",
    "plot_attribution_vs_p",
    "plot_encodedness_vs_drop",
    "plot_probe_heatmap",
    "plot_strength_sweep",
    "probe_model",
    "probe_set",
    "probe_source",
    "probe_sweep",
    "probe_table",
    "run_mechanisms",
    "save_run_model",
    "spearman_permutation",
    "summarise_attribution",
    "token_layout",
]
