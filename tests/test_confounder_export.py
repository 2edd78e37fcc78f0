"""Export of a confounded fold as image folders plus manifest (issue 4, item 5), and the counts
of notebook 02: both must be the rows a run trains and tests on (issue 11, item 5)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from sm_utils.confounders import ConfounderError, apply_prevalence, get_confounder
from sm_utils.confounding import example_row, prevalence_counts
from sm_utils.export import export_confounded, load_grey
from sm_utils.manifest import Manifest, load_manifest, save_manifest
from sm_utils.runs import RunConfig, execute_run, split_rows


def _write_manifest(folder, roles, sexes):
    rng = np.random.default_rng(0)
    rows = []
    (folder / "img").mkdir(parents=True, exist_ok=True)
    for i, (role, sex) in enumerate(zip(roles, sexes, strict=True)):
        path = f"img/{i}.png"
        Image.fromarray(rng.integers(40, 200, (48, 48), dtype=np.uint8)).save(folder / path)
        rows.append({"image_id": f"i{i}", "path": path, "label": (i + 1) % 2, "patient_id": f"p{i}",
                     "fold_0": role, "sex": sex})
    save_manifest(Manifest(pd.DataFrame(rows), root=folder), folder / "manifest.csv")
    return folder / "manifest.csv"


@pytest.fixture()
def tiny_manifest(tmp_path):
    # Labels alternate 1, 0; both sexes among positives and negatives of every split (sampled
    # pools need both).
    roles = ["train"] * 10 + ["val"] * 4 + ["test"] * 6
    return _write_manifest(tmp_path / "src", roles, "FMMMFFMMFM" + "FMMM" + "FFMMMF")


def _run_rows(manifest_path, confounder, p, seed):
    """What a run uses: sm_utils.runs.split_rows, the training code."""
    config = RunConfig(manifest=str(manifest_path), confounder=confounder, p=p, seed=seed)
    return split_rows(config, load_manifest(manifest_path), get_confounder(confounder))


def _confounded_ids(rows, id_column="image_id"):
    return sorted(rows.loc[rows["confounded"].astype(bool), id_column].astype(str))


def test_export_writes_confounded_images_and_a_valid_manifest(tiny_manifest, tmp_path):
    out = export_confounded(tiny_manifest, "tag", 0.6, seed=5, fold=0, out_dir=tmp_path / "out",
                            image_size=64)
    again = load_manifest(tmp_path / "out" / "manifest.csv")  # validates files and leakage
    table = again.table
    assert table["fold_0"].value_counts().to_dict() == {
        "train": 10, "val": 4, "test": 6, "test_ood": 6, "test_clean": 6}
    # As in a run, train + val (7 positives) are confounded as one pool: round(0.6 * 7) = 4
    # positives, which with seed 5 are all training images. (Confounding train and val
    # separately would give round(0.6 * 5) = 3 and round(0.6 * 2) = 1.)
    train, val = table[table["fold_0"] == "train"], table[table["fold_0"] == "val"]
    assert train["confounded"].sum() == 4 and (train.loc[train["confounded"], "label"] == 1).all()
    assert val["confounded"].sum() == 0
    run = _run_rows(tiny_manifest, "tag", 0.6, 5)
    for role, test_set in [("train", "train"), ("val", "val"), ("test", "iid"),
                           ("test_ood", "ood"), ("test_clean", "clean")]:
        part = table[table["fold_0"] == role]
        assert sorted(part["source_image_id"]) == sorted(run[test_set]["image_id"])
        assert _confounded_ids(part, "source_image_id") == _confounded_ids(run[test_set])
    ood = table[table["fold_0"] == "test_ood"]
    assert ood["confounded"].equals(ood["label"] == 0)
    assert not table.loc[table["fold_0"] == "test_clean", "confounded"].any()
    source = load_manifest(tiny_manifest)
    tag = get_confounder("tag")
    from sm_utils.imaging import resize_grey

    for row in table.itertuples():
        written = load_grey(again.image_path(row.path))
        stored = load_grey(source.image_path(f"img/{row.source_image_id[1:]}.png"))
        assert written.shape == (64, 64)
        if row.confounded:  # the tag acts on the stored image, which is then resized
            assert np.array_equal(written, resize_grey(tag.apply(stored, None), 64, "bilinear"))
        else:
            assert np.array_equal(written, resize_grey(stored, 64, "bilinear"))
    assert out.meta["confounder"]["name"] == "tag"
    assert out.meta["test_sets"] == ["iid", "ood", "clean"]


def test_export_sampled_confounder_and_bad_test_set(tiny_manifest, tmp_path):
    out = export_confounded(tiny_manifest, "sex", 1.0, seed=0, fold=0, out_dir=tmp_path / "sex",
                            test_sets=("ood",))
    table = out.table
    assert set(table["fold_0"]) == {"train", "val", "test_ood"}
    train = table[table["fold_0"] == "train"]
    assert (train.loc[train["label"] == 1, "sex"] == "F").all()
    assert (train.loc[train["label"] == 0, "sex"] == "M").all()
    run = _run_rows(tiny_manifest, "sex", 1.0, 0)
    for role, test_set in [("train", "train"), ("val", "val"), ("test_ood", "ood")]:
        assert sorted(table.loc[table["fold_0"] == role, "source_image_id"]) == sorted(
            run[test_set]["image_id"])
    with pytest.raises(ConfounderError, match="valid"):
        export_confounded(tiny_manifest, "tag", 0.5, 0, 0, tmp_path / "x", test_sets=("odd",))


def test_notebook_example_is_a_training_image_the_run_confounds(tiny_manifest):
    manifest, tag = load_manifest(tiny_manifest), get_confounder("tag")
    # p = 0.3: round(0.3 * 7) = 2 of the pool's positives, only one of them a training image
    # (confounding the training rows alone would put it on round(0.3 * 5) = 2 others).
    confounded = _confounded_ids(_run_rows(tiny_manifest, "tag", 0.3, 0)["train"])
    assert len(confounded) == 1
    assert example_row(manifest, tag, 0.3, 0, 0)["image_id"] == confounded[0]
    # p = 0: no image is confounded; any training positive shows the clean/confounded pair.
    example = example_row(manifest, tag, 0.0, 0, 0)
    assert example["label"] == 1 and manifest.rows(0, "train")["image_id"].eq(example["image_id"]).any()


def test_test_sets_come_from_their_own_roles_where_the_manifest_has_them(tmp_path):
    # A manifest with a fixed o.o.d. test set (role test_ood, as the paper's sex task): a run
    # draws o.o.d. from it and i.i.d./clean from "test"; export and counts must do the same.
    roles = ["train"] * 10 + ["val"] * 4 + ["test"] * 6 + ["test_ood"] * 8
    path = _write_manifest(tmp_path / "src", roles, "FM" * 14)
    manifest = load_manifest(path)
    out = export_confounded(path, "tag", 1.0, seed=0, fold=0, out_dir=tmp_path / "out").table
    ood = out[out["fold_0"] == "test_ood"]
    assert sorted(ood["source_image_id"]) == sorted(manifest.rows(0, "test_ood")["image_id"])
    assert ood["confounded"].equals(ood["label"] == 0)
    for role in ("test", "test_clean"):
        assert sorted(out.loc[out["fold_0"] == role, "source_image_id"]) == sorted(
            manifest.rows(0, "test")["image_id"])
    counts = prevalence_counts(manifest, [get_confounder("tag")], 1.0, 0, 0).set_index("set")
    assert counts.loc["test ood", ["rows", "confounded negatives"]].tolist() == [8, 4]
    assert counts.loc["test iid", ["rows", "confounded positives"]].tolist() == [6, 3]

    # Without "test" rows a run has only the o.o.d. set: export writes that and refuses iid.
    only_ood = _write_manifest(tmp_path / "only", ["train"] * 10 + ["val"] * 4 + ["test_ood"] * 8,
                               "FM" * 11)
    table = export_confounded(only_ood, "tag", 1.0, 0, 0, tmp_path / "o1").table
    assert set(table["fold_0"]) == {"train", "val", "test_ood"}
    assert list(prevalence_counts(load_manifest(only_ood), [get_confounder("tag")], 1.0, 0, 0)
                ["set"]) == ["train", "val", "test ood"]
    with pytest.raises(ConfounderError, match=r"no rows for test set\(s\) \['iid'\]"):
        export_confounded(only_ood, "tag", 1.0, 0, 0, tmp_path / "o2", test_sets=("iid", "ood"))


def test_counts_report_a_confounder_a_run_cannot_use(tmp_path):
    # Every positive is F and every negative M: no male positive for the sex pools, so a run
    # refuses it. The table says so in one row and still counts the other confounders.
    path = _write_manifest(tmp_path / "src", ["train"] * 10 + ["val"] * 4 + ["test"] * 6, "FM" * 10)
    counts = prevalence_counts(load_manifest(path), [get_confounder(n) for n in ("sex", "tag")],
                               0.5, 0, 0)
    sex = counts[counts["confounder"] == "sex"]
    assert sex["set"].tolist() == ["all"] and "sampled confounder 'sex'" in sex["error"].iloc[0]
    assert counts.loc[counts["confounder"] == "tag", "set"].tolist() == [
        "train", "val", "test iid", "test ood", "test clean"]


@pytest.mark.numerics
def test_export_and_counts_are_what_a_real_run_uses(phantom_cxr, tmp_path):
    p, seed = 0.5, 812
    config = RunConfig(manifest=str(phantom_cxr), confounder="tag", p=p, seed=seed,
                       source="random", arch="tf_efficientnet_lite0", image_size=32, epochs=1,
                       batch_size=16, device="cpu", runs_dir=str(tmp_path / "runs"))
    run_dir = execute_run(config, progress=False, cache_dir=tmp_path / "cache", n_boot=10)
    sizes = json.loads((run_dir / "config.json").read_text())["split_sizes"]
    manifest = load_manifest(phantom_cxr)
    # The pooled rule matters on this fold: 16 training positives are confounded in the run,
    # 17 if the training rows were confounded on their own (the old export and notebook 02).
    alone = apply_prevalence(manifest.rows(0, "train"), get_confounder("tag"), p, seed, "train")
    assert sizes["train"]["n_confounded"] == 16 != int(alone["confounded"].sum())

    exported = export_confounded(manifest, "tag", p, seed, 0, tmp_path / "export").table
    counts = prevalence_counts(manifest, [get_confounder("tag")], p, seed, 0).set_index("set")
    for role, name, set_name in [("train", "train", "train"), ("val", "val", "val"),
                                 ("test", "iid", "test iid"), ("test_ood", "ood", "test ood"),
                                 ("test_clean", "clean", "test clean")]:
        rows = exported[exported["fold_0"] == role]
        measured = {"n": len(rows), "n_pos": int(rows["label"].sum()),
                    "n_confounded": int(rows["confounded"].sum())}
        assert measured == sizes[name], role
        count = counts.loc[set_name]
        assert (count["rows"], count["positives"]) == (sizes[name]["n"], sizes[name]["n_pos"])
        assert count["confounded positives"] + count["confounded negatives"] == \
            sizes[name]["n_confounded"]


def test_exported_images_are_the_pixels_a_run_trains_on(tiny_manifest, tmp_path):
    """The tag acts on the stored 48 px image, then the image is resized to the input: the
    exported image is the training pipeline's, pixel for pixel."""
    from sm_utils.data import ConfoundedImageDataset, ImageCache

    out = export_confounded(tiny_manifest, "tag", 1.0, seed=5, fold=0, out_dir=tmp_path / "out",
                            image_size=32, resize="nearest")
    manifest = load_manifest(tiny_manifest)
    rows = _run_rows(tiny_manifest, "tag", 1.0, 5)["train"].reset_index(drop=True)
    cache = ImageCache.for_manifest(manifest, 32, tmp_path / "cache", resize="nearest")
    data = ConfoundedImageDataset(rows, cache, confounder=get_confounder("tag"), seed=5,
                                  root=manifest.root, resize="nearest")
    exported = out.table.set_index("image_id")
    for i, image_id in enumerate(rows["image_id"]):
        pixels = load_grey(tmp_path / "out" / exported.loc[image_id, "path"])
        assert np.array_equal(pixels, data.image(i)), image_id
    assert rows["confounded"].any()
