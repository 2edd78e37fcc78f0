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
    AnalysisError,
    analyse,
    collect_results,
    compare_sources,
    load_reference,
    min_p_independent,
    min_p_paired,
    paper_test,
    paper_test_report,
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
    """AUCs with a known structure: o.o.d. AUC falls with p, fastest for imagenet_lite0.

    ``micro_auc`` and ``keras_auc`` are fixed transforms of ``auc`` (0.15 + 0.7 auc and
    0.1 + 0.8 auc), so the metrics differ.
    """
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
    table = pd.DataFrame(rows)
    return table.assign(micro_auc=0.15 + 0.7 * table["auc"], keras_auc=0.1 + 0.8 * table["auc"])


def test_permutation_tests_match_scipy_and_holm_matches_statsmodels():
    table = known_table()
    result = compare_sources(table, n_permutations=999, seed=3)
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
        # the difference's interval: Welch's t (a bootstrap of 5 vs 5 folds under-covers)
        welch = stats.ttest_ind(x, y, equal_var=False).confidence_interval(0.95)
        assert row["diff_ci_low"] == pytest.approx(welch.low)
        assert row["diff_ci_high"] == pytest.approx(welch.high)
        # paired: sign flips of the fold-matched differences (rows of known_table are fold-ordered)
        paired = stats.permutation_test((x - y,), lambda d, axis: d.mean(axis=axis),
                                        permutation_type="samples", n_resamples=999, rng=3)
        assert row["n_paired"] == 5 and row["p_paired"] == pytest.approx(paired.pvalue, rel=1e-12)
    # Holm within each family of prevalences (one pair of sources, confounder and test set), as
    # statsmodels computes it: 3 tests per family here, not all 54 of the dataset and test set
    family = ["dataset", "confounder", "strength", "arch", "seed", "test_set", "source_a", "source_b"]
    sizes = result.groupby(family).size()
    assert len(sizes) == 2 * 3 * 3 and (sizes == 3).all()
    for _, members in result.groupby(family):
        reject, corrected, _, _ = multipletests(members["p_value"], alpha=0.05, method="holm")
        np.testing.assert_allclose(members["p_holm"], corrected)
        assert list(members["reject_holm"]) == list(reject)


def test_exact_permutation_p_value_for_separated_folds():
    # 5 vs 5 folds, every imagenet AUC below every random AUC: of the C(10,5) = 252 relabellings
    # only the observed one and its mirror are as extreme, so the exact two-sided p is 2/252.
    table = known_table()
    result = compare_sources(table, test_sets=["ood"], n_permutations=9999)
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
    result = compare_sources(pd.DataFrame(rows), test_sets=["ood"], n_permutations=9999).set_index(["source_a", "source_b"])
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


def write_run(runs_dir, run_id, confounder, p, source, fold, aucs, **config_extra):
    config = {"manifest": "data/phantom_cxr/manifest.csv", "confounder": confounder, "strength": 1.0,
              "confounder_params": {}, "p": p, "fold": fold, "source": source, "weights": None,
              "arch": None, "seed": 812, "runs_dir": str(runs_dir), **config_extra}
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


def test_a_linear_probe_is_an_arm_and_sources_of_their_own_architectures_are_compared(tmp_path):
    from sm_utils.analysis import compare_sources

    aucs = {"iid": 0.9, "ood": 0.6, "clean": 0.8}
    for fold in range(2):
        write_run(tmp_path, f"cnn{fold}", "tag", 1.0, "imagenet", fold, aucs, arch="resnet50")
        write_run(tmp_path, f"vit{fold}", "tag", 1.0, "rad_dino", fold, aucs)
        write_run(tmp_path, f"lp{fold}", "tag", 1.0, "rad_dino", fold, aucs,
                  mode="linear_probe")
    table = collect_results(tmp_path)
    assert set(table["source"]) == {"imagenet", "rad_dino", "rad_dino:linear_probe"}
    assert table.groupby("source")["mode"].first().to_dict() == {
        "imagenet": "finetune", "rad_dino": "finetune", "rad_dino:linear_probe": "linear_probe"}
    # a ResNet50 beside ViTs: one condition per (dataset, ..., p), every source in it
    assert set(table["arch"]) == {"per source"}
    assert table.groupby("source")["source_arch"].first().to_dict() == {
        "imagenet": "resnet50", "rad_dino": "default", "rad_dino:linear_probe": "default"}
    compared = compare_sources(table)
    pairs = {frozenset(pair) for pair in zip(compared["source_a"], compared["source_b"])}
    assert frozenset(("imagenet", "rad_dino")) in pairs
    # one architecture for all, or several for one source: arch stays the grid's axis
    for fold in range(2):
        write_run(tmp_path, f"cnn_b{fold}", "tag", 1.0, "imagenet", fold, aucs, arch="vit_b")
    table = collect_results(tmp_path)
    assert "source_arch" not in table and set(table["arch"]) == {"resnet50", "vit_b", "default"}
    # runs made before modes: no mode column, as before
    plain = tmp_path / "plain"
    write_run(plain, "run", "tag", 1.0, "random", 0, aucs)
    assert "mode" not in collect_results(plain) and "source_arch" not in collect_results(plain)


def test_reference_lines_use_our_names_and_are_drawn_over_micro_auc_only(tmp_path):
    reference = reference_lines(load_reference(REFERENCE_CSV), {"phantom_cxr": "nih_cxr14"},
                                sources={"imagenet_lite0": "ImageNet", "random": "random"})
    denoising = reference[(reference["confounder"] == "lowpass") & (reference["source"] == "imagenet_lite0")
                          & (reference["test_set"] == "ood")]
    assert len(denoising) == 6 and set(denoising["dataset"]) == {"phantom_cxr"}
    raw = pd.read_csv(REFERENCE_CSV)
    expected = raw[(raw["dataset"] == "nih_cxr14") & (raw["confounder"] == "denoising")
                   & (raw["source"] == "ImageNet") & (raw["test_set"] == "ood") & (raw["p"] == 1.0)]
    assert denoising.loc[denoising["p"] == 1.0, "mean_auc"].item() == expected["mean_auc"].item()

    # the reported means are micro-averages: never drawn over the binary AUC
    with pytest.raises(AnalysisError, match="micro"):
        plot_auc_vs_p(known_table(), reference=reference)
    table = known_table()
    keras = plot_auc_vs_p(table, reference=reference, metric="keras_auc")  # what analyse draws
    assert keras.axes[0].get_ylabel() == "o.o.d. Keras AUC"
    keras_solid = [line for line in keras.axes[0].get_lines() if line.get_linestyle() == "-"]
    ours = table[(table["confounder"] == "tag") & (table["source"] == "imagenet_lite0")
                 & (table["test_set"] == "ood")].groupby("p")
    np.testing.assert_allclose(keras_solid[0].get_ydata(), ours["keras_auc"].mean())
    fig = plot_auc_vs_p(table, reference=reference, metric="micro_auc")
    axes = fig.axes
    assert len(axes) == 2 * 2  # o.o.d. and i.i.d. rows x tag and lowpass columns
    top_left = axes[0]
    assert top_left.get_title() == "tag" and top_left.get_ylabel() == "o.o.d. micro-AUC"
    assert "micro-averaged AUC" in fig._suptitle.get_text()
    dashed = [line for line in top_left.get_lines() if line.get_linestyle() == "--"]
    assert [line.get_label() for line in dashed] == ["imagenet_lite0 (paper)", "random (paper)"]
    tag_imagenet = reference[(reference["confounder"] == "tag") & (reference["source"] == "imagenet_lite0")
                             & (reference["test_set"] == "ood")].sort_values("p")
    np.testing.assert_array_equal(dashed[0].get_xdata(), tag_imagenet["p"])
    np.testing.assert_array_equal(dashed[0].get_ydata(), tag_imagenet["mean_auc"])
    solid = [line for line in top_left.get_lines() if line.get_linestyle() == "-"]
    assert len(solid) == 3 and list(solid[0].get_xdata()) == [0.0, 0.5, 1.0]
    # the solid lines are the micro-AUC fold means, not the binary ones
    ours = table[(table["confounder"] == "tag") & (table["source"] == "imagenet_lite0")
                 & (table["test_set"] == "ood")].groupby("p")
    np.testing.assert_allclose(solid[0].get_ydata(), ours["micro_auc"].mean())
    assert not np.allclose(solid[0].get_ydata(), ours["auc"].mean())
    paths = save_figure(fig, tmp_path / "figures" / "grid_vs_paper")
    assert [p.suffix for p in paths] == [".png", ".pdf"] and all(p.stat().st_size > 1000 for p in paths)

    binary = plot_auc_vs_p(table)
    assert binary.axes[0].get_ylabel() == "o.o.d. binary AUC"
    assert "binary ROC AUC" in binary._suptitle.get_text()
    assert not [line for ax in binary.axes for line in ax.get_lines() if line.get_linestyle() == "--"]
    np.testing.assert_allclose(binary.axes[0].get_lines()[0].get_ydata(), ours["auc"].mean())


def test_summarise_gives_both_metrics():
    table = known_table()
    means = summarise(table)
    mask = ((table["confounder"] == "lowpass") & (table["p"] == 1.0) & (table["source"] == "imagenet_lite0")
            & (table["test_set"] == "iid"))
    row = means[(means["confounder"] == "lowpass") & (means["p"] == 1.0)
                & (means["source"] == "imagenet_lite0") & (means["test_set"] == "iid")].iloc[0]
    micro = table.loc[mask, "micro_auc"].to_numpy()
    binary = table.loc[mask, "auc"].to_numpy()
    assert row["mean_micro_auc"] == pytest.approx(micro.mean())
    assert row["sd_micro_auc"] == pytest.approx(micro.std(ddof=1))
    low, high = stats.t.interval(0.95, df=4, loc=micro.mean(), scale=stats.sem(micro))
    assert (row["micro_ci_low"], row["micro_ci_high"]) == pytest.approx((low, high))
    assert row["n_folds_micro"] == 5
    # the binary columns keep their names and values
    assert row["mean_auc"] == pytest.approx(binary.mean()) and row["mean_auc"] != row["mean_micro_auc"]
    # results without micro_auc (older runs) still summarise, with empty micro columns
    old = summarise(table.drop(columns="micro_auc"))
    assert old["mean_micro_auc"].isna().all() and (old["n_folds_micro"] == 0).all()
    np.testing.assert_allclose(old["mean_auc"], means["mean_auc"])


# --------------------------------------------------------------------------- the paper's test

PAPER_P = [0.0, 0.1, 0.2, 0.5, 0.8, 1.0]


def separated_table(confounders=("tag", "lowpass"), n_folds: int = 5,
                    sources=("imagenet_keras", "radimagenet", "random"),
                    imagenet_arch: str = "keras_resnet50") -> pd.DataFrame:
    """o.o.d. AUC 0.10..0.14 for the ImageNet arm and 0.60..0.64 for the RadImageNet arm in every
    condition: the folds of the two arms never overlap. The arms name their architectures
    differently, as the Keras and the RadImageNet loaders may."""
    base = {sources[0]: 0.1, sources[1]: 0.6, sources[2]: 0.3}
    arch = {sources[0]: imagenet_arch, sources[1]: "resnet50", sources[2]: "resnet50"}
    rows = []
    for confounder, p, source, fold in itertools.product(confounders, PAPER_P, sources, range(n_folds)):
        auc = base[source] + 0.01 * fold
        for test_set in ("ood", "iid"):
            rows.append({"run_id": f"{confounder}{p}{source}{fold}", "dataset": "nih_cxr14",
                         "confounder": confounder, "strength": 1.0, "arch": arch[source], "seed": 812,
                         "p": p, "source": source, "fold": fold, "test_set": test_set,
                         "auc": auc if test_set == "ood" else 0.9, "micro_auc": 0.5 + auc / 2,
                         "keras_auc": 0.25 + auc / 4})
    return pd.DataFrame(rows)


def test_paper_test_on_separated_folds_reaches_its_floor_of_2_in_252():
    result = paper_test(separated_table())
    # on the paper's metric, Keras' AUC, as the paper tested it; never the binary AUC
    assert set(result["metric"]) == {"keras_auc"}
    np.testing.assert_allclose(result["mean_difference"], (0.12 - 0.62) / 4)
    result = paper_test(separated_table(), metric="auc")
    # one row per confounder and p, ImageNet vs RadImageNet only, o.o.d. only, arch not a key
    assert len(result) == 2 * 6 and set(result["test_set"]) == {"ood"}
    assert set(result["source_imagenet"]) == {"imagenet_keras"}
    assert set(result["source_radimagenet"]) == {"radimagenet"}
    assert set(result["arch_imagenet"]) == {"keras_resnet50"} and set(result["arch_radimagenet"]) == {"resnet50"}
    # of the C(10, 5) = 252 ways to split the 10 folds, only the observed one and its mirror are
    # as extreme: the exact two-sided p is 2/252, the smallest this test can give
    assert (result["p_value"] == 2 / 252).all() and (result["min_p_value"] == 2 / 252).all()
    assert (result["statistic"] < 0).all() and result["reject"].all()
    np.testing.assert_allclose(result["mean_difference"], 0.12 - 0.62)
    # Holm over the 6 prevalences of each confounder: 6 x 2/252 = 0.048 still rejects
    assert (result["family_size"] == 6).all()
    np.testing.assert_allclose(result["p_holm"], 6 * 2 / 252)
    np.testing.assert_allclose(result["min_p_holm"], 6 * 2 / 252)
    assert result["reject_holm"].all()
    # paired: every fold-matched difference is -0.5; of the 2^5 = 32 sign patterns only the
    # observed one and its mirror are as extreme: 2/32, which can never reach 0.05
    assert (result["n_paired"] == 5).all()
    np.testing.assert_allclose(result["mean_paired_difference"], -0.5)
    assert (result["p_paired"] == 2 / 32).all() and (result["min_p_paired"] == 2 / 32).all()
    np.testing.assert_allclose(result["p_paired_holm"], 6 * 2 / 32)

    report = paper_test_report(result)
    assert "5 vs 5 folds" in report and "2/252 = 0.0079" in report
    assert "Holm over the 6 prevalences of a confounder cannot give below 6 x 0.0079 = 0.048" in report
    assert "2/32 = 0.0625" in report and "so with 5 folds it can never reach 0.05" in report
    assert "12 have p <= 0.05 as the paper tested them, 12 after Holm, 0 by the paired test" in report
    assert "stand-in" not in report


def test_paper_test_report_follows_the_folds_present():
    # 2 vs 2 folds, as in the offline demo: no test can ever reject, and the report says so
    result = paper_test(separated_table(n_folds=2, sources=("imagenet_lite0", "radiology_phantom", "random")))
    assert (result["p_value"] == 2 / 6).all() and (result["p_paired"] == 2 / 4).all()
    report = paper_test_report(result)
    assert "With 2 vs 2 folds the paper's exact permutation test cannot give p below 2/6 = 0.33" in report
    assert "cannot give below 1 (6 x 0.33, capped at 1)" in report
    assert "2/4 = 0.5" in report and "none of the three can ever reach 0.05" in report
    assert report.count("offline stand-in") == 2
    # the micro-averaged AUC (the paper's own metric) on request
    micro = paper_test(separated_table(), metric="micro_auc")
    np.testing.assert_allclose(micro["mean_difference"], (0.12 - 0.62) / 2)
    assert "micro-averaged AUC" in paper_test_report(micro)


def test_paper_test_pairs_folds_by_their_label_not_their_order():
    table = separated_table(confounders=("tag",))
    ood = table["test_set"] == "ood"
    imagenet = ood & (table["source"] == "imagenet_keras")
    radimagenet = ood & (table["source"] == "radimagenet")
    # RadImageNet fold f: the ImageNet fold f plus 0.01 (paired differences all -0.01), while the
    # RadImageNet rows are stored in reverse fold order and its fold 4 is missing
    table.loc[imagenet, "auc"] = 0.5 + 0.1 * table.loc[imagenet, "fold"]
    table.loc[radimagenet, "auc"] = 0.51 + 0.1 * table.loc[radimagenet, "fold"]
    table = pd.concat([table[~radimagenet], table[radimagenet & (table["fold"] != 4)].iloc[::-1]],
                      ignore_index=True)
    result = paper_test(table, metric="auc").set_index("p")
    row = result.loc[0.5]
    assert row["n_imagenet"] == 5 and row["n_radimagenet"] == 4 and row["n_paired"] == 4
    np.testing.assert_allclose(row["mean_paired_difference"], -0.01)
    # matched by label: 4 differences of one sign, exact p 2/2^4; matched by row order the
    # differences would be of both signs and far from significant
    assert row["p_paired"] == 2 / 16 and row["min_p_paired"] == 2 / 16
    assert row["min_p_value"] == pytest.approx(2 / 126)  # C(9, 4) = 126
    # the independent test sees the overlapping samples: nowhere near its floor
    assert row["p_value"] > 0.5


def test_holm_family_is_the_prevalences_of_one_confounder(monkeypatch):
    # Feed known p-values through the family grouping: the mocked test returns the ImageNet AUC
    # as its p-value. tag: [0.01, 0.04, 0.03] -> Holm [0.03, 0.06, 0.06];
    # lowpass: [0.02, 0.5, 0.01] -> [0.04, 0.5, 0.03]. One family of 6 would give tag's 0.01 a
    # Holm value of 0.06 instead.
    wanted = {"tag": [0.01, 0.04, 0.03], "lowpass": [0.02, 0.5, 0.01]}
    rows = []
    for confounder, values in wanted.items():
        for p, value in zip([0.0, 0.5, 1.0], values):
            for source, auc in (("imagenet", value), ("radimagenet", 0.9)):
                rows += [{"dataset": "d", "confounder": confounder, "strength": 1.0, "arch": "resnet50",
                          "seed": 812, "p": p, "source": source, "fold": fold, "test_set": "ood",
                          "auc": auc, "micro_auc": auc} for fold in range(3)]
    import sm_utils.analysis.paper as paper_module  # where paper_test finds the t-test

    monkeypatch.setattr(paper_module, "_permutation_t_test", lambda x, y, n, seed: (0.0, float(x.mean())))
    result = paper_test(pd.DataFrame(rows), metric="auc").set_index(["confounder", "p"])
    assert (result["family_size"] == 3).all()
    np.testing.assert_allclose(result.loc["tag", "p_value"], [0.01, 0.04, 0.03])
    np.testing.assert_allclose(result.loc["tag", "p_holm"], [0.03, 0.06, 0.06])
    np.testing.assert_allclose(result.loc["lowpass", "p_holm"], [0.04, 0.5, 0.03])
    assert list(result.loc["tag", "reject_holm"]) == [True, False, False]
    assert list(result.loc["lowpass", "reject_holm"]) == [True, False, True]
    assert list(result.loc["tag", "reject"]) == [True, True, True]  # the paper's reading


def test_compare_sources_holm_over_prevalences_can_reject():
    # With a family of all 12 conditions x 3 pairs the smallest Holm value would be 36 x 2/252;
    # over the 6 prevalences of one pair and confounder it is 6 x 2/252 = 0.048
    table = separated_table(imagenet_arch="resnet50")  # arch is part of a condition here
    result = compare_sources(table, test_sets=["ood"], n_permutations=9999)
    pair = result[(result["source_a"] == "imagenet_keras") & (result["source_b"] == "radimagenet")]
    assert len(pair) == 12
    np.testing.assert_allclose(pair["p_holm"], 6 * 2 / 252)
    assert pair["reject_holm"].all()
    assert (pair["p_paired"] == 2 / 32).all() and (pair["n_paired"] == 5).all()


def test_smallest_attainable_p_values():
    assert min_p_independent(5, 5) == 2 / 252
    assert min_p_independent(5, 4) == 2 / 126
    assert np.isnan(min_p_independent(1, 5))
    assert min_p_paired(5) == 2 / 32 and min_p_paired(2) == 0.5
    # randomised (more arrangements than resamples): scipy counts the observed statistic among
    # the resamples, so its floor is 2 / (n_resamples + 1); check against scipy itself
    assert min_p_independent(10, 10, n_permutations=999) == 2 / 1000
    x, y = np.arange(10) / 100, 0.5 + np.arange(10) / 100
    scipy_p = stats.ttest_ind(x, y, method=stats.PermutationMethod(n_resamples=999, rng=0)).pvalue
    assert scipy_p == pytest.approx(2 / 1000)
    assert min_p_paired(12, n_permutations=999) == 2 / 1000


def test_paper_arms_are_found_by_name_or_given():
    table = separated_table(confounders=("tag",))
    # two candidates for one arm: refuse to guess
    both = pd.concat([table, table[table["source"] == "imagenet_keras"].assign(source="imagenet")])
    with pytest.raises(AnalysisError, match="imagenet_keras, imagenet.*arms="):
        paper_test(both)
    chosen = paper_test(both, arms={"ImageNet": "imagenet", "RadImageNet": "radimagenet"})
    assert set(chosen["source_imagenet"]) == {"imagenet"} and len(chosen) == 6
    with pytest.raises(AnalysisError, match="arms="):
        paper_test(table, arms={"ImageNet": "imagenet_keras"})
    # no RadImageNet arm: an empty table that says why, and the report repeats it
    alone = paper_test(table[table["source"] != "radimagenet"])
    assert alone.empty and "RadImageNet" in alone.attrs["message"]
    assert paper_test_report(alone) == alone.attrs["message"]
    # one arm with two architectures in one condition: the folds cannot be told apart
    mixed = table.copy()
    mixed.loc[(mixed["source"] == "radimagenet") & (mixed["fold"] == 0), "arch"] = "densenet121"
    with pytest.raises(AnalysisError, match="architectures"):
        paper_test(mixed)


def test_analyse_writes_the_paper_test_and_a_separate_figure_against_the_paper(tmp_path):
    table = known_table()
    out = analyse(table, pd.DataFrame(), tmp_path / "runs", tmp_path / "figures", "g",
                  reference_datasets={"phantom_cxr": "nih_cxr14"}, n_permutations=999)
    names = [p.name for p in out["figures"]]
    assert names == ["g_auc_vs_p.png", "g_auc_vs_p.pdf", "g_vs_paper.png", "g_vs_paper.pdf"]
    written = pd.read_csv(tmp_path / "runs" / "paper_test.csv")
    assert len(written) == 2 * 2 * 3 and set(written["source_imagenet"]) == {"imagenet_lite0"}
    # the paper's test on its metric first, the same on the binary AUC beside it
    assert list(written["metric"]) == ["keras_auc"] * 6 + ["auc"] * 6
    assert set(out["paper_test"]["metric"]) == {"keras_auc"}
    assert set(out["paper_test_binary"]["metric"]) == {"auc"}
    np.testing.assert_allclose(written["p_value"][:6], out["paper_test"]["p_value"])
    np.testing.assert_allclose(out["paper_test"]["mean_difference"],
                               0.8 * out["paper_test_binary"]["mean_difference"])
    assert "Keras AUC (the paper's metric" in out["paper_test_report"]
    assert out["paper_test_report"] == paper_test_report(out["paper_test"])
    assert "offline stand-in" in out["paper_test_report"]
    # without keras_auc the comparison figure cannot be drawn: said, not faked with binary AUC
    with pytest.warns(UserWarning, match="keras_auc"):
        out = analyse(table.drop(columns="keras_auc"), pd.DataFrame(), tmp_path / "runs",
                      tmp_path / "again", "g", reference_datasets={"phantom_cxr": "nih_cxr14"},
                      n_permutations=99)
    assert [p.name for p in out["figures"]] == ["g_auc_vs_p.png", "g_auc_vs_p.pdf"]
    # arms that cannot be told apart by name: the rest of the analysis still runs
    both = pd.concat([table, table[table["source"] == "imagenet_lite0"].assign(source="imagenet")])
    with pytest.warns(UserWarning, match="arms="):
        out = analyse(both, pd.DataFrame(), tmp_path / "runs", tmp_path / "figures", "g",
                      n_permutations=99)
    assert out["paper_test"].empty and "arms=" in out["paper_test_report"]
    assert len(out["comparisons"]) > 0


def test_saved_figures_are_byte_identical_on_rerun(tmp_path):
    # a PDF creation date would make every demo rerun change the committed figure
    first = save_figure(plot_auc_vs_p(known_table()), tmp_path / "a" / "fig")
    second = save_figure(plot_auc_vs_p(known_table()), tmp_path / "b" / "fig")
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]


def test_runs_made_before_keras_auc_get_it_from_their_predictions(tmp_path):
    from sm_utils.evaluation import keras_auc

    write_run(tmp_path, "r1", "tag", 0.5, "imagenet_lite0", 0, {"ood": 0.7, "iid": 0.8})
    rng = np.random.default_rng(3)
    frames = []
    for test_set in ("ood", "iid"):
        labels = rng.integers(0, 2, 30)
        score = np.clip(0.3 + 0.4 * labels + rng.normal(0, 0.2, 30), 0, 1)
        frames.append(pd.DataFrame({"test_set": test_set, "image_id": [f"i{k}" for k in range(30)],
                                    "label": labels, "score": score, "prob_0": 1 - score,
                                    "prob_1": score}))
    predictions = pd.concat(frames, ignore_index=True)
    predictions.to_csv(tmp_path / "r1" / "predictions.csv", index=False)
    table = collect_results(tmp_path).set_index("test_set")
    for test_set, part in predictions.groupby("test_set"):
        assert table.loc[test_set, "keras_auc"] == keras_auc(
            part["label"].to_numpy(), part[["prob_0", "prob_1"]].to_numpy())


def test_the_sex_tasks_iid_means_of_the_paper_are_not_drawn_against_ours():
    """The paper published no i.i.d. test pool for the sex task; ours is our own, so the
    paper's sex i.i.d. means are left out of the reference lines (its o.o.d. ones stay)."""
    raw = load_reference(REFERENCE_CSV)
    assert len(raw[(raw["confounder"] == "sex") & (raw["test_set"] == "iid")]) > 0
    lines = reference_lines(raw, {"nih_sex_task": "nih_cxr14"})
    sex = lines[lines["confounder"] == "sex"]
    assert set(sex["test_set"]) == {"ood"} and len(sex) > 0
    assert "iid" in set(lines.loc[lines["confounder"] == "tag", "test_set"])
