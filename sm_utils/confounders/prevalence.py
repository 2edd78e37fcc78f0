"""Which rows carry the confounder: exact prevalence, chosen by a stable hash.

Synthetic confounders keep every row and mark ``confounded`` on
- ``train`` / ``iid``: exactly round(p x positives) positives (half rounds up), no negative;
- ``ood``: every negative, no positive;
- ``clean``: none.

Sampled confounders (an attribute such as sex) select a *subset* of rows so that the
attribute goes with the label as in the paper's sex task (value = F, reference = M):
- ``train`` / ``iid``: n_positives positives, round(p x n_positives) of them with the value and
  the rest with the reference; n_negatives negatives, all with the reference;
- ``ood``: positives all reference, negatives all value (the correlation reversed);
- ``clean``: half value / half reference in both classes.
``confounded`` is True where the row has the value.

Rows are ranked by SHA-256 of (seed, confounder name, image id) and taken from the top, so
the choice is the same on every machine, and the images confounded at a lower p are a subset
of those at a higher p (nested selections make the p-sweep less noisy).
"""

from __future__ import annotations

import hashlib
import itertools
import math

import numpy as np
import pandas as pd

from .registry import Confounder, ConfounderError, register_confounder
from .validation import check_seed

TEST_SETS = ("train", "iid", "ood", "clean")
PREVALENCE_GRID = (0.0, 0.1, 0.2, 0.5, 0.8, 1.0)


def n_confounded(p: float, n: int) -> int:
    """round(p * n) with halves rounded up (Python's round() would round 2.5 to 2)."""
    return math.floor(p * n + 0.5 + 1e-9)


def hash_rank(image_ids: pd.Series, seed: int, name: str) -> np.ndarray:
    """Positions of ``image_ids`` ordered by SHA-256 of (seed, name, id), ties by id."""
    keys = [hashlib.sha256(f"{seed}\x1f{name}\x1f{i}".encode()).hexdigest() + f"\x1f{i}"
            for i in image_ids.astype(str)]
    return np.argsort(np.array(keys, dtype=object), kind="stable")


def _check_inputs(rows, conf, p, seed, test_set, label_column, id_column):
    if not isinstance(conf, Confounder):
        raise ConfounderError(f"expected a Confounder from get_confounder(); got {type(conf).__name__}.")
    if isinstance(p, bool) or not isinstance(p, (int, float, np.number)) or not 0.0 <= p <= 1.0:
        raise ConfounderError(f"prevalence p must be a number in [0, 1]; got {p!r}.")
    check_seed(seed)
    if test_set not in TEST_SETS:
        raise ConfounderError(f"unknown test_set {test_set!r}; valid: {', '.join(TEST_SETS)}.")
    missing = [c for c in (label_column, id_column) if c not in rows.columns]
    if missing:
        raise ConfounderError(
            f"rows lack column(s) {missing}; found {list(rows.columns)}. Pass manifest rows."
        )
    bad = ~rows[label_column].isin([0, 1])
    if bad.any():
        raise ConfounderError(
            f"labels must be 0/1; found {sorted(map(str, rows.loc[bad, label_column].unique()))[:5]}."
        )


def apply_prevalence(
    rows: pd.DataFrame, conf: Confounder, p: float, seed: int, test_set: str, *,
    n_positives: int | None = None, n_negatives: int | None = None,
    label_column: str = "label", id_column: str = "image_id",
) -> pd.DataFrame:
    """Rows (all, or a subset for sampled confounders) with a boolean ``confounded`` column.

    ``n_positives`` / ``n_negatives`` (sampled confounders only) override the confounder's
    pool sizes; by default the largest pools that are feasible for every p in [0, 1].
    """
    _check_inputs(rows, conf, p, seed, test_set, label_column, id_column)
    if conf.kind == "sampled":
        return _sampled(rows, conf, float(p), int(seed), test_set, n_positives, n_negatives,
                        label_column, id_column)
    if n_positives is not None or n_negatives is not None:
        raise ConfounderError(
            f"n_positives/n_negatives only apply to sampled confounders; {conf.name!r} is synthetic."
        )
    out = rows.copy()
    labels = out[label_column].to_numpy()
    confounded = np.zeros(len(out), bool)
    if test_set in ("train", "iid"):
        positives = np.flatnonzero(labels == 1)
        order = hash_rank(out[id_column].iloc[positives], seed, conf.name)
        confounded[positives[order[: n_confounded(p, len(positives))]]] = True
    elif test_set == "ood":
        confounded = labels == 0
    out["confounded"] = confounded
    return out


# --- sampled confounders ------------------------------------------------------------------

def bin_labels(bins) -> list[str]:
    return [f"[{lo:g},{hi:g})" for lo, hi in itertools.pairwise(bins)]


def attribute_values(rows: pd.DataFrame, conf: Confounder) -> pd.Series:
    """The confounding attribute of each row, as strings (numeric ones put into ``bins``)."""
    attribute = conf.params["attribute"]
    if attribute not in rows.columns:
        raise ConfounderError(
            f"sampled confounder {conf.name!r} needs attribute column {attribute!r}; the rows "
            f"have {list(rows.columns)}. Add it to the manifest or pass attribute=<column>."
        )
    bins = conf.params["bins"]
    if bins:
        values = pd.to_numeric(rows[attribute], errors="coerce")
        return pd.cut(values, bins=list(bins), right=False, labels=bin_labels(bins)).astype(str)
    return rows[attribute].astype(str)


def _pool_sizes(counts: dict[str, int], test_set: str) -> tuple[int, int]:
    """Largest (positives, negatives) feasible for every p (train/iid) or for the set."""
    vp, rp, vn, rn = counts["value+"], counts["reference+"], counts["value-"], counts["reference-"]
    if test_set in ("train", "iid"):
        return min(vp, rp), rn
    if test_set == "ood":
        return rp, vn
    return 2 * min(vp, rp), 2 * min(vn, rn)


def _wanted(n_pos: int, n_neg: int, p: float, test_set: str) -> dict[str, int]:
    """How many rows of each (attribute group, class) a pool of n_pos / n_neg needs."""
    if test_set in ("train", "iid"):
        k = n_confounded(p, n_pos)
        return {"value+": k, "reference+": n_pos - k, "value-": 0, "reference-": n_neg}
    if test_set == "ood":
        return {"value+": 0, "reference+": n_pos, "value-": n_neg, "reference-": 0}
    kp, kn = n_confounded(0.5, n_pos), n_confounded(0.5, n_neg)
    return {"value+": kp, "reference+": n_pos - kp, "value-": kn, "reference-": n_neg - kn}


def _sampled(rows, conf, p, seed, test_set, n_pos, n_neg, label_column, id_column):
    value, reference = str(conf.params["value"]), conf.params["reference"]
    attribute = attribute_values(rows, conf)
    is_value = (attribute == value).to_numpy()
    is_reference = (attribute != value).to_numpy() if reference is None else (
        attribute == str(reference)).to_numpy()
    if reference is None:  # any other known value is the reference; missing values never are
        is_reference &= rows[conf.params["attribute"]].notna().to_numpy()
    positive = (rows[label_column] == 1).to_numpy()
    groups = {"value+": is_value & positive, "reference+": is_reference & positive,
              "value-": is_value & ~positive, "reference-": is_reference & ~positive}
    counts = {g: int(m.sum()) for g, m in groups.items()}
    max_pos, max_neg = _pool_sizes(counts, test_set)
    n_pos = conf.params["n_positives"] if n_pos is None else n_pos
    n_neg = conf.params["n_negatives"] if n_neg is None else n_neg
    n_pos = max_pos if n_pos is None else int(n_pos)
    n_neg = max_neg if n_neg is None else int(n_neg)
    wanted = _wanted(n_pos, n_neg, p, test_set)
    short = {g: (wanted[g], counts[g]) for g in groups if wanted[g] > counts[g]}
    if short or n_pos <= 0 or n_neg <= 0:
        attr = conf.params["attribute"]
        ref_name = "other" if reference is None else reference
        found = ", ".join(f"{counts[g]} {'positive' if g.endswith('+') else 'negative'} "
                          f"{attr}={value if g.startswith('value') else ref_name}" for g in groups)
        needs = "; ".join(f"{w} needed for {g} but {c} exist" for g, (w, c) in short.items())
        needs = needs or "a pool without positives or without negatives cannot be used"
        raise ConfounderError(
            f"sampled confounder {conf.name!r} ({test_set}, p={p}): asked for {n_pos} "
            f"positives and {n_neg} negatives: {needs}. The rows "
            f"have {found}. The largest feasible pools here are n_positives={max_pos}, "
            f"n_negatives={max_neg}; ask for fewer or add data."
        )
    chosen = []
    for g, mask in groups.items():
        positions = np.flatnonzero(mask)
        order = hash_rank(rows[id_column].iloc[positions], seed, conf.name)
        chosen.append(positions[order[: wanted[g]]])
    keep = np.sort(np.concatenate(chosen))
    out = rows.iloc[keep].copy()
    out["confounded"] = is_value[keep]
    return out


register_confounder(
    "sex", kind="sampled", category="patient/demographic",
    description=("Patient sex changes the anatomy (breast shadows, body size); if one sex is "
                 "over-represented among positives, a model can predict sex instead of disease."),
    defaults={"attribute": "sex", "value": "F", "reference": "M", "bins": (),
              "n_positives": None, "n_negatives": None},
)
register_confounder(
    "age", kind="sampled", category="patient/demographic",
    description=("Older patients have larger hearts, thinner bones and emphysema; if positives "
                 "are mostly old, a model can predict age instead of disease."),
    defaults={"attribute": "age", "value": "[60,200)", "reference": "[0,60)",
              "bins": (0, 60, 200), "n_positives": None, "n_negatives": None},
)
register_confounder(
    "view", kind="sampled", category="environment/acquisition",
    description=("Portable AP radiographs are taken of sicker, bed-bound patients and look "
                 "different from standing PA films, so the projection can stand in for disease."),
    defaults={"attribute": "view", "value": "AP", "reference": "PA", "bins": (),
              "n_positives": None, "n_negatives": None},
)
