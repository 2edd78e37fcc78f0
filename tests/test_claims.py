"""The paper's claims as checks (sm_utils.analysis.claims): on the paper's own numbers (every
claim as the paper states it, CT included), the verdict rule and its interval on known fold
differences, calibrated on synthetic grids (sm_utils.analysis.calibration: no claim "holds"
more often than alpha when the sources do not differ), and through `sm claims`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from sm_utils.analysis.calibration import (
    PAPER_TAG_OOD,
    quantity,
    synthetic_aucs,
    verdict_rates,
)
from sm_utils.analysis.claims import (
    ALPHA,
    CANNOT,
    CLAIMS,
    HOLDS,
    MARGIN,
    NOT_SHOWN,
    OPPOSITE,
    UNTESTABLE,
    check_claims,
    fold_verdict,
    paper_claims,
    sign_flip_bounds,
    sign_flip_p,
    smallest_p,
    summarise_claims,
)
from sm_utils.analysis.results import AnalysisError
from sm_utils.cli import main

ROOT = Path(__file__).resolve().parents[1]

PS = [0.0, 0.1, 0.2, 0.5, 0.8, 1.0]


def synthetic_table(seed: int, curves: dict[str, list[float]], n_folds: int = 5,
                    noise: float = 0.03, confounder: str = "tag") -> pd.DataFrame:
    """A results table of o.o.d. AUCs (sm_utils.analysis.calibration's model, no test-set
    component): each source's curve over PS, a shared fold effect and independent noise."""
    aucs = synthetic_aucs(np.random.default_rng(seed), list(curves.values()), n_folds,
                          noise_sd=noise)
    rows = []
    for s, source in enumerate(curves):
        for fold, p in np.ndindex(n_folds, len(PS)):
            for test_set in ("ood", "clean") if PS[p] == 0 else ("ood",):
                rows.append({"dataset": "d", "arch": "a", "confounder": confounder,
                             "source": source, "fold": fold, "p": PS[p], "test_set": test_set,
                             "auc": float(aucs[s, fold, p])})
    return pd.DataFrame(rows)


def verdicts(table: pd.DataFrame, claim_id: str, measure: str | None = None) -> list[str]:
    claim = next(c for c in CLAIMS if c.id == claim_id)
    out = check_claims(table, claims=(claim,))
    return list(out["verdict"] if measure is None else out.loc[out["measure"] == measure,
                                                                   "verdict"])


PAPER_STATES = {  # (dataset, claim): the confounders the paper's means must show it for
    ("nih_cxr14", "1"): {"(none)"}, ("lidc_idri", "1"): {"(none)"},
    ("nih_cxr14", "2"): {"tag", "lowpass", "sex"},
    ("lidc_idri", "2"): {"ct_noise", "xray_noise_ct"},
    ("nih_cxr14", "3"): {"tag", "lowpass", "sex"},
    ("nih_cxr14", "4"): {"xray_noise"},
    ("nih_cxr14", "5a"): {"(none)"}, ("lidc_idri", "5a"): {"(none)"},
    ("nih_cxr14", "5b"): {"tag", "lowpass"},
    ("nih_cxr14", "5c"): {"sex", "xray_noise"}, ("lidc_idri", "5c"): {"ct_noise", "xray_noise_ct"},
    ("nih_cxr14", "6"): {"tag", "lowpass", "sex"}, ("lidc_idri", "6"): {"ct_noise", "xray_noise_ct"},
}


def test_on_the_papers_means_every_claim_holds_as_the_paper_states_it():
    """The first measure of every claim (the one its statement names) holds on the paper's
    own reported means, on both datasets, for every confounder the paper ran it on; claim 2
    holds there by level too, at every p."""
    table = paper_claims()
    assert table["why"].str.startswith("means only").all()  # no folds: direction and size
    primary = {c.id: c.measures[0].name for c in CLAIMS}
    shown = table[table["measure"] == table["claim"].map(primary)]
    found = shown.groupby(["dataset", "claim"])["confounder"].agg(set).to_dict()
    assert found == PAPER_STATES
    assert (shown["verdict"] == HOLDS).all(), shown.loc[shown["verdict"] != HOLDS,
                                                        ["claim", "confounder", "verdict"]]
    claim2 = table[table["claim"] == "2"]
    assert set(claim2["measure"]) == {"fall", "level", *(f"level at p = {p:g}" for p in PS[1:])}
    assert (claim2["verdict"] == HOLDS).all()
    # the numbers behind the verdicts: ImageNet's tag fall, 0.87 - 0.401 = 0.469, against
    # RadImageNet's 0.84 - 0.695 = 0.145 (trapezoidal means over p)
    tag_fall = claim2.set_index(["confounder", "measure"]).loc[("tag", "fall"), "effect"]
    assert tag_fall == pytest.approx(0.3238, abs=1e-4)
    # claim 3, sex: ImageNet's i.i.d. AUC rises more but starts 0.03 lower (.73 vs .76), so
    # by level the two are level; the note says so
    sex3 = table[(table["claim"] == "3") & (table["confounder"] == "sex")].set_index("measure")
    assert sex3.loc["rise", "note"].startswith("level and rise give different verdicts")
    assert "ImageNet minus RadImageNet at p = 0 is -0.030" in sex3.loc["level", "note"]
    # claim 6 over p <= 0.2: sex .694 -> .649 (0.1) -> .519 (0.2), a mean fall of 0.110
    six = table[(table["claim"] == "6")].set_index("confounder")
    assert six.loc["sex", "effect"] == pytest.approx((0.045 + 0.175) / 2)


def test_the_verdict_rule_on_known_fold_differences():
    # failing to reject is not a refutation
    assert fold_verdict([0.3, 0.3, 0.3, 0.3, -0.01])["verdict"] == NOT_SHOWN
    # a zero difference cannot vote: 4 non-zero folds reach 1/16 at best
    tied = fold_verdict([0.2, 0.2, 0.2, 0.2, 0.0])
    assert tied["min_p"] == 1 / 16 and tied["p_value"] == 1 / 16 and tied["verdict"] == CANNOT
    assert smallest_p([0.2, 0.0, -0.1]) == 1 / 4
    best = fold_verdict([0.1, 0.2, 0.3, 0.1, 0.2])
    assert best["p_value"] == 1 / 32 and best["verdict"] == HOLDS
    assert best["ci_low"] == pytest.approx(0.1) and best["ci_high"] == np.inf  # min(d) with 5
    assert fold_verdict([-0.1, -0.2, -0.3, -0.1, -0.2])["verdict"] == OPPOSITE
    assert fold_verdict([0.1, 0.2, 0.3])["verdict"] == CANNOT  # 3 folds: 1/8 at best
    # equivalence: inside the margin in every fold holds; beyond it in every fold, opposite
    assert fold_verdict([0.01, -0.01, 0.0, 0.005, -0.005], "equivalent")["verdict"] == HOLDS
    beyond = [0.2, 0.15, 0.25, 0.3, 0.2] + [0.2] * 3
    assert fold_verdict(beyond, "equivalent")["verdict"] == OPPOSITE


def test_the_sign_flip_test_and_its_interval_agree_with_scipy_and_with_each_other():
    """The exact p equals scipy's permutation test; the test rejects exactly when its interval
    leaves out 0 (one-sided), and the TOST holds exactly when its 90 % interval lies within
    the margin."""
    rng = np.random.default_rng(0)
    for n in (2, 3, 5, 6, 8):
        for _ in range(20):
            d = rng.normal(0.03, 0.05, n).round(3)  # rounded: some ties and zeros
            scipy_p = stats.permutation_test((d,), np.mean, permutation_type="samples",
                                             alternative="greater", n_resamples=np.inf).pvalue
            assert sign_flip_p(d) == pytest.approx(scipy_p)
            low, _ = sign_flip_bounds(d)
            assert (sign_flip_p(d) <= ALPHA) == (low > 1e-9), d
            row = fold_verdict(d, "equivalent")
            # an end exactly at the margin is a tie, which the p-value counts as not rejected
            inside = -MARGIN + 1e-9 < row["ci_low"] and row["ci_high"] < MARGIN - 1e-9
            assert (row["verdict"] == HOLDS) == inside, d


def test_no_claim_holds_more_often_than_alpha_when_the_sources_do_not_differ():
    """5 folds, 2,000 synthetic grids per setting: claim 2 by fall and by level with identical
    sources, and claim 1's equivalence with the sources exactly the margin apart, say "holds"
    at most alpha of the time (the exact 95 % interval's upper end); the one-sided rate is
    not zero either (exact: 1/32 with 5 folds)."""
    same = [PAPER_TAG_OOD["radimagenet"]] * 2
    for measure in ("fall", "level"):
        rates = verdict_rates(same, measure, 2000, seed=1)
        assert 0.02 < rates["rate"] and rates["rate_high"] <= ALPHA + 0.01, rates
        assert rates["rate_low"] <= 1 / 32 <= rates["rate_high"]
    apart = [[v + MARGIN for v in PAPER_TAG_OOD["radimagenet"]], PAPER_TAG_OOD["radimagenet"]]
    boundary = verdict_rates(apart, "level", 2000, kind="equivalent", seed=2, noise_sd=0.01)
    assert boundary["rate_high"] <= ALPHA, boundary


def test_the_calibrations_quantities_are_the_claims():
    """The synthetic grid's level and fall per fold, through check_claims, give the effect the
    calibration computes from its arrays."""
    curves = {"imagenet": PAPER_TAG_OOD["imagenet"], "radimagenet": PAPER_TAG_OOD["radimagenet"]}
    table = synthetic_table(3, curves)
    aucs = synthetic_aucs(np.random.default_rng(3), list(curves.values()), 5)
    out = check_claims(table, claims=(CLAIMS[1],)).set_index("measure")
    for measure, (a, b) in {"fall": (0, 1), "level": (1, 0)}.items():
        q = quantity(aucs, measure)
        assert out.loc[measure, "effect"] == pytest.approx(float(np.mean(q[a] - q[b])))


def test_the_papers_effect_is_found_with_5_folds_and_3_folds_cannot_tell():
    paper = {"imagenet": PAPER_TAG_OOD["imagenet"], "radimagenet": PAPER_TAG_OOD["radimagenet"]}
    five = [verdicts(synthetic_table(seed, paper), "2", "fall")[0] for seed in range(20)]
    assert five.count(HOLDS) >= 19
    three = {verdicts(synthetic_table(seed, paper, n_folds=3), "2", "fall")[0]
             for seed in range(10)}
    assert three == {CANNOT}  # 3 folds: no p below 1/8
    same = {"imagenet": PAPER_TAG_OOD["radimagenet"], "radimagenet": PAPER_TAG_OOD["radimagenet"]}
    close = [verdicts(synthetic_table(seed, same, noise=0.005), "1")[0] for seed in range(10)]
    assert close.count(HOLDS) >= 9  # comparable sources are shown comparable


def test_level_and_fall_can_disagree_and_the_table_says_so():
    """A source that starts 0.1 higher and falls 0.05 further than ImageNet: higher by level,
    falling further by fall; both rows' note says so, with the start's difference."""
    base = np.array(PAPER_TAG_OOD["radimagenet"])
    curves = {"imagenet": list(base), "radimagenet": list(base + 0.1 - 0.05 * np.array(PS) * 2)}
    out = check_claims(synthetic_table(0, curves, noise=0.005), claims=(CLAIMS[1],))
    out = out.set_index("measure")
    assert out.loc["level", "verdict"] == HOLDS and out.loc["fall", "verdict"] == OPPOSITE
    assert out.loc["level", "note"] == out.loc["fall", "note"]
    assert "point opposite ways" in out.loc["fall", "note"]
    clean = out.loc["level", "effect"] - out.loc["fall", "effect"]
    assert clean == pytest.approx(0.1, abs=0.01) and f"{clean:+.3f}" in out.loc["fall", "note"]
    whole = summarise_claims(check_claims(synthetic_table(0, curves, noise=0.005)))
    assert whole.set_index(["claim", "measure"]).loc[("2", "level"), "whole"] == HOLDS


def test_a_claim_says_why_it_cannot_be_tested():
    paper = {"imagenet": PAPER_TAG_OOD["imagenet"], "radimagenet": PAPER_TAG_OOD["radimagenet"]}
    fall = (next(c for c in CLAIMS if c.id == "2").measures[0],)
    claim2 = [CLAIMS[1].__class__("2", "ImageNet falls further", fall, CLAIMS[1].confounders)]
    one_fold = check_claims(synthetic_table(0, paper, n_folds=1), claims=claim2)
    assert list(one_fold["verdict"]) == [UNTESTABLE]
    assert "1 fold: a fold-paired test needs at least 2" in one_fold["why"].iloc[0]
    only_imagenet = synthetic_table(0, {"imagenet": PAPER_TAG_OOD["imagenet"]})
    missing = check_claims(only_imagenet, claims=claim2)
    assert list(missing["verdict"]) == [UNTESTABLE]
    assert "no source in the role(s) ['in_domain']" in missing["why"].iloc[0]
    # a confounder no claim knows: said, with the claim's own
    gamma = check_claims(synthetic_table(0, paper, confounder="gamma"), claims=claim2)
    assert list(gamma["verdict"]) == [UNTESTABLE]
    assert "confounders ['gamma'] are none of the claim's ['tag', 'lowpass'" in gamma["why"][0]
    # claim 6 needs a p in (0, 0.2]
    coarse = synthetic_table(0, paper)
    coarse = coarse[coarse["p"].isin([0.0, 0.5, 1.0])]
    six = check_claims(coarse, claims=(CLAIMS[-1],))
    assert list(six["verdict"]) == [UNTESTABLE] and "0 < p <= 0.2" in six["why"][0]
    # two architectures: the claims are made per architecture
    both = pd.concat([synthetic_table(0, paper), synthetic_table(1, paper).assign(arch="b")])
    per_arch = check_claims(both, claims=claim2)
    assert list(per_arch["arch"]) == ["a", "b"] and set(per_arch["verdict"]) == {HOLDS}
    # a user's own sources in the roles; a role naming an absent source is refused
    renamed = synthetic_table(0, paper).replace({"source": {"radimagenet": "my_foundation"}})
    mine = check_claims(renamed, {"in_domain": "my_foundation"}, claims=claim2)
    assert list(mine["sources"]) == ["imagenet vs my_foundation"]
    with pytest.raises(AnalysisError, match="unknown claim roles"):
        check_claims(renamed, {"medical": "my_foundation"})
    with pytest.raises(AnalysisError, match=r"does not have: \{'in_domain': 'radimagenet'\}"):
        check_claims(renamed, {"in_domain": "radimagenet"})


def test_sm_claims_prints_the_demo_and_the_papers_verdicts(capsys):
    """On the demo table (3 folds) nothing can hold; claim 2 shows level and fall (the fall as
    computed here by hand), with a note only where they point opposite ways."""
    assert main(["claims", str(ROOT / "data/reference/demo_results.csv"), "--format", "csv"]) == 0
    from io import StringIO

    demo = pd.read_csv(StringIO(capsys.readouterr().out), dtype={"claim": str})
    claim2 = demo[demo["claim"] == "2"]
    assert set(claim2["confounder"]) == {"tag", "lowpass", "sex"}
    assert {"fall", "level", "level at p = 0.5", "level at p = 1"} == set(claim2["measure"])
    assert set(claim2["verdict"]) == {CANNOT}  # the demo has 3 folds
    by = claim2.set_index(["confounder", "measure"])
    assert set(claim2.loc[claim2["measure"] == "fall", "paper_verdict"]) == {HOLDS}
    for confounder in ("tag", "lowpass", "sex"):
        # the fall from the demo's own o.o.d. AUCs: per fold, AUC at p = 0 minus the
        # trapezoidal mean over p = 0, 0.5, 1, ImageNet's minus the radiology stand-in's
        table = pd.read_csv(ROOT / "data/reference/demo_results.csv")
        ood = table[(table["test_set"] == "ood") & (table["confounder"] == confounder)]
        wide = ood.pivot_table(index=["source", "fold"], columns="p", values="auc")
        fall = wide[0.0] - (0.25 * wide[0.0] + 0.5 * wide[0.5] + 0.25 * wide[1.0])
        expected = (fall["imagenet_lite0"] - fall["radiology_phantom"]).mean()
        assert by.loc[(confounder, "fall"), "effect"] == pytest.approx(expected)
        # a note exactly where level and fall point opposite ways
        level, falls = by.loc[(confounder, "level"), "effect"], by.loc[(confounder, "fall"), "effect"]
        assert pd.isna(by.loc[(confounder, "fall"), "note"]) == (level * falls > 0)
    assert main(["claims", "--paper", "--format", "md"]) == 0
    markdown = capsys.readouterr().out
    assert markdown.startswith("| claim | dataset |") and "| xray_noise |" in markdown
    assert "| ct_noise |" in markdown and "| xray_noise_ct |" in markdown
    assert main(["claims", str(ROOT / "data/reference/demo_results.csv"), "--format", "latex"]) == 0
    latex = capsys.readouterr().out
    assert "\\toprule" in latex and "cannot tell with these folds" in latex
    # a role naming a source the results do not have: a clear error, nothing printed
    demo_csv = str(ROOT / "data/reference/demo_results.csv")
    assert main(["claims", demo_csv, "--role", "in_domain=radimagenet"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "{'in_domain': 'radimagenet'}" in err and "radiology_phantom" in err


def test_a_grid_names_its_sources_roles_and_bad_roles_are_refused(tmp_path, capsys):
    import yaml

    grid = {"name": "mine", "datasets": [{"name": "phantom_cxr", "manifest": "m.csv"}],
            "confounders": ["tag"], "prevalences": [0, 1], "folds": 2,
            "sources": ["imagenet_lite0", "random"],
            "claims": {"roles": {"in_domain": "random", "medical": "imagenet_lite0",
                                 "imagenet": "resnet_mine"}}}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    assert main(["validate", str(path), "--no-check-paths"]) == 2
    err = capsys.readouterr().err
    assert "claims.roles: unknown role 'medical'" in err
    assert "claims.roles.imagenet: 'resnet_mine' is not an arm of this grid" in err
    grid["claims"] = {"roles": {"in_domain": "random"}}
    path.write_text(yaml.safe_dump(grid))
    from sm_utils.grid import load_grid

    assert load_grid(path, check_paths=False).claims == {"roles": {"in_domain": "random"}}
