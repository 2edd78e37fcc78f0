"""The paper's reported means (data/reference/) as reference lines for a grid's figure."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

REFERENCE_CSV = Path(__file__).resolve().parents[2] / "data" / "reference" / "source_matters_2024_reported_auc.csv"
# Our registry names -> the names in the paper's reported table.
REFERENCE_SOURCES = {"imagenet": "ImageNet", "imagenet_keras": "ImageNet", "radimagenet": "RadImageNet",
                     "radimagenet_torch": "RadImageNet", "random": "random"}
REFERENCE_CONFOUNDERS = {"tag": "tag", "lowpass": "denoising", "denoising": "denoising",
                         "xray_noise": "xray_noise", "sex": "sex", "ct_noise": "ct_noise",
                         "xray_noise_ct": "xray_noise_in_ct"}

# (the paper's confounder, test set) whose reported AUCs no grid here can be compared with.
NOT_COMPARABLE = (("sex", "iid"),)

def load_reference(path: str | os.PathLike = REFERENCE_CSV) -> pd.DataFrame:
    """The paper's reported mean AUCs (see data/reference/README.md for their provenance)."""
    return pd.read_csv(path)


def reference_lines(reference: pd.DataFrame, datasets: dict[str, str],
                    sources: dict[str, str] | None = None,
                    confounders: dict[str, str] | None = None) -> pd.DataFrame:
    """The reported means re-labelled with this grid's names (dataset, confounder, source).

    ``datasets`` maps a grid dataset to the paper's (e.g. ``{"nih_cxr14": "nih_cxr14",
    "nih_sex_task": "nih_cxr14"}``); sources and confounders default to the registry mappings.
    Left out: the paper's i.i.d. AUCs of the sex task (:data:`NOT_COMPARABLE`), whose test
    pool it never published; ours (``nih_sex_task``) is our own pool, so a line from theirs
    would compare two different test sets.
    """
    sources = {**REFERENCE_SOURCES, **(sources or {})}
    confounders = {**REFERENCE_CONFOUNDERS, **(confounders or {})}
    frames = []
    for ours, theirs in datasets.items():
        ref = reference[reference["dataset"] == theirs]
        for our_conf, their_conf in confounders.items():
            for our_src, their_src in sources.items():
                part = ref[(ref["confounder"] == their_conf) & (ref["source"] == their_src)]
                for confounder, test_set in NOT_COMPARABLE:
                    part = part[~((part["confounder"] == confounder)
                                  & (part["test_set"] == test_set))]
                if part.empty:
                    continue
                frames.append(part.assign(dataset=ours, confounder=our_conf, source=our_src))
    if not frames:
        return pd.DataFrame(columns=reference.columns)
    return pd.concat(frames, ignore_index=True)
