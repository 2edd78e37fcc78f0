"""Results table, statistics and the paper's figure, fed with known values."""

from __future__ import annotations

import itertools

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from statsmodels.stats.multitest import multipletests

from sm_utils.analysis import (
    REFERENCE_CSV,
    collect_results,
    compare_sources,
    load_reference,
    plot_auc_vs_p,
    reference_lines,
    robustness_summary,
    save_figure,
    save_results,
    summarise,
)
from sm_utils.io import atomic_write_json

SOURCES = ["imagenet_lite0", "radiology_phantom", "random"]


def known_table(n_folds: int = 5) -> pd.DataFrame:
    """AUCs with a known structure: o.o.d. AUC falls with p, fastest for imagenet_lite0."""
    rng = np.random.default_rng(7)
    slope = {"imagenet_lite0": 0.8, "radiology_phantom": 0.4, "random": 0.05}
    rows = []
    for confounder, p, source, fold in itertools.product(["tag", "lowpass"], [0.0, 0.5, 1.0], SOURCES,
                                                         range(n_folds)):
        clean = 0.85 if source != "random" else 0.7
        for test_set, auc in (("ood", clean - slope[source] * p), ("iid", clean + 0.1 * p), ("clean", clean)):
            rows.append({"run_id": f"{confounder}{p}{source}{fold}", "dataset": "phantom_cxr",
                         "confounder": confounder, "strength": 1.0, "arch": "default", "seed": 812,
                         "p": p, "source": source, "fold": fold, "test_set": test_set,
                         "auc": auc + rng.normal(0, 0.02)})
    return pd.DataFrame(rows)


def test_permutation_tests_match_scipy_and_holm_matches_statsmodels():
    table = known_table()
    result = compare_sources(table, n_permutations=999, n_bootstrap=999, seed=3)
    # 2 confounders x 3 p x 3 test sets x 3 pairs of sources
    assert len(result) == 2 * 3 * 3 * 3
    for _, row in result.sample(8, random_state=0).iterrows():
        mask = ((table["confounder"] == row["confounder"]) & (table["p"] == row["p"])
                & (table["test_set"] == row["test_set"]))
        x = table.loc[mask & (table["source"] == row["source_a"]), "auc"].to_numpy()
        y = table.loc[mask & (table["source"] == row["source_b"]), "auc"].to_numpy()
        direct = stats.ttest_ind(x, y, method=stats.PermutationMethod(n_resamples=999, rng=3))
        assert row["statistic"] == pytest.approx(direct.statistic, rel=1e-12)
        assert row["p_value"] == pytest.approx(direct.pvalue, rel=1e-12)
        assert row["mean_difference"] == pytest.approx(x.mean() - y.mean())
        boot = stats.bootstrap((x, y), lambda a, b, axis: a.mean(axis=axis) - b.mean(axis=axis),
                               n_resamples=999, method="percentile", rng=3)
        assert row["diff_ci_low"] == pytest.approx(boot.confidence_interval.low)
        assert row["diff_ci_high"] == pytest.approx(boot.confidence_interval.high)
    # Holm within each (dataset, test set) family, as statsmodels computes it
    for _, family in result.groupby(["dataset", "test_set"]):
        reject, corrected, _, _ = multipletests(family["p_value"], alpha=0.05, method="holm")
        np.testing.assert_allclose(family["p_holm"], corrected)
        assert list(family["reject_holm"]) == list(reject)


def test_exact_permutation_p_value_for_separated_folds():
    # 5 vs 5 folds, every imagenet AUC below every random AUC: of the C(10,5) = 252 relabellings
    # only the observed one and its mirror are as extreme, so the exact two-sided p is 2/252.
    table = known_table()
    result = compare_sources(table, test_sets=["ood"], n_permutations=9999, n_bootstrap=99)
    row = result[(result["confounder"] == "tag") & (result["p"] == 1.0)
                 & (result["source_a"] == "imagenet_lite0") & (result["source_b"] == "random")].iloc[0]
    assert row["p_value"] == pytest.approx(2 / 252)
    assert row["mean_difference"] == pytest.approx((0.85 - 0.8) - (0.7 - 0.05), abs=0.04)
    assert row["diff_ci_high"] < 0
    # at p = 0 the sources differ only by noise (imagenet vs radiology): no rejection
    same = result[(result["p"] == 0.0) & (result["source_a"] == "imagenet_lite0")
                  & (result["source_b"] == "radiology_phantom")]
    assert (same["p_value"] > 0.01).all() and not same["reject_holm"].any()


def test_sources_with_constant_folds_get_exact_p_values_not_zero():
    # o.o.d. AUC 0 in every fold of two sources (a full shortcut): scipy's t-test gives t = nan
    # and p = 0, which Holm would call significant. The samples are identical: p must be 1.
    rows = [{"run_id": f"{source}{fold}", "dataset": "phantom_cxr", "confounder": "tag",
             "strength": 1.0, "arch": "default", "seed": 812, "p": 1.0, "source": source,
             "fold": fold, "test_set": "ood", "auc": auc}
            for source, auc in (("imagenet_lite0", 0.0), ("radiology_phantom", 0.0), ("random", 1.0))
            for fold in range(3)]
    result = compare_sources(pd.DataFrame(rows), test_sets=["ood"], n_permutations=9999,
                             n_bootstrap=99).set_index(["source_a", "source_b"])
    same = result.loc[("imagenet_lite0", "radiology_phantom")]
    assert same["p_value"] == 1.0 and np.isnan(same["statistic"]) and not same["reject_holm"]
    # two different constants: of the C(6,3) = 20 relabellings only the observed one and its
    # mirror are as extreme, so the exact p is 2/20, with t = -inf
    apart = result.loc[("imagenet_lite0", "random")]
    assert apart["p_value"] == pytest.approx(2 / 20) and apart["statistic"] == -np.inf


def test_robustness_summary_finds_where_ood_auc_falls_below_half():
    summary = robustness_summary(known_table()).set_index(["confounder", "source"])
    # imagenet: 0.85 - 0.8 p -> 0.45 at p = 0.5; radiology: 0.85 - 0.4 p -> 0.45 at p = 1
    assert summary.loc[("tag", "imagenet_lite0"), "first_p_ood_below_half"] == 0.5
    assert summary.loc[("tag", "radiology_phantom"), "first_p_ood_below_half"] == 1.0
    assert np.isnan(summary.loc[("tag", "random"), "first_p_ood_below_half"])
    assert summary.loc[("tag", "random"), "clean_auc"] == pytest.approx(0.7, abs=0.03)
    # gap at p = 1: (0.85 + 0.1) - (0.85 - 0.8) = 0.9 for imagenet
    assert summary.loc[("lowpass", "imagenet_lite0"), "gap_at_max_p"] == pytest.approx(0.9, abs=0.04)


def test_summary_band_is_the_t_interval_over_folds():
    table = known_table()
    means = summarise(table)
    row = means[(means["confounder"] == "tag") & (means["p"] == 0.5) & (means["source"] == "random")
                & (means["test_set"] == "ood")].iloc[0]
    values = table[(table["confounder"] == "tag") & (table["p"] == 0.5) & (table["source"] == "random")
                   & (table["test_set"] == "ood")]["auc"].to_numpy()
    low, high = stats.t.interval(0.95, df=4, loc=values.mean(), scale=stats.sem(values))
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((low, high))
    assert row["n_folds"] == 5


def write_run(runs_dir, run_id, confounder, p, source, fold, aucs):
    config = {"manifest": "data/phantom_cxr/manifest.csv", "confounder": confounder, "strength": 1.0,
              "confounder_params": {}, "p": p, "fold": fold, "source": source, "weights": None,
              "arch": None, "seed": 812, "runs_dir": str(runs_dir)}
    test_sets = {name: {"auc": auc, "auc_ci_low": auc - 0.1, "auc_ci_high": auc + 0.1, "micro_auc": auc,
                        "n": 40, "n_pos": 20, "n_confounded": 7,
                        "group_auc": {"sex=F": auc - 0.05, "sex=M": auc + 0.05}}
                 for name, auc in aucs.items()}
    atomic_write_json(runs_dir / run_id / "metrics.json", {
        "run_id": run_id, "config": config, "test_sets": test_sets, "best_epoch": 2, "epochs_run": 3,
        "train_seconds": 4.0, "eval_seconds": 1.0})


def test_collect_results_reads_complete_run_directories_only(tmp_path):
    write_run(tmp_path, "run_b", "tag", 1.0, "random", 1, {"iid": 0.9, "ood": 0.6, "clean": 0.8})
    write_run(tmp_path, "run_a", "tag", 0.5, "random", 0, {"iid": 0.8, "ood": 0.7, "clean": 0.75})
    (tmp_path / "run_partial").mkdir()  # interrupted: no metrics.json
    (tmp_path / "run_partial" / "predictions.csv").write_text("x")
    table, groups = collect_results(tmp_path, with_groups=True)
    assert list(table["run_id"]) == ["run_a"] * 3 + ["run_b"] * 3
    assert list(table["test_set"][:3]) == ["ood", "iid", "clean"]
    assert table.loc[(table["run_id"] == "run_b") & (table["test_set"] == "ood"), "auc"].item() == 0.6
    assert set(table["dataset"]) == {"phantom_cxr"} and set(table["arch"]) == {"default"}
    assert len(groups) == 12
    assert groups.loc[(groups["run_id"] == "run_a") & (groups["test_set"] == "iid")
                      & (groups["group"] == "sex=F"), "auc"].item() == pytest.approx(0.75)
    # with the grid's cell index, runs outside the grid are left out and datasets come from it
    pd.DataFrame({"run_id": ["run_a"], "dataset": ["my_data"]}).to_csv(tmp_path / "cells.csv", index=False)
    indexed = collect_results(tmp_path)
    assert set(indexed["run_id"]) == {"run_a"} and set(indexed["dataset"]) == {"my_data"}
    written = save_results(table, tmp_path / "results.csv")
    assert [p.name for p in written] == ["results.csv", "results.parquet"]
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "results.parquet"), table)
    assert len(pd.read_csv(tmp_path / "results.csv")) == 6


def test_reference_lines_use_our_names_and_the_figure_draws_them(tmp_path):
    reference = reference_lines(load_reference(REFERENCE_CSV), {"phantom_cxr": "nih_cxr14"},
                                sources={"imagenet_lite0": "ImageNet", "random": "random"})
    denoising = reference[(reference["confounder"] == "lowpass") & (reference["source"] == "imagenet_lite0")
                          & (reference["test_set"] == "ood")]
    assert len(denoising) == 6 and set(denoising["dataset"]) == {"phantom_cxr"}
    raw = pd.read_csv(REFERENCE_CSV)
    expected = raw[(raw["dataset"] == "nih_cxr14") & (raw["confounder"] == "denoising")
                   & (raw["source"] == "ImageNet") & (raw["test_set"] == "ood") & (raw["p"] == 1.0)]
    assert denoising.loc[denoising["p"] == 1.0, "mean_auc"].item() == expected["mean_auc"].item()

    fig = plot_auc_vs_p(known_table(), reference=reference)
    axes = fig.axes
    assert len(axes) == 2 * 2  # o.o.d. and i.i.d. rows x tag and lowpass columns
    top_left = axes[0]
    assert top_left.get_title() == "tag" and top_left.get_ylabel() == "o.o.d. AUC"
    dashed = [line for line in top_left.get_lines() if line.get_linestyle() == "--"]
    assert len(dashed) == 2  # the paper's imagenet and random means
    solid = [line for line in top_left.get_lines() if line.get_linestyle() == "-"]
    assert len(solid) == 3 and list(solid[0].get_xdata()) == [0.0, 0.5, 1.0]
    paths = save_figure(fig, tmp_path / "figures" / "grid_auc_vs_p")
    assert [p.suffix for p in paths] == [".png", ".pdf"] and all(p.stat().st_size > 1000 for p in paths)


def test_saved_figures_are_byte_identical_on_rerun(tmp_path):
    # a PDF creation date would make every demo rerun change the committed figure
    first = save_figure(plot_auc_vs_p(known_table()), tmp_path / "a" / "fig")
    second = save_figure(plot_auc_vs_p(known_table()), tmp_path / "b" / "fig")
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]
