"""What a notebook's results mean, in words computed from the results themselves.

Each function takes what a notebook computed and returns a short Markdown paragraph ("What
this shows") that states the comparison, its size against the spread it has, and where it
departs from the paper, so that the words stay true when a reader reruns the notebook with
other parameters or data. A run that did not learn says so, and what to change, instead of
reading meaning into noise.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

# Clean AUC whose 95 % interval reaches down to this is "at chance" for the purpose of reading a
# run: it has not learnt the task well enough for its i.i.d./o.o.d. gap to mean anything.
CHANCE = 0.5
NAMES = {"clean": "clean", "iid": "i.i.d.", "ood": "o.o.d."}


def _auc(entry: Mapping) -> str:
    return f"{entry['auc']:.2f} [{entry['auc_ci_low']:.2f}, {entry['auc_ci_high']:.2f}]"


def at_chance(entry: Mapping) -> bool:
    """Whether a test set's AUC is indistinguishable from chance by its own 95 % interval."""
    return bool(entry["auc_ci_low"] <= CHANCE or np.isnan(entry["auc"]))


def run_conclusion(metrics: Mapping, confounder: str, p: float, source: str) -> str:
    """03: one fine-tuning run. Did it learn (clean AUC and its interval)? Does the shortcut
    show (i.i.d. above o.o.d. beyond both intervals)? ``metrics``: the run's metrics.json."""
    sets = metrics["test_sets"]
    clean = sets.get("clean") or sets["iid"]
    if at_chance(clean):
        return (f"**The run is at chance**: clean AUC {_auc(clean)} (95 % interval over the "
                f"test patients) includes 0.5, so its i.i.d. and o.o.d. AUCs say nothing about "
                f"shortcuts. Give it more to learn from before reading them: more epochs "
                f"(`epochs`), an easier dataset (notebook 01's `dataset_params: {{difficulty: "
                f"0.15}}`), a pretrained `source`, or another learning rate (`lr`).")
    lines = [(f"**The model learnt the task**: clean AUC {_auc(clean)} with {source} as the "
              f"source (best epoch {metrics['best_epoch']} of {metrics['epochs_run']}).")]
    if confounder in ("none", None) or "ood" not in sets:
        return " ".join(lines)
    iid, ood = sets["iid"], sets["ood"]
    gap = iid["auc"] - ood["auc"]
    separated = ood["auc_ci_high"] < iid["auc_ci_low"]
    if p == 0:
        lines.append(f"Without the confounder in training (p = 0), the o.o.d. set (the "
                     f"confounder on every negative) gives {_auc(ood)}: "
                     + ("lower than i.i.d. beyond both intervals, so the confounder itself "
                        "changes what the model sees." if separated else
                        "within the i.i.d. interval, as it should be with nothing to learn."))
        return " ".join(lines)
    if separated:
        lines.append(f"**The shortcut shows**: with the {confounder} on {p:.0%} of the positive "
                     f"training images, i.i.d. AUC {_auc(iid)} but o.o.d. AUC {_auc(ood)}, "
                     f"{gap:.2f} lower, beyond both intervals: the model relies on the "
                     f"{confounder}" + (", below chance: it predicts the confounder more than "
                                        "the finding." if ood["auc_ci_high"] < CHANCE else "."))
    else:
        lines.append(f"With the {confounder} on {p:.0%} of the positive training images, i.i.d. "
                     f"AUC {_auc(iid)} and o.o.d. AUC {_auc(ood)} overlap: no sign of the "
                     "shortcut beyond the test set's sampling error in this one run.")
    lines.append("One run is one fold and one seed; notebook 04 shows the spread over folds.")
    return " ".join(lines)


def _fall_by_source(table: pd.DataFrame, confounder: str) -> pd.DataFrame:
    """Per source: claim 2's fall (the o.o.d. AUC at p = 0 minus at p, averaged over p), mean
    and SD over folds."""
    from .analysis.claims import ood_fall  # the claims' own measure

    rows = []
    for source in dict.fromkeys(table["source"]):
        fall = ood_fall(table, source, confounder, "auc").dropna()
        if fall.empty:
            continue
        ps = table.loc[(table["source"] == source) & (table["confounder"] == confounder), "p"]
        rows.append({"source": source, "p": ps.max(), "fall": fall.mean(),
                     "sd": fall.std(ddof=1) if len(fall) > 1 else np.nan, "n": len(fall)})
    return pd.DataFrame(rows, columns=["source", "p", "fall", "sd", "n"])


def _clean_start(table: pd.DataFrame, source: str, confounder: str) -> float:
    """The source's clean-test AUC at p = 0 in this confounder's runs, mean over folds."""
    from .analysis.claims import clean_at_zero

    part = table[table["confounder"] == confounder]
    return float(clean_at_zero(part, source, None, "auc").mean())


def grid_conclusion(table: pd.DataFrame, claims: pd.DataFrame | None = None,
                    roles: dict[str, str] | None = None) -> str:
    """04: a grid. Per confounder, how far the ImageNet-like and the in-domain source's o.o.d.
    AUC falls from p = 0 to the largest p, which falls further (the paper: ImageNet) and whether
    the difference exceeds the spread over folds; random initialisation's fall beside its clean
    start; then how the paper's claims came out, with their sentences."""
    from .analysis.claims import claim_roles
    from .analysis.results import AnalysisError

    try:
        roles = claim_roles(table, roles)
    except AnalysisError:  # roles that cannot be told apart: the falls per source, unnamed
        roles = {}
    lines = []
    for confounder in sorted(set(table["confounder"]) - {"none"}):
        falls = _fall_by_source(table, confounder).set_index("source")
        named = {role: roles[role] for role in ("imagenet", "in_domain")
                 if roles.get(role) in falls.index}
        parts = []
        if len(named) == 2:
            a, b = falls.loc[named["imagenet"]], falls.loc[named["in_domain"]]
            spread = np.nanmax([a["sd"], b["sd"]])
            gap = a["fall"] - b["fall"]
            direction = ("ImageNet falls further, as in the paper" if gap > 0 else
                         "the in-domain source falls further, the paper's direction reversed")
            size = (f"more than twice the larger SD ({spread:.2f})"
                    if np.isfinite(spread) and abs(gap) > 2 * spread else
                    f"within twice the larger SD ({spread:.2f}), so the folds do not separate "
                    "the two")
            parts.append(f"averaged over p up to {a['p']:g}, the o.o.d. AUC of "
                         f"{named['imagenet']} (ImageNet) falls {a['fall']:.2f} ± {a['sd']:.2f} "
                         f"below its own at p = 0 and that of {named['in_domain']} (in-domain) "
                         f"{b['fall']:.2f} ± {b['sd']:.2f} (claim 2's fall, mean ± SD over "
                         f"{int(a['n'])} folds): {direction}; the gap, "
                         f"{abs(gap):.2f}, is {size}.")
        if roles.get("random") in falls.index:
            r = falls.loc[roles["random"]]
            start = _clean_start(table, roles["random"], confounder)
            parts.append(f"Random initialisation falls {r['fall']:.2f} ± {r['sd']:.2f} from a "
                         f"clean AUC of {start:.2f} at p = 0" + (": it learnt little, so it has little to "
                                                       "lose." if start < 0.7 else "."))
        if parts:
            lines.append(f"- **{confounder}**: " + " ".join(parts))
    if claims is not None and not claims.empty and "measure" in claims:
        from .analysis.claims import CLAIMS, HOLDS, summarise_claims

        whole = summarise_claims(claims)
        statements = {c.id: c.statement for c in CLAIMS}
        tested = whole[whole["rows"] > 0]
        shown = tested[tested["whole"] == HOLDS]
        lines.append(
            f"- **The paper's claims**: {len(shown)} of {len(tested)} claim measures testable "
            "here hold on every row" + (": " + "; ".join(
                f"{r.claim} ({r.measure}): {statements.get(r.claim, '')}"
                for r in shown.itertuples()) if len(shown) else "")
            + ". " + _claims_limit(tested))
    return "\n".join(lines) + "\n"


def _claims_limit(tested: pd.DataFrame) -> str:
    from .analysis.claims import CANNOT

    cannot = int((tested["whole"] == CANNOT).sum())
    if cannot == len(tested) and cannot:
        return ("Every one is *cannot tell with these folds*: with this many folds no sign "
                "pattern can reach alpha, so the grid shows the method, not an answer; 5 folds "
                "or more are needed (benchmarks/RESULTS.md gives the power).")
    return f"{cannot} of them cannot be told with these folds."


def mechanism_conclusion(stats: pd.DataFrame, attribution: pd.DataFrame | None = None,
                         confounder: str = "tag") -> str:
    """05: what the probes and the attribution say about the o.o.d. drop. ``stats``: per
    confounder, Spearman's rho between the sources' probe AUC and their o.o.d. drop
    (:func:`sm_utils.mechanisms.encodedness_vs_drop`: ``spearman_rho``, ``p_value``,
    ``min_p_value``, ``n_points``); ``attribution``: per source and p, the share of the
    activation map inside the confounder's mask over chance (``attribution_ratio``)."""
    lines = []
    for row in stats.itertuples():
        if np.isnan(row.spearman_rho):
            lines.append(f"- **{row.confounder}**: every source's probe reads it equally well "
                         "(probe AUC saturated), so encodedness cannot rank the sources' drops.")
            continue
        shown = row.p_value <= 0.05
        lines.append(
            f"- **{row.confounder}**: Spearman rho {row.spearman_rho:+.2f} between probe AUC and "
            f"o.o.d. drop over {row.n_points} sources, p = {row.p_value:.2g} (the smallest p "
            f"{row.n_points} sources allow: {row.min_p_value:.2g}): "
            + ("the more decodable the confounder before fine-tuning, the "
               + ("larger" if row.spearman_rho > 0 else "smaller") + " the drop." if shown else
               "no evidence that how decodable it is before fine-tuning predicts the drop."))
    if attribution is not None and "attribution_ratio" in attribution and len(attribution):
        top = attribution[attribution["p"] == attribution["p"].max()]
        zero = attribution[attribution["p"] == attribution["p"].min()].set_index("source")
        parts, looking = [], []
        for row in top.itertuples():
            before = zero["attribution_ratio"].get(row.source, np.nan)
            parts.append(f"{row.source} {row.attribution_ratio:.1f}x (p = 0: {before:.1f}x)")
            if row.attribution_ratio >= 2 and not before >= 2:
                looking.append(row.source)
        others = [r.source for r in top.itertuples() if r.source not in looking]
        lines.append(f"- **Where the models look** ({confounder}, o.o.d. images, share of the "
                     f"activation map inside its mask over chance at p = {top['p'].iloc[0]:g}): "
                     + ", ".join(parts) + ". "
                     + (f"{', '.join(looking)} {'looks' if len(looking) == 1 else 'look'} at "
                        f"the {confounder} once trained with it "
                        "(at least 2x chance, where they did not at p = 0)" if looking else
                        f"No model looks at the {confounder} at twice chance or more")
                     + (f"; {', '.join(others)} {'does' if len(others) == 1 else 'do'} not."
                        if looking and others else "."))
    return "\n".join(lines) + "\n"


def pretraining_conclusion(confusion: pd.DataFrame, accuracy: float) -> str:
    """00: what the source learnt. Classes named ``group/finding`` (e.g. ``ct_lung/malignant``):
    how often an image is put in its own group (modality and window) against how often its
    finding is right within the group, and the worst finding's recall."""
    groups = [name.split("/")[0] for name in confusion.index]
    values = confusion.to_numpy()
    total = values.sum()
    same_group = sum(values[i, j] for i in range(len(groups)) for j in range(len(groups))
                     if groups[i] == groups[j])
    recall = pd.Series(np.diag(values) / values.sum(axis=1), index=confusion.index)
    worst = recall.sort_values().head(2)
    correct = np.trace(values)
    line = (f"Validation accuracy {accuracy:.2f} on {len(groups)} classes. The source puts "
            f"{same_group / total:.0%} of the images in their own group (modality and window), "
            f"and {correct / max(same_group, 1):.0%} of those in the right finding; the weakest "
            "classes are "
            + ", ".join(f"{name} (recall {value:.0%})" for name, value in worst.items()) + ".")
    if worst.iloc[0] < 0.5:
        line += (" It is a radiology-domain source that has learnt modality and anatomy more "
                 "than pathology: a stand-in for RadImageNet's domain, not for its findings.")
    return line


def injection_conclusion(checks: pd.DataFrame, cues: pd.DataFrame | None = None,
                         input_size: int | None = None, resize: str | None = None) -> str:
    """02: did every confounder do what it claims (the measured checks), and what reaches the
    model of the paper's low-pass filter (``cues``: :func:`sm_utils.confounders.cues.paper_cues`)."""
    passed = int(checks["passed"].fillna(False).astype(bool).sum())
    failed = checks.loc[~checks["passed"].fillna(False).astype(bool), "confounder"]
    lines = [f"- **{passed} of {len(checks)} measured checks pass**"
             + (": every confounder does what it claims on its example image or selection."
                if failed.empty else f"; these do not: {', '.join(dict.fromkeys(failed))}.")]
    if cues is not None and "cutoff_at_input" in cues:
        low = cues.dropna(subset=["cutoff_at_input"])
        for row in low.itertuples():
            beyond = row.cutoff_at_input > 0.5
            lines.append(
                f"- **The paper's low-pass at a {input_size} px input ({resize})**: its cut-off "
                f"lands at {row.cutoff_at_input:.2f} cycles/px, "
                + ("beyond the input's Nyquist limit (0.5), so the filter removes nothing the "
                   "input could show directly; what reaches the model is the fine texture that "
                   f"the resize would otherwise fold into the input: {row.upper_band_kept:.0%} "
                   "of the input's upper-band energy is kept, a cue of texture, not of blur."
                   if beyond else
                   f"inside the input's band, so the model sees the blur itself "
                   f"({row.upper_band_kept:.0%} of the input's upper-band energy kept)."))
    return "\n".join(lines) + "\n"


def data_conclusion(table: pd.DataFrame, folds: list) -> str:
    """01: what the manifest holds: images, patients, classes, and how the folds split them
    (``table``: the manifest's rows with ``fold_<k>`` role columns)."""
    positive = float(table["label"].mean())
    roles = [table[f"fold_{k}"] for k in folds if f"fold_{k}" in table]
    test = {int((r == "test").sum()) for r in roles}
    shared = len(test) == 1 and len(roles) > 1 and all(
        (r == "test").equals(roles[0] == "test") for r in roles)
    line = (f"{len(table)} images of {table['patient_id'].nunique()} patients, "
            f"{positive:.0%} positive, in {len(roles)} fold(s); ")
    line += ("every fold tests on the same images" if shared else "the folds test on different "
             "images") + f" ({', '.join(map(str, sorted(test)))} test images)"
    if "sex" in table:
        share = table.groupby("label")["sex"].apply(lambda s: (s == "F").mean())
        line += (f"; female share {share.get(0, np.nan):.0%} among negatives and "
                 f"{share.get(1, np.nan):.0%} among positives before any confounder is applied")
    return line + ". No patient is in two of train, val and test (checked when loaded)."
