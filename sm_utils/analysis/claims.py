"""The paper's claims as checks on a results table, specified before any result was seen.

Each claim states the paper's finding (as this compendium reads it: DESIGN.md, section 2) and
the quantities that test it, computed per fold from the table for the sources in the claim's
roles (``imagenet``: ImageNet-like; ``in_domain``: RadImageNet-like; ``random``). A claim about
robustness is measured two ways side by side where they can differ:

- **level** (as the paper tested it): a source's o.o.d. AUC, averaged over p (the area under
  its AUC-vs-p curve over the p range) and at each p > 0;
- **fall** (robustness): each source's o.o.d. AUC at p = 0 minus its AUC at p, averaged over p
  the same way. A source that starts higher can be higher at every p and still fall further;
  the table's ``note`` says so where level and fall disagree. (Over one p grid the two differ
  by exactly the difference at p = 0: fall_a - fall_b = (a_0 - b_0) - (level_a - level_b).)

The test: fold-paired differences d (one per fold; every fold is scored on one and the same
test set, so each verdict is *conditional on that test set*: it says the sources differ on
these test patients, not in a new sample of patients). Directional claims take the one-sided
sign-flip permutation test of mean(d), exact over the 2^n sign patterns; equivalence claims
two such tests against -margin and +margin (TOST). The verdicts:

- *holds*: the test rejects in the claimed direction at alpha;
- *the opposite holds*: the opposite one-sided test rejects at alpha (for an equivalence
  claim: one of the two tests that |difference| > margin rejects at alpha / 2);
- *cannot tell with these folds*: even the most extreme signs could not reach alpha: the
  smallest p these data allow, 2^-k over the k non-zero differences, is above alpha (3 folds:
  1/8; a fold whose difference is exactly 0 cannot vote);
- *not shown*: the test could have rejected and did not (failing to reject refutes nothing);
- *not testable here*: a source, a confounder, a prevalence or a second fold is missing.

The interval beside each row matches its test: the inversion of the same sign-flip test, a
one-sided 95 % bound (1 - alpha) for a directional claim and the 90 % interval (1 - 2 alpha)
of a TOST; it is exact and can be infinite where the folds cannot bound the effect.
A claim over several confounders holds as a whole only where every one of its rows holds
(an intersection-union test: each row at alpha, the claim at alpha); ``p_holm`` offers Holm
over a claim's rows of one measure for those who want "holds for at least this confounder".

On means alone (the paper's reported numbers: one value per p) no test exists: a directional
claim is read off the means when its effect exceeds what reading them can move it
(:data:`READING_ERROR`), an equivalence when the effect is within the margin.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.integrate import trapezoid  # numpy.trapezoid needs numpy >= 2

from .claims_text import (  # noqa: F401  (the tables and words, named here too)
    claims_intro,
    definitions_commit,
    format_claims,
    summarise_claims,
    summary_text,
)
from .paper import ARM_CANDIDATES
from .results import AnalysisError
from .signflip import (  # noqa: F401  (the verdict words and the test, named here too)
    _TOLERANCE,
    ALPHA,
    CANNOT,
    CANNOT_FROM_MEANS,
    HOLDS,
    MARGIN,
    NOT_SHOWN,
    OPPOSITE,
    READING_ERROR,
    UNTESTABLE,
    VERDICTS,
    fold_verdict,
    means_verdict,
    sign_flip_bounds,
    sign_flip_p,
    smallest_p,
)

ROLES = ("imagenet", "in_domain", "random")
ROLE_CANDIDATES = {"imagenet": ARM_CANDIDATES["ImageNet"],
                   "in_domain": ARM_CANDIDATES["RadImageNet"], "random": ("random",)}
SMALL_P = 0.2          # claim 6: "already at p = 0.1-0.2"
# The shortcut confounders, by this registry's names and the paper's table's (denoising,
# xray_noise_in_ct); the CT ones are LIDC-IDRI's.
SHORTCUTS = ("tag", "lowpass", "denoising", "sex", "ct_noise", "xray_noise_ct",
             "xray_noise_in_ct")
NOISE = ("xray_noise",)                     # claim 4's exception (chest X-rays)
FILTERS = ("tag", "lowpass", "denoising")   # claim 5b: random init nearly immune
LEARNT_BY_RANDOM = ("sex", "xray_noise", "ct_noise", "xray_noise_ct", "xray_noise_in_ct")
CLAIM_COLUMNS = ["claim", "statement", "dataset", "arch", "confounder", "measure", "quantity",
                 "roles", "sources", "effect", "ci_low", "ci_high", "interval", "p_value",
                 "min_p", "n_folds", "verdict", "p_holm", "n_rows", "why", "note"]


@dataclass(frozen=True)
class Measure:
    """One quantity that tests a claim: ``values(table, source, confounder, metric)`` per fold
    (a Series by fold, or a DataFrame of several such columns, one row of the table each), for
    the source in role ``first`` against the one in ``second`` (``None``: against 0).
    ``kind``: "greater" (first > second) or "equivalent" (|first - second| < margin)."""

    name: str
    quantity: str
    values: Callable[..., pd.Series | pd.DataFrame]
    first: str
    second: str | None = None
    kind: str = "greater"


@dataclass(frozen=True)
class Claim:
    """One of the paper's claims: its statement, the confounders it concerns (``None``: a claim
    on clean data, at p = 0) and its measures (the first is the one its statement names)."""

    id: str
    statement: str
    measures: tuple[Measure, ...]
    confounders: tuple[str, ...] | None = None


def claim_roles(table: pd.DataFrame, roles: dict[str, str] | None = None) -> dict[str, str]:
    """Role -> source: ``roles`` as given (a grid file's ``claims: {roles: ...}``), the rest
    by the paper's and the demo's names (:data:`ROLE_CANDIDATES`); a role with no source
    present is left out, one with several candidates raises."""
    present = set(table["source"].dropna())
    unknown = set(roles or {}) - set(ROLES)
    if unknown:
        raise AnalysisError(f"unknown claim roles {sorted(unknown)}; the roles are {list(ROLES)}")
    found = dict(roles or {})
    absent = {role: source for role, source in found.items() if source not in present}
    if absent:
        raise AnalysisError(
            f"the claims' roles name source(s) this table does not have: {absent}; its sources "
            f"are {sorted(present)}. Fix claims: {{roles: ...}} in the grid file (or --role).")
    for role, candidates in ROLE_CANDIDATES.items():
        if role in found:
            continue
        here = [name for name in candidates if name in present]
        if len(here) > 1:
            raise AnalysisError(f"several sources could play the role {role!r}: {here}; name "
                                f"one in claims: {{roles: {{{role}: ...}}}}")
        if here:
            found[role] = here[0]
    return found


# --- quantities per fold -----------------------------------------------------------------------

def _rows(table, source, confounder=None, test_set=None):
    part = table[table["source"] == source]
    if confounder is not None:
        part = part[part["confounder"] == confounder]
    if test_set is not None:
        part = part[part["test_set"] == test_set]
    return part


def _curves(part: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Fold x p: the AUC (mean over seeds and strengths, if several)."""
    if part.empty:
        return pd.DataFrame()
    return part.groupby(["fold", "p"])[metric].mean().unstack("p").sort_index(axis=1)


def _over_p(curves: pd.DataFrame) -> pd.Series:
    """Per fold: the mean over the p range (area under the curve / range, trapezoidal)."""
    curves = curves.dropna()
    if curves.shape[1] < 2:
        return pd.Series(dtype=float)
    ps = curves.columns.to_numpy(dtype=float)
    return pd.Series(trapezoid(curves.to_numpy(), ps, axis=1) / (ps[-1] - ps[0]),
                     index=curves.index, dtype=float)


def _fall(curves: pd.DataFrame) -> pd.DataFrame:
    """Fold x p: the AUC at p = 0 minus the AUC at p (0 at p = 0)."""
    zero = [p for p in curves.columns if np.isclose(p, 0.0)]
    if not zero:
        return pd.DataFrame()
    return -(curves.sub(curves[zero[0]], axis=0))


def ood_level(table, source, confounder, metric):
    return _over_p(_curves(_rows(table, source, confounder, "ood"), metric))


def ood_level_at_each_p(table, source, confounder, metric):
    curves = _curves(_rows(table, source, confounder, "ood"), metric)
    positive = [p for p in curves.columns if p > 0]
    return curves[positive].rename(columns=lambda p: f"level at p = {p:g}")


def ood_fall(table, source, confounder, metric):
    return _over_p(_fall(_curves(_rows(table, source, confounder, "ood"), metric)))


def iid_level(table, source, confounder, metric):
    return _over_p(_curves(_rows(table, source, confounder, "iid"), metric))


def iid_rise(table, source, confounder, metric):
    return -_over_p(_fall(_curves(_rows(table, source, confounder, "iid"), metric)))


def small_p_fall(table, source, confounder, metric):
    """Per fold: the mean o.o.d. AUC fall from p = 0 over the prevalences 0 < p <= 0.2."""
    fall = _fall(_curves(_rows(table, source, confounder, "ood"), metric))
    small = [p for p in fall.columns if 0 < p <= SMALL_P + 1e-9]
    return fall[small].dropna().mean(axis=1) if small else pd.Series(dtype=float)


def clean_at_zero(table, source, confounder, metric) -> pd.Series:
    """Per fold: the clean-test AUC at p = 0 (the i.i.d. one where there is no clean test set,
    the o.o.d. one in the paper's CT table, where nothing else was reported), averaged over the
    confounders (at p = 0 none is applied)."""
    zero = table[(table["source"] == source) & np.isclose(table["p"], 0.0)]
    for test_set in ("clean", "iid", "ood"):
        rows = zero[zero["test_set"] == test_set]
        if not rows.empty:
            return rows.groupby("fold")[metric].mean()
    return pd.Series(dtype=float)


def _compare(a: pd.Series, b: pd.Series, kind: str, ctx: dict) -> dict:
    folds = sorted(set(a.dropna().index) & set(b.dropna().index))
    if not folds:
        return {"verdict": UNTESTABLE, "why": "no fold has both values", "n_folds": 0}
    d = np.array([a[f] - b[f] for f in folds], dtype=float)
    if ctx["means_only"]:
        effect = float(d.mean())
        margin = f" within +-{ctx['margin']}" if kind == "equivalent" else ""
        return {"effect": effect, "n_folds": len(d), "interval": "none (means only)",
                "verdict": means_verdict(effect, kind, ctx["margin"]),
                "why": f"means only, no test: effect {effect:+.3f}{margin}, read to "
                       f"+-{READING_ERROR}"}
    if len(d) < 2:
        return {"effect": float(d.mean()), "n_folds": len(d), "verdict": UNTESTABLE,
                "why": f"{len(d)} fold: a fold-paired test needs at least 2"}
    row = fold_verdict(d, kind, ctx["alpha"], ctx["margin"])
    if row["verdict"] == CANNOT:
        nonzero = int(np.sum(np.abs(d) > _TOLERANCE))
        why = (f"{len(d)} folds ({nonzero} with a non-zero difference): the smallest p they "
               f"allow is {row['min_p']:.3g} > {ctx['alpha']}")
    else:
        why = (f"one-sided sign-flip test over {len(d)} folds"
               + (f", equivalence within +-{ctx['margin']}" if kind == "equivalent" else "")
               + ", on this test set")
    return {**row, "why": why}


def _need(roles: dict[str, str], *needed: str) -> str | None:
    missing = [r for r in needed if r not in roles]
    return f"no source in the role(s) {missing}" if missing else None


def _measure_rows(claim: Claim, measure: Measure, table, roles, confounder, ctx) -> list[dict]:
    compared = f"{measure.first} vs {measure.second}" if measure.second else measure.first
    base = {"confounder": confounder or "(none)", "measure": measure.name,
            "quantity": measure.quantity, "roles": compared}
    if why := _need(roles, measure.first, *([measure.second] if measure.second else [])):
        return [{**base, "verdict": UNTESTABLE, "why": why}]
    sources = (f"{roles[measure.first]} vs {roles[measure.second]}" if measure.second
               else roles[measure.first])
    a = measure.values(table, roles[measure.first], confounder, ctx["metric"])
    b = (measure.values(table, roles[measure.second], confounder, ctx["metric"])
         if measure.second else None)
    columns = list(a.columns) if isinstance(a, pd.DataFrame) else [None]
    rows = []
    for column in columns:
        first = a[column] if column is not None else a
        if b is None:
            second = pd.Series(0.0, index=first.index)
        else:
            second = b[column] if column is not None and column in b else (
                b if column is None else pd.Series(dtype=float))
        row = {**base, "sources": sources, **_compare(first, second, measure.kind, ctx)}
        if column is not None:
            row["measure"] = column
        if row["verdict"] == UNTESTABLE and first.dropna().empty:
            row["why"] = f"no {measure.quantity} for {sources} here"
        rows.append(row)
    return rows


def _level_and_fall_note(rows: list[dict]) -> None:
    """Where the level over p and the fall (or rise) disagree, say so in words on both rows.
    Over one p grid they differ by the difference at p = 0: level = clean + s x fall, with
    s = +1 for a fall compared the other way round (claims 2, 5b) or a rise compared the same
    way (claim 3), and s = -1 for a fall compared the same way (claim 4)."""
    level = next((r for r in rows if r["measure"] == "level" and "effect" in r), None)
    if level is None or " vs " not in level["roles"]:
        return
    first, second = level["roles"].split(" vs ")
    for other in rows:
        rise = other["measure"].startswith("rise")
        if not (rise or other["measure"].startswith("fall")) or "effect" not in other:
            continue
        if other["roles"] not in (f"{first} vs {second}", f"{second} vs {first}"):
            continue
        same_way = other["roles"] == level["roles"]
        s = 1 if rise == same_way else -1
        # with s = +1 both effects favour the claim when > 0
        opposite_signs = s == 1 and level["effect"] * other["effect"] < 0
        if other["verdict"] == level["verdict"] and not opposite_signs:
            return
        clean = level["effect"] - s * other["effect"]
        a, b = level["sources"].split(" vs ")
        name = "rise" if rise else "fall"
        how = "point opposite ways" if opposite_signs else "give different verdicts"
        note = (f"level and {name} {how}: level {level['effect']:+.3f} ({level['verdict']}), "
                f"{name} {other['effect']:+.3f} ({other['verdict']}); {a} minus {b} at p = 0 "
                f"is {clean:+.3f}: the level counts that start, the {name} does not")
        level["note"] = other["note"] = note
        return


def _check(claim: Claim, table: pd.DataFrame, roles: dict, ctx: dict) -> list[dict]:
    if claim.confounders is None:
        return [row for m in claim.measures
                for row in _measure_rows(claim, m, table, roles, None, ctx)]
    present = [c for c in dict.fromkeys(table["confounder"]) if c in claim.confounders]
    if not present:
        here = sorted(set(table["confounder"].dropna()) - {"none"})
        known = [c for c in claim.confounders if c not in PAPER_CONFOUNDERS]
        return [{"confounder": ", ".join(here) or "(none)", "measure": claim.measures[0].name,
                 "quantity": claim.measures[0].quantity, "verdict": UNTESTABLE,
                 "why": f"this table's confounders {here} are none of the claim's {known}"}]
    rows = []
    for confounder in present:
        these = [row for m in claim.measures
                 for row in _measure_rows(claim, m, table, roles, confounder, ctx)]
        _level_and_fall_note(these)
        rows += these
    return rows


# --- the claims --------------------------------------------------------------------------------

LEVEL_OVER_P = "o.o.d. AUC, mean over p"
FALL_OVER_P = "o.o.d. AUC fall from p = 0, mean over p"

CLAIMS = (
    Claim("1", "ImageNet and in-domain (RadImageNet) sources perform comparably without a "
               "confounder",
          (Measure("level", "clean AUC at p = 0", clean_at_zero, "in_domain", "imagenet",
                   "equivalent"),)),
    Claim("2", "ImageNet is more prone to shortcuts: under a confounder its o.o.d. AUC falls "
               "further than the in-domain source's (the paper tested the level: the "
               "in-domain source's o.o.d. AUC is higher at each p)",
          (Measure("fall", FALL_OVER_P, ood_fall, "imagenet", "in_domain"),
           Measure("level", LEVEL_OVER_P, ood_level, "in_domain", "imagenet"),
           Measure("level at each p", "o.o.d. AUC at p", ood_level_at_each_p, "in_domain",
                   "imagenet")),
          SHORTCUTS),
    Claim("3", "Shortcuts inflate i.i.d. AUC more for ImageNet than for the in-domain source",
          (Measure("rise", "i.i.d. AUC rise from p = 0, mean over p", iid_rise, "imagenet",
                   "in_domain"),
           Measure("level", "i.i.d. AUC, mean over p", iid_level, "imagenet", "in_domain")),
          SHORTCUTS),
    Claim("4", "Exception: under X-ray noise both sources collapse alike",
          (Measure("level", LEVEL_OVER_P, ood_level, "in_domain", "imagenet", "equivalent"),
           Measure("fall", FALL_OVER_P, ood_fall, "in_domain", "imagenet", "equivalent")),
          NOISE),
    Claim("5a", "Random initialisation is weakest without a confounder",
          (Measure("level", "clean AUC at p = 0 (ImageNet over random)", clean_at_zero,
                   "imagenet", "random"),
           Measure("level", "clean AUC at p = 0 (in-domain over random)", clean_at_zero,
                   "in_domain", "random"))),
    Claim("5b", "Random initialisation is nearly immune to the tag and the low-pass filter: "
                "its o.o.d. AUC barely falls",
          (Measure("fall", f"random's {FALL_OVER_P}, against 0", ood_fall, "random",
                   None, "equivalent"),
           Measure("fall vs ImageNet", FALL_OVER_P, ood_fall, "imagenet", "random"),
           Measure("level", LEVEL_OVER_P, ood_level, "random", "imagenet")),
          FILTERS),
    Claim("5c", "Random initialisation is not immune to every confounder: its o.o.d. AUC falls "
                "under sex and the noise confounders",
          (Measure("fall", f"random's {FALL_OVER_P}", ood_fall, "random"),),
          LEARNT_BY_RANDOM),
    Claim("6", "Small contamination suffices: ImageNet's o.o.d. AUC falls already at "
               "p = 0.1-0.2",
          (Measure("fall at small p", f"o.o.d. AUC fall from p = 0, mean over 0 < p <= "
                                      f"{SMALL_P}", small_p_fall, "imagenet"),),
          SHORTCUTS),
)


def _add_holm(out: pd.DataFrame, alpha: float) -> pd.DataFrame:
    """Holm over each claim's rows of one measure (per dataset and architecture)."""
    from .statistics import _holm

    family = ["claim", "dataset", "arch", "measure"]
    if out.empty:
        return out
    out["p_holm"], _, sizes = _holm(out, "p_value", family, alpha)
    out["n_rows"] = sizes.where(sizes > 0)
    return out


def check_claims(table: pd.DataFrame, roles: dict[str, str] | None = None, *,
                 metric: str = "auc", alpha: float = ALPHA, margin: float = MARGIN,
                 claims: Sequence[Claim] = CLAIMS, means_only: bool = False) -> pd.DataFrame:
    """Every claim's verdict rows on a results table (one row per dataset, architecture,
    confounder and measure a claim concerns): :data:`CLAIM_COLUMNS`. ``means_only``: the
    table holds one mean per condition (:func:`paper_claims`), judged on direction and size."""
    if metric not in table.columns:
        raise AnalysisError(f"the table has no {metric!r} column (columns: {list(table.columns)})")
    rows = []
    for (dataset, arch), part in table.groupby(["dataset", "arch"], sort=True, dropna=False):
        found = claim_roles(part, roles)
        ctx = {"metric": metric, "alpha": alpha, "margin": margin, "means_only": means_only}
        for claim in claims:
            for row in _check(claim, part, found, ctx):
                rows.append({"claim": claim.id, "statement": claim.statement, "dataset": dataset,
                             "arch": arch, **row})
    out = pd.DataFrame(rows, columns=CLAIM_COLUMNS)
    out = _add_holm(out, alpha)
    out["n_folds"] = out["n_folds"].astype("Int64")
    out["n_rows"] = out["n_rows"].astype("Int64")
    return out


PAPER_ROLES = {"imagenet": "ImageNet", "in_domain": "RadImageNet", "random": "random"}
# The paper's table's confounder names as this registry's.
PAPER_CONFOUNDERS = {"denoising": "lowpass", "xray_noise_in_ct": "xray_noise_ct"}


def paper_claims(reference: pd.DataFrame | None = None, **kwargs) -> pd.DataFrame:
    """:func:`check_claims` on the paper's own reported means (``data/reference/``): one value
    per (dataset, confounder, test set, p, source), so the verdicts are on direction and size.
    Confounders by this registry's names (the paper's denoising is the low-pass filter)."""
    from .reference import load_reference

    reference = load_reference() if reference is None else reference
    table = (reference.rename(columns={"mean_auc": "auc"})
             .replace({"confounder": PAPER_CONFOUNDERS}).assign(fold=0, arch="ResNet50"))
    out = check_claims(table, PAPER_ROLES, means_only=True, **kwargs)
    absent = (out["verdict"] == UNTESTABLE) & out["why"].str.contains(
        " here$|are none of the claim's", regex=True)
    return out[~absent].reset_index(drop=True)  # e.g. no i.i.d. AUC reported for CT


def claims_against_paper(ours: pd.DataFrame, paper: pd.DataFrame | None = None,
                         datasets: dict[str, str] | None = None) -> pd.DataFrame:
    """``ours`` (:func:`check_claims`) with the paper's verdict and effect on its own reported
    means beside each row (:func:`paper_claims`: same claim, measure, roles and confounder, in
    the paper's dataset ``datasets[ours]``, by default NIH ChestX-ray14), and the difference."""
    paper = paper_claims() if paper is None else paper
    datasets = datasets or {}
    theirs = paper[["dataset", "claim", "measure", "roles", "confounder", "effect",
                    "verdict"]].rename(columns={"dataset": "paper_dataset",
                                                "effect": "paper_effect",
                                                "verdict": "paper_verdict"})
    out = ours.assign(
        paper_dataset=ours["dataset"].map(lambda d: datasets.get(d, "nih_cxr14")),
        _confounder=ours["confounder"].replace(PAPER_CONFOUNDERS))
    theirs = theirs.rename(columns={"confounder": "_confounder"})
    out = out.merge(theirs, on=["paper_dataset", "claim", "measure", "roles", "_confounder"],
                    how="left")
    out["effect_minus_paper"] = out["effect"] - out["paper_effect"]
    return out.drop(columns=["_confounder"])


def claims_markdown(table: pd.DataFrame, alpha: float = ALPHA, margin: float = MARGIN,
                    commit: str | None = None) -> str:
    """claims.md: what the verdicts mean, the statements, then the table."""
    statements = "".join(f"- **{c.id}**: {c.statement}\n" for c in CLAIMS)
    return (claims_intro(alpha, margin, commit) + statements + "\n"
            + format_claims(table, "md"))
