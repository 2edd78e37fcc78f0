"""The paper kit's tables (``sm report``) rendered: the AUC table a row per test set, p and
source with its two labelled intervals and footnotes saying why a cell has none; the claims
table split for a journal's width (statements, verdicts, the checks on the paper's means);
``tables.tex``. Generic pieces (siunitx columns, human names) are in :mod:`.render`."""

from __future__ import annotations

import pandas as pd

from .render import (
    footnote_marks,
    frame_latex,
    frame_markdown,
    human_name,
    is_missing,
    label,
    latex_escape,
    latex_head,
    latex_notes,
    number,
)

BLOCK = ["dataset", "confounder", "strength", "arch", "seed"]   # one table per block
TEST_SET_NAMES = {"ood": "o.o.d.", "iid": "i.i.d.", "clean": "clean"}
# the two intervals of the AUC table: what each covers, in its header and its caption
PATIENTS = "test patients resampled, models fixed"
BOTH = "trainings and test patients"


def interval_caption(n_boot: int, level: float) -> str:
    """What the two intervals of the AUC table cover (plain text)."""
    pct = f"{100 * level:g} %"
    return (f"Mean and SD over folds (trainings). Two {pct} intervals of the fold mean: "
            f"'{PATIENTS}': percentile bootstrap of the test set's patients ({n_boot} draws, the "
            "same draws for every fold; all images of a patient together): the test set's "
            "sampling error alone, often narrower than the spread between trainings; "
            f"'{BOTH}': a t interval whose variance adds the fold variance of the mean "
            "(SD^2/folds) and the bootstrap variance of the fold mean (Welch-Satterthwaite "
            "degrees of freedom), clipped to [0, 1]: the spread of another grid run with new "
            "trainings and a new test set of this size.")



def _block_title(key: tuple, several: dict[str, bool]) -> str:
    dataset, confounder, strength, arch, seed = key
    words = [str(dataset), str(confounder)]
    if several["strength"]:
        words[-1] += f" (strength {strength:g})"
    if several["arch"]:
        words.append(str(arch))
    if several["seed"]:
        words.append(f"seed {seed}")
    return ", ".join(words)


def _blocks(table: pd.DataFrame):
    several = {c: table[c].nunique(dropna=False) > 1 for c in ("strength", "arch", "seed")}
    for key, block in table.groupby(BLOCK, sort=False, dropna=False):
        yield key, _block_title(key, several), block


def _n(row) -> str:
    return f"{row['n_images']} ({row['n_patients']})" if row["n_patients"] else str(
        row["n_images"])


class _Notes:
    """Footnotes of one table: each distinct text gets the next mark (a, b, ...)."""

    def __init__(self):
        self.marks: dict[str, str] = {}

    def mark(self, text: str) -> str:
        if text not in self.marks:
            self.marks[text] = footnote_marks(len(self.marks) + 1)[-1]
        return self.marks[text]

    def by_mark(self) -> dict[str, str]:
        return {m: t for t, m in self.marks.items()}


def _interval_shown(row, which: str) -> bool:
    return (not is_missing(row[f"{which}_low"]) and not row[f"{which}_note"])


def auc_markdown(table: pd.DataFrame, what: str, with_interval: bool = True,
                 caption: str | None = None) -> str:
    """One Markdown table per block: a row per test set, p and source."""
    intro = caption or "Mean ± SD over folds."
    out = [intro + " n: test images (patients).", ""]
    for _key, title, block in _blocks(table):
        notes = _Notes()
        head = ["test set", "n (patients)", "p", "source", "mean ± SD"]
        if with_interval:
            head += [f"95 % interval: {PATIENTS}", f"95 % interval: {BOTH}"]
        out += [f"### {what}: {title}", "", "| " + " | ".join(head) + " |",
                "|" + "---|" * len(head)]
        for _, row in block.iterrows():
            mean = number(row["mean"])
            cells = [TEST_SET_NAMES.get(row["test_set"], row["test_set"]), _n(row),
                     f"{row['p']:g}", str(row["source"]),
                     mean if is_missing(row["sd"]) else f"{mean} ± {number(row['sd'])}"]
            if with_interval:
                for which in ("patients", "both"):
                    if _interval_shown(row, which):
                        cells.append(f"[{number(row[f'{which}_low'])}, "
                                     f"{number(row[f'{which}_high'])}]")
                    else:
                        cells.append(f"— ({notes.mark(row[f'{which}_note'])})"
                                     if row[f"{which}_note"] else "")
            out.append("| " + " | ".join(cells) + " |")
        out += [""] + [f"({m}) {t}  " for m, t in notes.by_mark().items()]
        out.append("")
    return "\n".join(out)


def auc_latex(table: pd.DataFrame, what: str, caption: str, prefix: str,
              with_interval: bool = True) -> str:
    """One booktabs table* per block, labelled ``prefix:<block>``, a row per test set, p and
    source; numbers in siunitx columns; ``caption`` is plain text. A cell without an interval
    (or with a collapsed one) says why in a footnote under the table."""
    out = []
    for key, title, block in _blocks(table):
        notes = _Notes()
        spec = "lrS[table-format=1.2]lS[table-format=1.3]S[table-format=1.3]"
        head = ["{Test set}", latex_head("n (patients)", 8), "{$p$}", "{Source}", "{Mean}",
                "{SD}"]
        top = [""] * 6
        rules = ""
        if with_interval:
            spec += "S[table-format=1.3]" * 4
            top += [rf"\multicolumn{{2}}{{>{{\centering\arraybackslash}}p{{8em}}}}"
                    rf"{{95\,\% interval: {latex_escape(name)}}}" for name in (PATIENTS, BOTH)]
            rules = r"\cmidrule(lr){7-8}\cmidrule(lr){9-10}"
            head += ["{low}", "{high}"] * 2
        lines = [r"\begin{table*}", r"\centering", r"\footnotesize",
                 rf"\caption{{{latex_escape(f'{what}: {title}. {caption}')}}}",
                 rf"\label{{{label(prefix, key)}}}",
                 rf"\begin{{tabular}}{{{spec}}}", r"\toprule"]
        if with_interval:
            lines.append(" & ".join(top) + r" \\" + rules)
        lines += [" & ".join(head) + r" \\", r"\midrule"]
        previous = (None, None)
        for _, row in block.iterrows():
            test_set, p = row["test_set"], row["p"]
            if previous[0] is not None and test_set != previous[0]:
                lines.append(r"\addlinespace")
            first_set, first_p = test_set != previous[0], (test_set, p) != previous
            previous = (test_set, p)
            cells = [latex_escape(TEST_SET_NAMES.get(test_set, test_set)) if first_set else "",
                     latex_escape(_n(row)) if first_set else "",
                     f"{p:g}" if first_p else "", latex_escape(row["source"]),
                     number(row["mean"]), number(row["sd"])]
            if with_interval:
                for which in ("patients", "both"):
                    if _interval_shown(row, which):
                        cells += [number(row[f"{which}_low"]), number(row[f"{which}_high"])]
                    elif row[f"{which}_note"]:
                        mark = notes.mark(row[f"{which}_note"])
                        cells.append(rf"\multicolumn{{2}}{{c}}{{---\textsuperscript{{{mark}}}}}")
                    else:
                        cells += ["", ""]
            lines.append(" & ".join(cells) + r" \\")
        lines += [r"\bottomrule", r"\end{tabular}"]
        if notes.marks:
            lines.append(latex_notes(notes.by_mark()))
        lines += [r"\end{table*}", ""]
        out.append("\n".join(lines))
    return "\n".join(out)


# the claims table: columns that describe a claim go into a table of statements (a row per
# claim), the verdict rows into another, the same checks on the paper's means (paper_*) into a
# third; the reasons for the verdicts become footnotes
CLAIM_DESCRIPTIONS = ("statement", "quantity", "roles", "interval")
CLAIM_KEYS = ("claim", "confounder", "measure", "sources")  # repeated in every verdict table
CLAIM_HIDDEN = ("effect_minus_paper",)                   # derivable; kept in claims.csv
CLAIM_REASONS = ("why", "note")   # footnotes: the verdict's reason, then where level and fall
                                  # disagree
MAX_COLUMNS = 9       # physical columns of one table at two-column journal width
DESCRIPTION_WIDTHS = {"statement": 21.0, "quantity": 13.0, "roles": 8.0,
                      "interval": 8.0}   # em, in the table of statements


def claims_tables(claims: pd.DataFrame) -> tuple[pd.DataFrame, list[tuple[pd.DataFrame, str]],
                                                 dict]:
    """(statements: a row per claim, its distinct descriptions joined; verdict tables with what
    each shows, at most :data:`MAX_COLUMNS` columns each; constants: columns with one value in
    every row, for the caption). Works on whatever columns the claims table has."""
    claims = claims.reset_index(drop=True)
    described = [c for c in CLAIM_DESCRIPTIONS if c in claims.columns]
    statements = pd.DataFrame()
    if "claim" in claims.columns and described:
        statements = (claims.groupby("claim", sort=False)[described]
                      .agg(lambda v: "; ".join(dict.fromkeys(str(x) for x in v
                                                             if not is_missing(x))))
                      .reset_index())
    rest = [c for c in claims.columns if c not in described and c not in CLAIM_HIDDEN
            and c not in CLAIM_REASONS]
    constants = {c: claims[c].iloc[0] for c in rest
                 if c not in CLAIM_KEYS and len(claims) > 1
                 and claims[c].nunique(dropna=False) == 1 and not is_missing(claims[c].iloc[0])}
    rest = [c for c in rest if c not in constants]
    keys = [c for c in CLAIM_KEYS if c in rest]
    ours = [c for c in rest if c not in keys and not c.startswith("paper_")]
    paper = [c for c in rest if c not in keys and c.startswith("paper_")]
    tables = [(claims[keys + chunk], "on this grid") for chunk in _chunks(ours, len(keys))]
    means = "on the paper's reported means (direction and size only)"
    tables += [(claims[keys + chunk], means) for chunk in _chunks(paper, len(keys))]
    return statements, tables, constants


def _chunks(columns: list[str], fixed: int) -> list[list[str]]:
    """``columns`` in runs of at most MAX_COLUMNS - ``fixed``, an interval's ends together."""
    chunks, chunk = [], []
    for column in columns:
        if column.endswith("_high") and chunk and chunk[-1] == column[:-5] + "_low":
            chunk.append(column)
            continue
        if fixed + len(chunk) >= MAX_COLUMNS:
            chunks.append(chunk)
            chunk = []
        chunk.append(column)
    return [c for c in [*chunks, chunk] if c]


def _reason_marks(claims: pd.DataFrame) -> tuple[pd.Series, dict[str, str]]:
    """A footnote mark per verdict row for its reason (``why``), and mark -> reason."""
    notes = _Notes()
    present = [c for c in CLAIM_REASONS if c in claims.columns]
    if not present:
        return pd.Series([""] * len(claims)), {}
    reasons = claims[present].apply(
        lambda row: "; ".join(str(v) for v in row if not is_missing(v) and str(v)), axis=1)
    marks = pd.Series([notes.mark(str(r)) if not is_missing(r) and str(r) else ""
                       for r in reasons])
    return marks, notes.by_mark()


def _constants_text(constants: dict) -> str:
    return "; ".join(f"{human_name(c)}: {v}" for c, v in constants.items())


def claims_latex(claims: pd.DataFrame, caption: str) -> str:
    """The claims at journal width: their statements, then their verdicts (on this grid, then
    on the paper's means); the reasons for the verdicts as footnotes, the columns that never
    change in the caption."""
    statements, verdicts, constants = claims_tables(claims)
    marks, notes = _reason_marks(claims.reset_index(drop=True))
    out = []
    if not statements.empty:
        out.append(frame_latex(statements, "The paper's claims and what tests them.",
                               "tab:claims:statements", widths=DESCRIPTION_WIDTHS))
    fixed = _constants_text(constants)
    for i, (frame, what) in enumerate(verdicts):
        marked = "verdict" if "verdict" in frame.columns else None
        out.append(frame_latex(
            frame, f"{caption} Verdicts {what}." + (f" {fixed}." if fixed else ""),
            "tab:claims" + (f":{i + 1}" if i else ""),
            marks=marks if marked else None, marked=marked, notes=notes if marked else None))
    return "\n".join(out)


def claims_markdown(claims: pd.DataFrame, caption: str) -> str:
    statements, verdicts, constants = claims_tables(claims)
    marks, notes = _reason_marks(claims.reset_index(drop=True))
    out = ["## The paper's claims", "", caption, ""]
    if not statements.empty:
        out += [frame_markdown(statements)]
    fixed = _constants_text(constants)
    if fixed:
        out += [fixed + ".", ""]
    for frame, what in verdicts:
        marked = "verdict" if "verdict" in frame.columns else None
        out += [f"### Verdicts {what}", "",
                frame_markdown(frame, marks=marks if marked else None, marked=marked,
                               notes=notes if marked else None)]
    return "\n".join(out)


DOCUMENT = r"""\documentclass[10pt]{article}
%% Every table of the report (sm report), to compile and look at: pdflatex tables.tex.
%% In a manuscript: \usepackage{booktabs,siunitx,array,graphicx} and \input{auc.tex} etc.
\usepackage[T1]{fontenc}
\usepackage[utf8]{inputenc}
\usepackage[margin=2cm]{geometry}
\usepackage{booktabs}
\usepackage{siunitx}
\usepackage{array}
\usepackage{graphicx}
\begin{document}
%s
\end{document}
"""
