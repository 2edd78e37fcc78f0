"""The paper's claims as pre-registered checks on a results table.

Each claim names its quantity (computed per fold from the table), the sources it needs in the
claim's roles (``imagenet``: ImageNet-like; ``in_domain``: RadImageNet-like; ``random``), its
test and what "holds" means:

- directional claims: a one-sided fold-paired sign-flip permutation test of the mean
  difference (exact over the 2^n sign patterns); *holds* at p <= alpha in the claimed
  direction, *cannot tell with these folds* when even the most extreme data could not reach
  alpha (2^-n > alpha: 3 folds give 1/8), else *does not hold*;
- equivalence claims (1, 4): two one-sided sign-flip tests against +-``margin`` (TOST);
  *holds* when both reject.

Every verdict row carries the effect (mean fold difference), its t interval, the p-value and
the smallest p the folds allow. On means alone (the paper's reported numbers: one value per
p) no test exists: the verdict is on direction and size (``|effect| >= margin``) and says so.
A claim whose sources, confounders or folds are missing says "not testable here" and why.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats
from scipy.integrate import trapezoid  # numpy.trapezoid needs numpy >= 2

from .paper import ARM_CANDIDATES
from .results import AnalysisError

ROLES = ("imagenet", "in_domain", "random")
ROLE_CANDIDATES = {"imagenet": ARM_CANDIDATES["ImageNet"],
                   "in_domain": ARM_CANDIDATES["RadImageNet"], "random": ("random",)}
ALPHA = 0.05
MARGIN = 0.05          # AUC: the size below which two sources count as "comparable"
HOLDS, FAILS, CANNOT, UNTESTABLE = ("holds", "does not hold", "cannot tell with these folds",
                                    "not testable here")
SHORTCUTS = ("tag", "lowpass", "denoising", "sex")   # the confounders of claims 2, 3 and 6
NOISE = ("xray_noise",)                               # claim 4's exception
CLAIM_COLUMNS = ["claim", "statement", "dataset", "arch", "confounder", "quantity", "roles",
                 "sources", "effect", "ci_low", "ci_high", "p_value", "min_p", "n_folds", "verdict", "why"]


@dataclass(frozen=True)
class Claim:
    """One of the paper's claims: ``check(table, roles, context)`` yields verdict rows."""

    id: str
    statement: str
    check: Callable[..., list[dict]]


def claim_roles(table: pd.DataFrame, roles: dict[str, str] | None = None) -> dict[str, str]:
    """Role -> source: ``roles`` as given (a grid file's ``claims: {roles: ...}``), the rest
    by the paper's and the demo's names (:data:`ROLE_CANDIDATES`); a role with no source
    present is left out, one with several candidates raises."""
    present = set(table["source"].dropna())
    found = {role: source for role, source in (roles or {}).items() if role in ROLES}
    unknown = set(roles or {}) - set(ROLES)
    if unknown:
        raise AnalysisError(f"unknown claim roles {sorted(unknown)}; the roles are {list(ROLES)}")
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

def _curve(part: pd.DataFrame, metric: str) -> pd.Series:
    """Per fold: the mean AUC over the p range (area under the AUC-vs-p curve / range)."""
    out = {}
    for fold, rows in part.groupby("fold"):
        curve = rows.groupby("p")[metric].mean().sort_index()
        if len(curve) < 2 or curve.isna().any():
            continue
        span = curve.index[-1] - curve.index[0]
        out[fold] = float(trapezoid(curve.to_numpy(), curve.index.to_numpy()) / span)
    return pd.Series(out, dtype=float)


def _at(part: pd.DataFrame, p: float, metric: str) -> pd.Series:
    rows = part[np.isclose(part["p"], p)]
    return rows.groupby("fold")[metric].mean()


def _rows(table, source, confounder=None, test_set=None):
    part = table[table["source"] == source]
    if confounder is not None:
        part = part[part["confounder"] == confounder]
    if test_set is not None:
        part = part[part["test_set"] == test_set]
    return part


def _clean_at_zero(table, source, metric) -> pd.Series:
    """Per fold: the clean-test AUC at p = 0 (the i.i.d. one where there is no clean set),
    averaged over the confounders (at p = 0 none is applied)."""
    zero = table[(table["source"] == source) & np.isclose(table["p"], 0.0)]
    test_set = "clean" if (zero["test_set"] == "clean").any() else "iid"
    zero = zero[zero["test_set"] == test_set]
    if zero.empty:  # the paper's reported table: o.o.d. AUC at p = 0
        zero = table[(table["source"] == source) & np.isclose(table["p"], 0.0)]
    return zero.groupby("fold")[metric].mean()


# --- tests -------------------------------------------------------------------------------------

def _sign_flip_p(differences: np.ndarray) -> tuple[float, float]:
    """(one-sided p that the mean difference is > 0, the smallest p these folds allow)."""
    n = len(differences)
    if np.allclose(differences, 0):
        return 1.0, 0.5 ** n
    result = stats.permutation_test((differences,), np.mean, permutation_type="samples",
                                    alternative="greater", n_resamples=np.inf)
    return float(result.pvalue), 0.5 ** n


def _interval(differences: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    n = len(differences)
    if n < 2:
        return np.nan, np.nan
    mean, sem = float(np.mean(differences)), float(stats.sem(differences))
    if sem == 0:
        return mean, mean
    half = stats.t.ppf(0.5 + confidence / 2, n - 1) * sem
    return mean - half, mean + half


def _verdict(a: pd.Series, b: pd.Series, *, kind: str, alpha: float, margin: float,
             means_only: bool = False) -> dict:
    """Compare per-fold values ``a`` - ``b`` (folds matched by label): ``kind`` "greater"
    (the claim: a > b) or "equivalent" (|a - b| < margin). ``means_only``: one value each (a
    table of reported means), judged on direction and size."""
    folds = sorted(set(a.dropna().index) & set(b.dropna().index))
    if not folds:
        return {"verdict": UNTESTABLE, "why": "no fold has both values", "n_folds": 0}
    d = np.array([a[f] - b[f] for f in folds], dtype=float)
    effect = float(d.mean())
    low, high = _interval(d)
    row = {"effect": effect, "ci_low": low, "ci_high": high, "n_folds": len(d)}
    if means_only:
        ok = (effect >= margin) if kind == "greater" else (abs(effect) < margin)
        against = (effect <= -margin) if kind == "greater" else (abs(effect) >= margin)
        verdict = HOLDS if ok else FAILS if against else "cannot tell from means"
        return {**row, "verdict": verdict, "p_value": np.nan, "min_p": np.nan,
                "why": f"means only, no test: effect {effect:+.3f} against a margin of {margin}"}
    if len(d) < 2:
        return {**row, "verdict": UNTESTABLE, "p_value": np.nan, "min_p": np.nan,
                "why": f"{len(d)} fold: a fold-paired test needs at least 2"}
    if kind == "greater":
        p, smallest = _sign_flip_p(d)
    else:  # TOST: both one-sided tests must reject
        p_low, smallest = _sign_flip_p(d + margin)
        p_high, _ = _sign_flip_p(margin - d)
        p = max(p_low, p_high)
    verdict = HOLDS if p <= alpha else CANNOT if smallest > alpha else FAILS
    why = (f"{len(d)} folds: the smallest p they allow is {smallest:.3g} > {alpha}"
           if verdict == CANNOT else f"one-sided sign-flip test over {len(d)} folds"
           + (f", equivalence within +-{margin}" if kind == "equivalent" else ""))
    return {**row, "p_value": p, "min_p": smallest, "verdict": verdict, "why": why}


def _settings(ctx: dict) -> dict:
    return {"alpha": ctx["alpha"], "margin": ctx["margin"], "means_only": ctx["means_only"]}


def _need(roles: dict[str, str], *needed: str) -> str | None:
    missing = [r for r in needed if r not in roles]
    return f"no source in the role(s) {missing}" if missing else None


# --- the claims --------------------------------------------------------------------------------

def _comparable_when_clean(table, roles, ctx) -> list[dict]:
    base = {"quantity": "clean AUC at p = 0", "confounder": "(none)",
            "roles": "in_domain vs imagenet"}
    if why := _need(roles, "imagenet", "in_domain"):
        return [{**base, "verdict": UNTESTABLE, "why": why}]
    a = _clean_at_zero(table, roles["in_domain"], ctx["metric"])
    b = _clean_at_zero(table, roles["imagenet"], ctx["metric"])
    return [{**base, "sources": f"{roles['in_domain']} vs {roles['imagenet']}",
             **_verdict(a, b, kind="equivalent", **_settings(ctx))}]


def _per_confounder(names: Sequence[str], quantity: str, first: str, second: str | None,
                    measure: Callable, kind: str = "greater"):
    """A claim checked per confounder of ``names`` present: ``measure(table, source,
    confounder, metric)`` per fold for the source in role ``first`` against the one in role
    ``second`` (``None``: against 0, a one-sample claim)."""

    compared = f"{first} vs {second}" if second else first

    def check(table, roles, ctx) -> list[dict]:
        present = [c for c in table["confounder"].unique() if c in names]
        if not present:
            return [{"quantity": quantity, "confounder": c, "roles": compared,
                     "verdict": UNTESTABLE, "why": f"no {c!r} runs in this table"}
                    for c in names if c not in ("denoising",)]
        rows = []
        for confounder in present:
            base = {"quantity": quantity, "confounder": confounder, "roles": compared}
            if why := _need(roles, first, *([second] if second else [])):
                rows.append({**base, "verdict": UNTESTABLE, "why": why})
                continue
            a = measure(table, roles[first], confounder, ctx["metric"])
            b = (measure(table, roles[second], confounder, ctx["metric"]) if second
                 else pd.Series(0.0, index=a.index))
            sources = f"{roles[first]} vs {roles[second]}" if second else roles[first]
            rows.append({**base, "sources": sources,
                         **_verdict(a, b, kind=kind, **_settings(ctx))})
        return rows

    return check


def _ood_mean(table, source, confounder, metric):
    return _curve(_rows(table, source, confounder, "ood"), metric)


def _iid_rise(table, source, confounder, metric):
    part = _rows(table, source, confounder, "iid")
    if part.empty:
        return pd.Series(dtype=float)
    top = _at(part, part["p"].max(), metric)
    return top - _at(part, 0.0, metric)


def _small_p_drop(table, source, confounder, metric):
    """Per fold: the o.o.d. AUC at p = 0 minus at the smallest p > 0 (0.1 in the paper)."""
    part = _rows(table, source, confounder, "ood")
    positive = sorted(p for p in part["p"].unique() if p > 0)
    if not positive:
        return pd.Series(dtype=float)
    return _at(part, 0.0, metric) - _at(part, positive[0], metric)


def _random_weakest_when_clean(table, roles, ctx) -> list[dict]:
    base = {"quantity": "clean AUC at p = 0", "confounder": "(none)"}
    rows = []
    for other in ("imagenet", "in_domain"):
        if why := _need(roles, other, "random"):
            rows.append({**base, "roles": f"{other} vs random", "verdict": UNTESTABLE,
                         "why": why})
            continue
        a = _clean_at_zero(table, roles[other], ctx["metric"])
        b = _clean_at_zero(table, roles["random"], ctx["metric"])
        rows.append({**base, "roles": f"{other} vs random",
                     "sources": f"{roles[other]} vs {roles['random']}",
                     **_verdict(a, b, kind="greater", **_settings(ctx))})
    return rows


def _below_chance_at_top(table, source, confounder, metric):
    """Per fold: 0.5 minus the o.o.d. AUC at the largest p (> 0: the shortcut was learnt)."""
    part = _rows(table, source, confounder, "ood")
    if part.empty:
        return pd.Series(dtype=float)
    return 0.5 - _at(part, part["p"].max(), metric)


CLAIMS = (
    Claim("1", "ImageNet and in-domain (RadImageNet) sources perform comparably without a "
               "confounder", _comparable_when_clean),
    Claim("2", "ImageNet is more prone to shortcuts: its o.o.d. AUC falls further as p grows",
          _per_confounder(SHORTCUTS, "mean o.o.d. AUC over p", "in_domain", "imagenet",
                          _ood_mean)),
    Claim("3", "Shortcuts inflate i.i.d. AUC more for ImageNet than for the in-domain source",
          _per_confounder(SHORTCUTS, "i.i.d. AUC rise from p = 0 to the largest p", "imagenet",
                          "in_domain", _iid_rise)),
    Claim("4", "Exception: under X-ray noise both sources collapse alike",
          _per_confounder(NOISE, "mean o.o.d. AUC over p", "in_domain", "imagenet", _ood_mean,
                          kind="equivalent")),
    Claim("5a", "Random initialisation is weakest without a confounder",
          _random_weakest_when_clean),
    Claim("5b", "Random initialisation is nearly immune to the tag and the low-pass filter",
          _per_confounder(("tag", "lowpass", "denoising"), "mean o.o.d. AUC over p", "random",
                          "imagenet", _ood_mean)),
    Claim("5c", "Random initialisation learns the sex shortcut",
          _per_confounder(("sex",), "0.5 minus the o.o.d. AUC at the largest p", "random", None,
                          _below_chance_at_top)),
    Claim("6", "Small contamination suffices: ImageNet's o.o.d. AUC falls already at the "
               "smallest p > 0",
          _per_confounder(SHORTCUTS, "o.o.d. AUC drop from p = 0 to the smallest p > 0",
                          "imagenet", None, _small_p_drop)),
)


def check_claims(table: pd.DataFrame, roles: dict[str, str] | None = None, *,
                 metric: str = "auc", alpha: float = ALPHA, margin: float = MARGIN,
                 claims: Sequence[Claim] = CLAIMS, means_only: bool = False) -> pd.DataFrame:
    """Every claim's verdict rows on a results table (one row per dataset, architecture and
    confounder a claim concerns): :data:`CLAIM_COLUMNS`. ``means_only``: the table holds one
    mean per condition (:func:`paper_claims`), judged on direction and size."""
    if metric not in table.columns:
        raise AnalysisError(f"the table has no {metric!r} column (columns: {list(table.columns)})")
    rows = []
    for (dataset, arch), part in table.groupby(["dataset", "arch"], sort=True, dropna=False):
        found = claim_roles(part, roles)
        ctx = {"metric": metric, "alpha": alpha, "margin": margin, "means_only": means_only}
        for claim in claims:
            for row in claim.check(part, found, ctx):
                rows.append({"claim": claim.id, "statement": claim.statement, "dataset": dataset,
                             "arch": arch, **row})
    out = pd.DataFrame(rows, columns=CLAIM_COLUMNS)
    out["n_folds"] = out["n_folds"].astype("Int64")
    return out


PAPER_ROLES = {"imagenet": "ImageNet", "in_domain": "RadImageNet", "random": "random"}


def paper_claims(reference: pd.DataFrame | None = None, **kwargs) -> pd.DataFrame:
    """:func:`check_claims` on the paper's own reported means (``data/reference/``): one value
    per (dataset, confounder, test set, p, source), so the verdicts are on direction and size."""
    from .reference import load_reference

    reference = load_reference() if reference is None else reference
    table = reference.rename(columns={"mean_auc": "auc"}).assign(fold=0, arch="ResNet50")
    out = check_claims(table, PAPER_ROLES, means_only=True, **kwargs)
    absent = (out["verdict"] == UNTESTABLE) & out["why"].str.endswith("runs in this table")
    return out[~absent].reset_index(drop=True)  # a confounder the paper ran on the other dataset


def claims_against_paper(ours: pd.DataFrame, paper: pd.DataFrame | None = None,
                         datasets: dict[str, str] | None = None) -> pd.DataFrame:
    """``ours`` (:func:`check_claims`) with the paper's verdict and effect on its own reported
    means beside each row (:func:`paper_claims`: same claim, roles and confounder, in the
    paper's dataset ``datasets[ours]``, by default NIH ChestX-ray14), and the difference."""
    from .reference import REFERENCE_CONFOUNDERS

    paper = paper_claims() if paper is None else paper
    datasets = datasets or {}
    theirs = paper[["dataset", "claim", "roles", "confounder", "effect", "verdict"]].rename(
        columns={"dataset": "paper_dataset", "effect": "paper_effect", "verdict": "paper_verdict",
                 "confounder": "paper_confounder"})
    out = ours.assign(
        paper_dataset=ours["dataset"].map(lambda d: datasets.get(d, "nih_cxr14")),
        paper_confounder=ours["confounder"].map(lambda c: REFERENCE_CONFOUNDERS.get(c, c)))
    out = out.merge(theirs, on=["paper_dataset", "claim", "roles", "paper_confounder"],
                    how="left")
    out["effect_minus_paper"] = out["effect"] - out["paper_effect"]
    return out.drop(columns=["paper_confounder"])


def _cell(value, digits: int = 3) -> str:
    if value is None or (not isinstance(value, str) and pd.isna(value)):  # NaN, pd.NA
        return ""
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def format_claims(table: pd.DataFrame, fmt: str = "text") -> str:
    """The claims table as plain text, Markdown (``md``), LaTeX (booktabs) or CSV."""
    columns = [c for c in ("claim", "dataset", "arch", "confounder", "sources", "effect",
                           "ci_low", "ci_high", "p_value", "min_p", "n_folds", "verdict",
                           "paper_verdict", "paper_effect") if c in table.columns]
    shown = table[columns]
    if fmt == "csv":
        return table.to_csv(index=False)
    if fmt == "text":
        with pd.option_context("display.width", 250, "display.max_columns", 30,
                               "display.max_colwidth", 40):
            return shown.to_string(index=False, float_format=lambda v: f"{v:.3f}")
    if fmt == "md":
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(_cell(v) for v in row) + " |"
                  for row in shown.itertuples(index=False)]
        return "\n".join(lines) + "\n"
    if fmt == "latex":
        return shown.to_latex(index=False, float_format="%.3f", na_rep="", escape=True)
    raise AnalysisError(f"format must be one of text, md, latex, csv; got {fmt!r}")


CLAIMS_INTRO = """# The paper's claims on this grid

Each claim of Juodelyte et al. (2024) as a pre-registered check (`sm_utils.analysis.claims`):
a one-sided fold-paired sign-flip permutation test of the mean difference between the sources
in the claim's roles (equivalence within +-{margin} AUC for claims 1 and 4), alpha {alpha}.
*holds*: the test rejects in the claimed direction; *does not hold*: it could have and did
not; *cannot tell with these folds*: even the most extreme result could not reach alpha with
this many folds (3 folds: 1/8). `paper_verdict`: the same check on the paper's reported means
(no folds, so on direction and size against the margin).

"""


def claims_markdown(table: pd.DataFrame, alpha: float = ALPHA, margin: float = MARGIN) -> str:
    """claims.md: what the verdicts mean, then the table (with the statements)."""
    statements = "".join(f"- **{c.id}**: {c.statement}\n" for c in CLAIMS)
    return (CLAIMS_INTRO.format(alpha=alpha, margin=margin) + statements + "\n"
            + format_claims(table, "md"))
