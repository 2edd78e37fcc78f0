"""Tables of the paper kit (``sm report``) as a manuscript takes them: LaTeX through booktabs and
siunitx (``S`` columns: decimals aligned, a real minus sign), human column names, long text
wrapped instead of the whole table shrunk; and the same tables in Markdown.

Column names come from :data:`HUMAN_NAMES`; a column it does not know keeps its name with the
underscores read as spaces, so a table that gains columns still renders.
"""

from __future__ import annotations

import itertools
import re
from typing import Any

import numpy as np
import pandas as pd

# Known columns of the kit's tables -> what a reader calls them. Unknown ones: underscores
# become spaces (human_name).
HUMAN_NAMES = {
    "claim": "claim", "statement": "statement", "dataset": "dataset", "arch": "architecture",
    "confounder": "confounder", "quantity": "quantity", "measure": "measure", "roles": "roles",
    "sources": "sources", "effect": "effect", "ci": "interval", "interval": "interval",
    "p_value": "p", "min_p": "smallest p", "n_folds": "folds", "verdict": "verdict",
    "why": "why", "paper_verdict": "paper's verdict", "paper_effect": "paper's effect",
    "paper_dataset": "paper's dataset", "effect_minus_paper": "effect minus paper's",
    "p": "prevalence p", "metric": "metric", "test_set": "test set",
    "mean_imagenet": "mean ImageNet", "mean_radimagenet": "mean RadImageNet",
    "mean_difference": "difference", "p_paired": "p paired", "p_paired_holm": "p paired, Holm",
    "min_p_paired": "smallest p paired", "source_a": "source A", "source_b": "source B",
    "mean_a": "mean A", "mean_b": "mean B", "p_holm": "p, Holm",
}


def human_name(column: str) -> str:
    return HUMAN_NAMES.get(column, str(column).replace("_", " "))


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                  "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                  "^": r"\textasciicircum{}"}


def latex_escape(text: Any) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(text))


def number(value: Any, digits: int = 3) -> str:
    return "" if value is None or pd.isna(value) else f"{float(value):.{digits}f}"


def is_missing(value: Any) -> bool:
    return value is None or (not isinstance(value, str) and bool(pd.isna(value)))


def _is_count(column: str, values: pd.Series) -> bool:
    """Counts (n_folds, n, ...) print as integers; other numbers to a fixed number of digits."""
    finite = pd.to_numeric(values, errors="coerce").dropna()
    return ((pd.api.types.is_integer_dtype(values) or str(column).startswith("n_")
             or column == "n") and bool((finite == finite.round()).all()))


def cell(column: str, value: Any, digits: int, text, count: bool = False) -> str:
    """One table cell: prevalence p as given, counts as integers, other floats to ``digits``,
    missing values empty, the rest through ``text`` (LaTeX escaping or ``str``)."""
    if is_missing(value):
        return ""
    if column == "p":
        return f"{float(value):g}"
    if count:
        return str(int(value))
    if isinstance(value, float | np.floating) and np.isinf(value):
        # an unbounded interval end (a claim's one-sided bound, or folds that cannot bound it)
        sign = "-" if value < 0 else ""
        return "{$" + sign + r"\infty$}" if text is latex_escape else f"{sign}inf"
    if isinstance(value, float | np.floating | int | np.integer) and not isinstance(value, bool):
        return number(value, digits)
    return text(value)


def siunitx_format(cells: list[str]) -> str:
    """The ``table-format`` that holds every cell: sign, integer digits, decimals (``-1.3``)."""
    sign, whole, decimals = False, 1, 0
    for text in cells:
        if not text or text.startswith("{"):  # braced: text, e.g. an infinite bound
            continue
        sign |= text.startswith("-")
        integer, _, fraction = text.lstrip("-").partition(".")
        whole, decimals = max(whole, len(integer)), max(decimals, len(fraction))
    return ("-" if sign else "") + f"{whole}" + (f".{decimals}" if decimals else "")


def latex_head(name: str, width: int = 11) -> str:
    """A header, in two lines when long, braced (so siunitx reads it as text)."""
    words = latex_escape(name).split(" ")
    if len(name) <= width or len(words) == 1:
        return "{" + " ".join(words) + "}"
    best = min(range(1, len(words)), key=lambda i: abs(len(" ".join(words[:i])) - len(name) / 2))
    return (r"{\begin{tabular}[b]{@{}c@{}}" + " ".join(words[:best]) + r"\\"
            + " ".join(words[best:]) + r"\end{tabular}}")


def _text_spec(cells: list[str], width: float | None = None) -> str:
    """``l`` for short text; a ragged-right paragraph column for long text (wrapped, so the
    table keeps to the text width without being shrunk), ``width`` em or about 8."""
    longest = max((len(c) for c in cells), default=0)
    if longest <= 18:
        return "l"
    word = max((len(w) for c in cells for w in c.split()), default=0)
    width = width or max(0.55 * word, min(0.5 * longest, 8.0))
    return rf">{{\raggedright\arraybackslash}}p{{{width:.1f}em}}"


def footnote_marks(count: int) -> list[str]:
    return [chr(ord("a") + i) for i in range(count)]


def frame_latex(frame: pd.DataFrame, caption: str, label: str, digits: int = 3,
                notes: dict[str, str] | None = None, marks: pd.Series | None = None,
                marked: str | None = None, table_env: str = "table*",
                widths: dict[str, float] | None = None) -> str:
    """Any small table as a booktabs table: numbers in siunitx ``S`` columns, human names,
    intervals (``X_low``/``X_high`` pairs) under one header, long text wrapped. ``caption`` is
    plain text (escaped here). ``marks``: a footnote mark per row, put on column ``marked``,
    explained by ``notes`` (mark -> text) under the table; ``widths``: em of text columns."""
    columns = list(frame.columns)
    counts = {c: _is_count(c, frame[c]) for c in columns}
    numeric = {c: pd.api.types.is_numeric_dtype(frame[c]) and not pd.api.types.is_bool_dtype(
        frame[c]) for c in columns}
    rows = [[cell(c, v, digits, latex_escape, counts[c]) for c, v in zip(columns, row)]
            for row in frame.itertuples(index=False)]
    by_column = {c: [r[i] for r in rows] for i, c in enumerate(columns)}
    spec = "".join(rf"S[table-format={siunitx_format(by_column[c])}]" if numeric[c]
                   else _text_spec(by_column[c], (widths or {}).get(c)) for c in columns)
    top, rules, head = [], [], []
    pairs = _interval_pairs(columns)
    for i, column in enumerate(columns):
        if column in pairs:
            top.append(rf"\multicolumn{{2}}{{c}}{{{latex_escape(human_name(pairs[column]))}}}")
            rules.append(rf"\cmidrule(lr){{{i + 1}-{i + 2}}}")
            head.append("{low}")
        elif column.endswith("_high") and columns[i - 1] in pairs:
            head.append("{high}")
        else:
            top.append("")
            head.append(latex_head(human_name(column)))
    if marks is not None and marked in columns:
        at = columns.index(marked)
        for row, mark in zip(rows, marks):
            if mark:
                row[at] += rf"\textsuperscript{{{mark}}}"
    body = [" & ".join(top) + r" \\" + "".join(rules)] if pairs else []
    body += [" & ".join(head) + r" \\", r"\midrule"]
    body += [" & ".join(r) + r" \\" for r in rows]
    lines = [rf"\begin{{{table_env}}}", r"\centering", r"\footnotesize",
             r"\setlength{\tabcolsep}{4pt}",  # narrower than 6pt: a dozen columns fit
             rf"\caption{{{latex_escape(caption)}}}", rf"\label{{{label}}}",
             rf"\begin{{tabular}}{{{spec}}}", r"\toprule", *body, r"\bottomrule",
             r"\end{tabular}"]
    if notes:
        lines.append(latex_notes(notes))
    lines += [rf"\end{{{table_env}}}", ""]
    return "\n".join(lines)


def latex_notes(notes: dict[str, str]) -> str:
    """Footnotes under a table: ``mark``: text, one a line."""
    items = r"\\".join(rf"\textsuperscript{{{m}}}\,{latex_escape(t)}" for m, t in notes.items())
    return (r"\par\smallskip\parbox{\linewidth}{\raggedright\footnotesize " + items + "}")


def _interval_pairs(columns: list[str]) -> dict[str, str]:
    """``X_low`` followed by ``X_high`` -> ``X`` (rendered as one interval)."""
    out = {}
    for first, second in itertools.pairwise(columns):
        if first.endswith("_low") and second == first[:-4] + "_high":
            out[first] = first[:-4]
    return out


def frame_markdown(frame: pd.DataFrame, digits: int = 3, marks: pd.Series | None = None,
                   marked: str | None = None, notes: dict[str, str] | None = None) -> str:
    """The table in Markdown with human names; an ``X_low``/``X_high`` pair as one
    ``[low, high]`` column."""
    columns = list(frame.columns)
    pairs = _interval_pairs(columns)
    counts = {c: _is_count(c, frame[c]) for c in columns}
    shown = [c for c in columns if not (c.endswith("_high") and c[:-5] + "_low" in pairs)]
    lines = ["| " + " | ".join(human_name(pairs.get(c, c)) for c in shown) + " |",
             "|" + "---|" * len(shown)]
    for i, row in enumerate(frame.to_dict("records")):
        cells = []
        for column in shown:
            if column in pairs:
                low, high = row[column], row[pairs[column] + "_high"]
                cells.append("" if is_missing(low) else
                             f"[{number(low, digits)}, {number(high, digits)}]")
            else:
                cells.append(cell(column, row[column], digits, str, counts[column]))
            if marks is not None and column == marked and marks.iloc[i]:
                cells[-1] += f" ({marks.iloc[i]})"
        lines.append("| " + " | ".join(cells) + " |")
    if notes:
        lines += [""] + [f"({m}) {t}  " for m, t in notes.items()]
    return "\n".join(lines) + "\n"


def label(prefix: str, key) -> str:
    """A LaTeX label naming a block: ``tab:auc:phantom_cxr:tag:1:tf_efficientnet_lite0:812``."""
    return f"{prefix}:" + ":".join(re.sub(r"[^A-Za-z0-9_.-]", "-", f"{k:g}" if isinstance(k, float)
                                          else str(k)) for k in key)
