"""Export of a confounded fold as image folders plus manifest (issue 4, item 5)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from sm_utils.confounders import ConfounderError, get_confounder
from sm_utils.export import export_confounded, load_grey
from sm_utils.manifest import Manifest, load_manifest, save_manifest


@pytest.fixture()
def tiny_manifest(tmp_path):
    rng = np.random.default_rng(0)
    roles = ["train"] * 10 + ["val"] * 4 + ["test"] * 6
    labels = [1, 0] * 10
    # Both sexes among positives and negatives of every split (sampled pools need both).
    sexes = "FMMMFFMMFM" + "FMMM" + "FFMMMF"
    rows = []
    for i, (role, label) in enumerate(zip(roles, labels, strict=True)):
        path = f"img/{i}.png"
        (tmp_path / "src" / "img").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(40, 200, (48, 48), dtype=np.uint8)).save(tmp_path / "src" / path)
        rows.append({"image_id": f"i{i}", "path": path, "label": label, "patient_id": f"p{i}",
                     "fold_0": role, "sex": sexes[i]})
    manifest = Manifest(pd.DataFrame(rows), root=tmp_path / "src")
    save_manifest(manifest, tmp_path / "src" / "manifest.csv")
    return tmp_path / "src" / "manifest.csv"


def test_export_writes_confounded_images_and_a_valid_manifest(tiny_manifest, tmp_path):
    out = export_confounded(tiny_manifest, "tag", 0.6, seed=3, fold=0, out_dir=tmp_path / "out",
                            image_size=64)
    again = load_manifest(tmp_path / "out" / "manifest.csv")  # validates files and leakage
    table = again.table
    assert table["fold_0"].value_counts().to_dict() == {
        "train": 10, "val": 4, "test": 6, "test_ood": 6, "test_clean": 6}
    # Train: round(0.6 * 5) = 3 positives confounded; val: round(0.6 * 2) = 1.
    train = table[table["fold_0"] == "train"]
    assert train["confounded"].sum() == 3 and (train.loc[train["confounded"], "label"] == 1).all()
    assert table.loc[table["fold_0"] == "val", "confounded"].sum() == 1
    ood = table[table["fold_0"] == "test_ood"]
    assert ood["confounded"].equals(ood["label"] == 0)
    source = load_manifest(tiny_manifest)
    tag = get_confounder("tag")
    for row in table.itertuples():
        written = load_grey(again.image_path(row.path))
        original = load_grey(source.image_path(f"img/{row.source_image_id[1:]}.png"), 64)
        assert written.shape == (64, 64)
        if row.confounded:
            assert np.array_equal(written, tag.apply(original, None))
        else:
            assert np.array_equal(written, original)
    assert out.meta["confounder"]["name"] == "tag"


def test_export_sampled_confounder_and_bad_test_set(tiny_manifest, tmp_path):
    out = export_confounded(tiny_manifest, "sex", 1.0, seed=0, fold=0, out_dir=tmp_path / "sex",
                            test_sets=("ood",))
    table = out.table
    train = table[table["fold_0"] == "train"]
    assert (train.loc[train["label"] == 1, "sex"] == "F").all()
    assert (train.loc[train["label"] == 0, "sex"] == "M").all()
    with pytest.raises(ConfounderError, match="valid"):
        export_confounded(tiny_manifest, "tag", 0.5, 0, 0, tmp_path / "x", test_sets=("odd",))
