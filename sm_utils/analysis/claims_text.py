"""The claims' verdicts in words and tables: how a claim's rows combine, the text, Markdown,
LaTeX and CSV tables, and claims.md's opening (what the verdicts mean)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from .results import AnalysisError
from .signflip import ALPHA, CANNOT, HOLDS, MARGIN, READING_ERROR, UNTESTABLE


def summarise_claims(table: pd.DataFrame, alpha: float = ALPHA) -> pd.DataFrame:
    """Per claim, dataset, architecture and measure: how its rows combine. The claim holds as a
    whole where every row holds (intersection-union: each row at alpha, the whole at alpha);
    otherwise how many of its rows hold, and how many after Holm over the rows."""
    out = []
    keys = ["claim", "dataset", "arch", "measure"]
    for key, rows in table.groupby(keys, sort=False, dropna=False):
        tested = rows[rows["verdict"] != UNTESTABLE]
        holds = int((tested["verdict"] == HOLDS).sum())
        holm = int((tested["p_holm"] <= alpha).sum()) if "p_holm" in tested else 0
        if tested.empty:
            whole = UNTESTABLE
        elif holds == len(tested):
            whole = HOLDS
        elif (tested["verdict"] == CANNOT).all():
            whole = CANNOT
        else:
            whole = f"holds for {holds} of {len(tested)}"
        out.append({**dict(zip(keys, key)), "rows": len(tested), "rows_holding": holds,
                    "rows_holding_holm": holm, "alpha_per_row": alpha, "whole": whole,
                    "confounders": ", ".join(dict.fromkeys(tested["confounder"]))})
    return pd.DataFrame(out)


def summary_text(table: pd.DataFrame, alpha: float = ALPHA) -> str:
    """One line per claim and measure: how its rows combine (:func:`summarise_claims`)."""
    if table.empty or "measure" not in table:
        return ""
    lines = [(f"Per claim (alpha {alpha} per row; a claim over several confounders holds as a "
              "whole only where every row holds; Holm over its rows beside it):")]
    for row in summarise_claims(table, alpha).itertuples(index=False):
        if row.rows == 0:
            continue
        where = "" if len(set(table["dataset"])) < 2 else f" on {row.dataset}"
        lines.append(f"  claim {row.claim}, {row.measure}{where}: {row.whole} "
                     f"({row.rows_holding} of {row.rows} rows hold, {row.rows_holding_holm} "
                     f"after Holm; {row.confounders})")
    return "\n".join(lines) + "\n"


def definitions_commit() -> str | None:
    """The commit that last changed this module (the claims' definitions), short, with
    "+changes" when the checkout has uncommitted ones to it; None outside git."""
    import subprocess
    from pathlib import Path

    here = Path(__file__).resolve().with_name("claims.py")
    try:
        last = subprocess.run(["git", "log", "-1", "--format=%h", "--", here.name], check=False,
                              cwd=here.parent, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", here.name], check=False,
                               cwd=here.parent, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if last.returncode != 0 or not last.stdout.strip():
        return None
    return last.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def _cell(value, digits: int = 3) -> str:
    if value is None or (not isinstance(value, str) and pd.isna(value)):  # NaN, pd.NA
        return ""
    if isinstance(value, float) and np.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


SHOWN = ("claim", "dataset", "arch", "confounder", "measure", "sources", "effect", "ci_low",
         "ci_high", "p_value", "min_p", "n_folds", "verdict", "paper_verdict", "paper_effect")


def format_claims(table: pd.DataFrame, fmt: str = "text") -> str:
    """The claims table as plain text, Markdown (``md``), LaTeX (booktabs) or CSV."""
    columns = [c for c in SHOWN if c in table.columns]
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


def claims_intro(alpha: float = ALPHA, margin: float = MARGIN, commit: str | None = None) -> str:
    """What the verdicts mean, in words (claims.md's opening)."""
    where = f" at commit {commit}" if commit else ""
    return f"""# The paper's claims on this grid

Each claim of Juodelyte et al. (2024), as this compendium reads it, checked by a test
pre-specified{where} (`sm_utils.analysis.claims`) on fold-paired differences between the
sources in the claim's roles: a one-sided sign-flip permutation test (equivalence within
+-{margin} AUC by two of them, TOST), alpha {alpha} per row, no correction across rows (Holm
over a claim's rows of one measure in `p_holm`; a claim over several confounders holds as a
whole only where every row holds). Robustness claims are measured as each source's **fall**
from its own p = 0 AUC and, as the paper tested them, by **level** (o.o.d. AUC over p and at
each p); `note` says where the two disagree. Every fold is scored on the same test set: a
verdict is about these test patients (conditional on the test set), not a new sample of them.

*holds*: the test rejects in the claimed direction; *the opposite holds*: the opposite test
rejects; *not shown*: no rejection (which refutes nothing); *cannot tell with these folds*:
even the most extreme signs could not reach alpha (the smallest p, from the non-zero fold
differences, is above it: 3 folds give 1/8); *not testable here*: something is missing.
The interval (`ci_low`, `ci_high`) inverts the same test: a one-sided {1 - alpha:.0%} bound,
or the {1 - 2 * alpha:.0%} interval of an equivalence. `paper_verdict`: the same check on the
paper's reported means (no folds: direction and size, read to +-{READING_ERROR}).

"""
