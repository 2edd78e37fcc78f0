"""methods.md of the paper kit (``sm report``): a grid's methods from its runs' recorded
configurations, each fine-tuning setting marked as the paper's, its script's default or ours,
and the deviations from the paper that concern the grid."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..confounders import list_confounders
from ..identity import DEFAULT_MODE
from .claims import ALPHA, MARGIN, definitions_commit
from .deviations import applicable
from .paper import STAND_INS
from .results import AnalysisError

PAPER_ARCH = "keras_resnet50"


def count_range(values: pd.Series) -> str:
    """One number when the folds agree (one test set), else their range."""
    values = values.dropna()
    if values.empty:
        return ""
    low, high = int(values.min()), int(values.max())
    return str(low) if low == high else f"{low}-{high}"


# The paper's fine-tuning settings and whose each is: "paper" (fixed in its code or stated in
# the paper) or "script default" (the default of its fine-tuning script; the value it ran with is
# not recorded). Sources: github.com/DovileDo/source-matters and configs/paper_cxr.yaml.
PAPER_TRAINING = {
    "image_size": (None, "not recorded (a required argument of the paper's script)"),
    "resize": ("nearest", "paper"),
    "epochs": (30, "script default"),
    "batch_size": (256, "script default"),
    "lr": (1e-3, "script default"),
    "optimizer": ("adam", "paper"),
    "weight_decay": (0.0, "paper"),
    "patience": (30, "paper"),
    "augment": (True, "paper"),
    "drop_rate": (0.5, "paper"),
    "seed": (812, "paper"),
}
PAPER_GRID = {"folds": (5, "paper"), "prevalences": ((0.0, 0.1, 0.2, 0.5, 0.8, 1.0), "paper")}


def whose(setting: str, value: Any) -> str:
    """"paper", "script default" or "ours (paper: X)" for a setting of ours."""
    paper_value, who = {**PAPER_TRAINING, **PAPER_GRID}.get(setting, (None, None))
    if who is None:
        return "ours"
    if paper_value is None:
        return f"ours; the paper's is {who}"
    same = (np.allclose(value, paper_value) if isinstance(paper_value, float | tuple)
            and not isinstance(value, str) and np.size(value) == np.size(paper_value)
            else value == paper_value)
    return who if same else f"ours ({who}: {_plain(paper_value)})"


def _plain(value: Any) -> str:
    if isinstance(value, list | tuple):
        return ", ".join(_plain(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def read_configs(runs_dir: Path, run_ids: Iterable[str]) -> list[dict]:
    configs = []
    for run_id in dict.fromkeys(run_ids):
        path = runs_dir / run_id / "config.json"
        if path.is_file():
            configs.append(json.loads(path.read_text()))
    return configs


def short_commit(record: dict | None) -> str:
    """A commit as ``abc123def456`` (``, with uncommitted changes`` when dirty), or
    ``unknown`` outside a git checkout."""
    commit = (record or {}).get("commit")
    if not commit:
        return "unknown (not a git checkout)"
    return f"{commit[:12]}" + (" with uncommitted changes" if (record or {}).get("dirty")
                               else "")


def _sampled(spec: dict) -> bool:
    """A sampled confounder (sex, age, view) chooses rows; it changes no pixels. The run's
    record says which kind; the registry answers for records without it."""
    kind = spec.get("kind")
    return kind == "sampled" if kind else spec.get("name") in list_confounders("sampled")


def _confounder_text(spec: dict) -> str:
    """How the confounder was put into the training and test sets, by its kind."""
    if not _sampled(spec):
        return ("pixels changed: the confounder is put on a fraction p of the positive "
                "training images; the i.i.d. test set carries it at the same rate, the o.o.d. "
                "test set on every negative and no positive (the correlation reversed), the "
                "clean test set not at all")
    attribute = spec.get("attribute", spec.get("name"))
    value, reference = spec.get("value"), spec.get("reference")
    other = f"{attribute} {reference}" if reference not in (None, "") else f"another {attribute}"
    return (f"no pixel changed: the rows are chosen so that a fraction p of the positive "
            f"training images have {attribute} {value} and the rest {other}, every negative "
            f"{other} (pools of the same size at every p); the i.i.d. test set is chosen the "
            f"same way, the o.o.d. test set with the attribute swapped between the classes "
            f"(positives {other}, negatives {attribute} {value}), the clean test set with "
            f"{attribute} {value} and {other} in equal numbers in each class")


def _distinct(values: Iterable[Any]) -> list[Any]:
    out = []
    for value in values:
        if value not in out:
            out.append(value)
    return out


def methods_markdown(table: pd.DataFrame, configs: list[dict], name: str,
                     description: str | None = None, n_permutations: int = 9999,
                     n_boot: int = 1000, report_commit: dict | None = None) -> str:
    """The methods section of a grid, from its results table and its runs' config.json.
    ``report_commit``: the commit of the checkout writing the report
    (:func:`sm_utils.provenance.git_commit`), which the claims' tests are defined at."""
    if not configs:
        raise AnalysisError("no run has a config.json: the methods cannot be written")
    runs = table.drop_duplicates("run_id")
    settings = [c["config"] for c in configs]
    lines = [f"# Methods: grid {name}", "",
             (f"Generated by `sm report` from the recorded configurations of {len(configs)} "
             f"runs (results of {len(runs)}); edit freely. Settings marked *paper* are the "
             "paper's (Juodelyte et al. 2024, its code github.com/DovileDo/source-matters), "
             "*script default* the default of the paper's fine-tuning script, *ours* this "
             "compendium's."), ""]
    if description:
        lines += [" ".join(description.split()), ""]
    stand_ins = sorted(set(runs["source"]) & set(STAND_INS))
    if stand_ins:
        lines += ["**Not the paper's experiment.** " + "; ".join(
            f"`{s}`: {STAND_INS[s]}" for s in stand_ins)
            + ". Results with these sources show the method, not the paper's findings.", ""]

    # as each run resolved it (a source's default included)
    archs = sorted({str(c["source"].get("arch")) for c in configs} - {PAPER_ARCH})
    if archs:
        lines += [(f"The paper fine-tuned a ResNet50 (Keras' layout, `{PAPER_ARCH}` here); this "
                  f"grid uses {', '.join(f'`{a}`' for a in archs)}."), ""]

    lines += ["## Data", ""]
    for manifest in _distinct(c["manifest"]["sha256"] for c in configs):
        config = next(c for c in configs if c["manifest"]["sha256"] == manifest)
        meta = config["manifest"].get("meta", {})
        sizes = config.get("split_sizes", {})
        dataset = meta.get("dataset", config["config"].get("manifest"))
        what = meta.get("task") or meta.get("description") or ""
        generator = meta.get("generator")
        lines.append(f"- **{dataset}**" + (f": {what}" if what else "")
                     + (f" (synthetic, generated with {_plain_dict(generator)})" if generator
                        else "") + f". Manifest SHA-256 `{manifest[:16]}...`.")
        splits = meta.get("splits") or {}
        if splits:
            lines.append(f"  Patient-grouped, label-stratified splits: {splits.get('n_folds')} "
                         f"folds, test fraction {splits.get('test_fraction')}, validation "
                         f"fraction {splits.get('val_fraction')}, seed {splits.get('seed')}; "
                         "every image of a patient in one split, the test set the same in "
                         "every fold.")
        if sizes:
            lines.append("  Sizes (one run): " + "; ".join(
                f"{split} {sizes[split]['n']} images ({sizes[split]['n_pos']} positive)"
                for split in ("train", "val", "iid", "ood", "clean") if split in sizes) + ".")
        n = table[table["dataset"] == dataset]
        if "n_patients" in n and n["n_patients"].notna().any():
            lines.append(f"  Test sets: {count_range(n['n'])} images of "
                         f"{count_range(n['n_patients'])} patients.")
    lines.append("")

    lines += ["## Confounders", "",
              ("The confounder goes with the positive class at prevalence p: a synthetic one "
              "changes the pixels of the images it is put on, a sampled one (an attribute of "
              "the patient or the acquisition) chooses which images are used. "
              f"p in {{{_plain(sorted(set(runs['p'].astype(float))))}}}: "
              f"{whose('prevalences', tuple(sorted(set(runs['p'].astype(float)))))}."), ""]
    for spec in _distinct(c["confounder"] for c in configs):
        if spec.get("name") in (None, "none"):
            continue
        params = {k: v for k, v in spec.items() if k not in ("name", "kind", "category")}
        kind = spec.get("kind") or ("sampled" if _sampled(spec) else "synthetic")
        lines.append(f"- **{spec['name']}** ({kind}, {spec.get('category', '')}): "
                     + _confounder_text(spec) + ". Parameters: " + _plain_dict(params) + ".")
    lines.append("")

    lines += ["## Sources", ""]
    for source in _distinct(json.dumps(c["source"], sort_keys=True) for c in configs):
        source = json.loads(source)
        sha = source.get("weights_sha256")
        lines.append(f"- **{source.get('source')}** ({source.get('arch')}): "
                     + (source.get("provenance") or "").rstrip(".") + ". "
                     + (f"Weights SHA-256 `{sha}`." if sha else "No weights (random "
                        "initialisation)."))
    lines.append("")

    lines += ["## Fine-tuning", "", "| setting | value | whose |", "|---|---|---|"]
    folds = sorted(set(runs["fold"]))
    lines.append(f"| folds | {len(folds)} | {whose('folds', len(folds))} |")
    for setting in ("image_size", "resize", "epochs", "batch_size", "lr", "optimizer",
                    "weight_decay", "patience", "augment", "drop_rate", "seed", "mode"):
        values = _distinct(s.get(setting, DEFAULT_MODE if setting == "mode" else None)
                           for s in settings)
        shown = ", ".join(_plain(v) for v in values)
        lines.append(f"| {setting} | {shown} | "
                     + "; ".join(_distinct(whose(setting, v) for v in values)) + " |")
    devices = _distinct((c["device"].get("device"), c["device"].get("training_precision"),
                         c["device"].get("deterministic")) for c in configs)
    lines += ["", "Early stopping on the validation loss (patience above), the epoch with the "
              "lowest validation loss kept; test scores in fp32. Trained on "
              + "; ".join(f"{d} ({p} training precision, deterministic {x})" for d, p, x in devices)
              + "."]
    if any(s.get("mode", DEFAULT_MODE) != DEFAULT_MODE for s in settings):
        lines.append("Linear probing (mode linear_probe, ours): only the fresh head trains; the "
                     "backbone is frozen and kept in eval mode (its batch-norm statistics as "
                     "loaded). Each probed source is an arm of its own, `<source>:linear_probe`.")
    patched = _distinct((c["source"].get("source"), (c.get("preprocessing") or {}).get(
        "patch_size")) for c in configs if (c.get("preprocessing") or {}).get("patch_size"))
    if patched:
        lines.append("The confounders act at their own resolution; the image is then resized "
                     "to the input size above, which each vision transformer cuts into patches "
                     "(" + ", ".join(f"{s}: {p} px" for s, p in patched) + ").")
    augmentation = _distinct(json.dumps(c.get("augmentation"), sort_keys=True) for c in configs)
    if augmentation != ["null"]:
        lines.append("Augmentation: " + "; ".join(_plain_dict(json.loads(a)) for a in augmentation
                                                    if a != "null") + ".")
    lines.append("")

    lines += ["## Statistics", "",
              ("AUC is the binary ROC AUC of the positive-class score (scikit-learn), reported "
              "as mean +- SD over folds (trainings) with two 95 % intervals of the fold mean. "
              "*Test patients resampled, models fixed*: a percentile bootstrap "
              f"({n_boot} draws resampling the test set's patients, all images of a patient "
              "together, one draw for all folds), the test set's sampling error alone. "
              "*Trainings and test patients*: a t interval whose variance is the fold variance "
              "of the mean plus the bootstrap variance of the fold mean (Welch-Satterthwaite "
              "degrees of freedom), clipped to [0, 1]. The figures' bands are 95 % t intervals "
              "over folds: the spread between trainings on the one test set. Where a bootstrap "
              "interval collapses (every draw the same AUC, e.g. 0 or 1) the tables say so "
              "instead of printing it. The paper's metric, Keras' AUC "
              "(200 thresholds, micro-averaged over both softmax columns), is reported beside "
              "it and used for the paper's test: a two-sided permutation t-test of ImageNet vs "
              f"RadImageNet per confounder and p on the o.o.d. test set ({n_permutations} "
              "permutations, folds as independent samples, uncorrected, as the paper), with a "
              "fold-paired sign-flip test and Holm's correction over the prevalences beside it. "
              "The paper's claims are checked by tests pre-specified at commit "
              f"{definitions_commit() or 'unknown'} (the last commit to "
              f"sm_utils/analysis/claims.py): fold-paired tests at alpha {ALPHA} per row "
              "(equivalence "
              f"within +-{MARGIN} AUC where a claim says comparable), conditional on the grid's "
              "one test set; with n folds no p-value falls below 2^-n, which the verdicts "
              "say."), ""]

    versions = _distinct(json.dumps(c.get("versions", {}), sort_keys=True) for c in configs)
    commits = _distinct((c.get("git") or {}).get("commit") for c in configs)
    lines += ["## Software", ""]
    for entry in versions:
        lines.append("- " + ", ".join(f"{k} {v}" for k, v in json.loads(entry).items() if v))
    runs_dirty = any((c.get("git") or {}).get("dirty") for c in configs)
    lines.append("- sm_utils commit(s) of the runs: " + ", ".join(f"`{c[:12]}`" for c in commits
                                                                  if c)
                 + (" (with uncommitted changes)" if runs_dirty else "")
                 if any(commits) else "- sm_utils commit of the runs: not recorded")
    lines.append(f"- sm_utils commit of this report: {short_commit(report_commit)}")
    lines += _plugin_lines(configs)
    numerics = _distinct(((c["device"].get("numerics") or {}).get("mode"),
                          (c["device"].get("numerics") or {}).get("profile")) for c in configs)
    lines.append("- CPU numerics: " + "; ".join(f"{m} ({p})" for m, p in numerics)
                 + " (docs/REPRODUCIBILITY.md)")
    lines.append("")

    features = ({f"dataset:{d}" for d in runs["dataset"]}
                | {f"dataset:{c['manifest'].get('meta', {}).get('dataset')}" for c in configs}
                | {f"confounder:{c['confounder'].get('name')}" for c in configs}
                | {f"source:{s}" for s in runs["source"]} | {f"arch:{a}" for a in runs["arch"]}
                | {"synthetic" for c in configs if c["confounder"].get("kind") == "synthetic"}
                | {"augment" for s in settings if s.get("augment")}
                | {f"mode:{s.get('mode', DEFAULT_MODE)}" for s in settings}
                | {"foundation" for c in configs
                   if (c.get("preprocessing") or {}).get("patch_size")})
    rows = applicable(features)
    lines += ["## Deviations from the paper", "",
              ("How this compendium's implementation differs from the paper's where this grid "
              "uses it (the settings above are compared in their table); the README's table "
              "has every row."), "", "| | the paper | here | why |", "|---|---|---|---|"]
    lines += [f"| {d.topic} | {d.paper} | {d.here} | {d.why} |" for d in rows]
    lines.append("")
    return "\n".join(lines)


def _plugin_lines(configs: list[dict]) -> list[str]:
    """One line per plugin the runs loaded (config.json ``plugins``): what it is, where it
    came from, its version and its code's SHA-256, and the names it registered."""
    seen = {}
    for config in configs:
        for plugin in config.get("plugins") or []:
            seen.setdefault((plugin.get("name"), plugin.get("sha256")), plugin)
    lines = []
    for plugin in seen.values():
        where = (f"distribution {plugin['distribution']} {plugin.get('version') or ''}".strip()
                 if plugin.get("distribution") else f"file `{plugin.get('file')}`")
        names = ", ".join(plugin.get("registers") or []) or "no names"
        lines.append(f"- plugin `{plugin.get('name')}` ({plugin.get('how')}; {where}; sha256 "
                     f"`{(plugin.get('sha256') or 'unknown')[:16]}`): registers {names}")
    return lines


def _plain_dict(values: dict | None) -> str:
    return ", ".join(f"{k} {_plain(v)}" for k, v in (values or {}).items()
                     if v is not None and v != [] and v != "")
