"""The paper's claims as checks (sm_utils.analysis.claims): on the paper's own numbers, calibrated
on synthetic results tables (no claim "holds" more often than alpha when the sources do not
differ; the paper's effect is found with 5 folds), and through `sm claims`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sm_utils.analysis.claims import (
    ALPHA,
    CANNOT,
    CLAIMS,
    HOLDS,
    MARGIN,
    UNTESTABLE,
    check_claims,
    paper_claims,
)
from sm_utils.cli import main

ROOT = Path(__file__).resolve().parents[1]

PS = [0.0, 0.1, 0.2, 0.5, 0.8, 1.0]
# The paper's reported o.o.d. AUC for the tag (NIH ChestX-ray14), per p
PAPER_TAG_OOD = {"imagenet": [0.87, 0.79, 0.759, 0.378, 0.05, 0.01],
                 "radimagenet": [0.84, 0.81, 0.79, 0.72, 0.62, 0.43]}


def synthetic_table(seed: int, curves: dict[str, list[float]], n_folds: int = 5,
                    noise: float = 0.03, confounder: str = "tag") -> pd.DataFrame:
    """A results table of o.o.d. AUCs: each source's curve over PS plus, per fold, a shared
    fold effect and independent noise (SD ``noise``); clean AUC at p = 0 alike."""
    rng = np.random.default_rng(seed)
    rows = []
    for fold in range(n_folds):
        fold_effect = rng.normal(0, 0.02)
        for source, curve in curves.items():
            for p, auc in zip(PS, curve):
                value = float(np.clip(auc + fold_effect + rng.normal(0, noise), 0, 1))
                for test_set in ("ood", "clean") if p == 0 else ("ood",):
                    rows.append({"dataset": "d", "arch": "a", "confounder": confounder,
                                 "source": source, "fold": fold, "p": p, "test_set": test_set,
                                 "auc": value})
    return pd.DataFrame(rows)


def verdicts(table: pd.DataFrame, claim_id: str) -> list[str]:
    claim = next(c for c in CLAIMS if c.id == claim_id)
    return list(check_claims(table, claims=(claim,))["verdict"])


def test_on_the_papers_numbers_claims_2_and_4_hold_as_the_paper_states():
    table = paper_claims()
    nih = table[table["dataset"] == "nih_cxr14"].set_index(["claim", "confounder"])
    for confounder in ("tag", "denoising", "sex"):  # ImageNet falls further for all three
        assert nih.loc[("2", confounder), "verdict"] == HOLDS
        assert nih.loc[("2", confounder), "effect"] > MARGIN
    assert nih.loc[("4", "xray_noise"), "verdict"] == HOLDS  # both collapse alike
    assert abs(nih.loc[("4", "xray_noise"), "effect"]) < MARGIN
    assert nih.loc[("1", "(none)"), "verdict"] == HOLDS
    assert nih["why"].str.startswith("means only").all()  # no folds: direction and size


def test_no_claim_holds_more_often_than_alpha_when_the_sources_do_not_differ():
    """Claim 2 (one-sided, 5 folds) and claim 1 (equivalence) at their null: the rate of
    "holds" over 300 synthetic grids stays at or below alpha; it is not zero either (the
    smallest p with 5 folds is 1/32, so the exact rate is 1/32)."""
    same = {"imagenet": PAPER_TAG_OOD["radimagenet"], "radimagenet": PAPER_TAG_OOD["radimagenet"]}
    rates = np.mean([verdicts(synthetic_table(seed, same), "2") == [HOLDS]
                     for seed in range(300)])
    assert 0 < rates <= ALPHA, rates
    # equivalence at its boundary: the in-domain source exactly MARGIN better when clean
    shifted = {"imagenet": PAPER_TAG_OOD["radimagenet"],
               "radimagenet": [v + MARGIN for v in PAPER_TAG_OOD["radimagenet"]]}
    boundary = np.mean([verdicts(synthetic_table(seed, shifted, noise=0.01), "1") == [HOLDS]
                        for seed in range(300)])
    assert boundary <= ALPHA, boundary


def test_the_papers_effect_is_found_with_5_folds_and_3_folds_cannot_tell():
    paper = {"imagenet": PAPER_TAG_OOD["imagenet"], "radimagenet": PAPER_TAG_OOD["radimagenet"]}
    five = [verdicts(synthetic_table(seed, paper), "2")[0] for seed in range(50)]
    assert five.count(HOLDS) >= 48
    three = {verdicts(synthetic_table(seed, paper, n_folds=3), "2")[0] for seed in range(20)}
    assert three == {CANNOT}  # 3 folds: no p below 1/8
    same = {"imagenet": PAPER_TAG_OOD["radimagenet"], "radimagenet": PAPER_TAG_OOD["radimagenet"]}
    close = [verdicts(synthetic_table(seed, same, noise=0.005), "1")[0] for seed in range(20)]
    assert close.count(HOLDS) >= 18  # comparable sources are shown comparable


def test_a_claim_says_why_it_cannot_be_tested():
    paper = {"imagenet": PAPER_TAG_OOD["imagenet"], "radimagenet": PAPER_TAG_OOD["radimagenet"]}
    one_fold = check_claims(synthetic_table(0, paper, n_folds=1), claims=(CLAIMS[1],))
    assert list(one_fold["verdict"]) == [UNTESTABLE]
    assert "1 fold: a fold-paired test needs at least 2" in one_fold["why"].iloc[0]
    only_imagenet = synthetic_table(0, {"imagenet": PAPER_TAG_OOD["imagenet"]})
    missing = check_claims(only_imagenet, claims=(CLAIMS[1],))
    assert list(missing["verdict"]) == [UNTESTABLE]
    assert "no source in the role(s) ['in_domain']" in missing["why"].iloc[0]
    # two architectures: the claims are made per architecture
    both = pd.concat([synthetic_table(0, paper), synthetic_table(1, paper).assign(arch="b")])
    per_arch = check_claims(both, claims=(CLAIMS[1],))
    assert list(per_arch["arch"]) == ["a", "b"] and set(per_arch["verdict"]) == {HOLDS}
    # a user's own sources in the roles
    renamed = synthetic_table(0, paper).replace({"source": {"radimagenet": "my_foundation"}})
    mine = check_claims(renamed, {"in_domain": "my_foundation"}, claims=(CLAIMS[1],))
    assert list(mine["sources"]) == ["my_foundation vs imagenet"]
    with pytest.raises(Exception, match="unknown claim roles"):
        check_claims(renamed, {"medical": "my_foundation"})


def test_sm_claims_prints_the_demo_and_the_papers_verdicts(capsys):
    assert main(["claims", str(ROOT / "data/reference/demo_results.csv"), "--format", "csv"]) == 0
    from io import StringIO

    demo = pd.read_csv(StringIO(capsys.readouterr().out))
    claim2 = demo[demo["claim"] == "2"].set_index("confounder")
    assert set(claim2.index) == {"tag", "lowpass", "sex"}
    assert set(claim2["verdict"]) == {CANNOT}  # the demo has 3 folds
    assert set(claim2["paper_verdict"]) == {HOLDS}  # the paper's side by side
    assert main(["claims", "--paper", "--format", "md"]) == 0
    markdown = capsys.readouterr().out
    assert markdown.startswith("| claim | dataset |") and "| xray_noise |" in markdown
    assert main(["claims", str(ROOT / "data/reference/demo_results.csv"), "--format", "latex"]) == 0
    latex = capsys.readouterr().out
    assert "\\toprule" in latex and "cannot tell with these folds" in latex


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
    assert "claims.roles.imagenet: 'resnet_mine' is not a source of this grid" in err
    grid["claims"] = {"roles": {"in_domain": "random"}}
    path.write_text(yaml.safe_dump(grid))
    from sm_utils.grid import load_grid

    assert load_grid(path, check_paths=False).claims == {"roles": {"in_domain": "random"}}
