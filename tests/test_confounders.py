"""Registry, exact prevalence, test-set placement and bad input (issue 4, items 1, 4, 7, 8)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from sm_utils.confounders import (
    CATEGORIES,
    PREVALENCE_GRID,
    Confounder,
    ConfounderError,
    apply_prevalence,
    confounder_table,
    get_confounder,
    list_confounders,
    n_confounded,
    register_confounder,
)
from sm_utils.confounders.registry import _REGISTRY


def make_rows(n_pos: int, n_neg: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    n = n_pos + n_neg
    return pd.DataFrame({
        "image_id": [f"img{i:04d}" for i in range(n)],
        "patient_id": [f"p{i // 2}" for i in range(n)],
        "label": [1] * n_pos + [0] * n_neg,
        "sex": rng.choice(["F", "M"], size=n),
        "age": rng.integers(20, 90, size=n),
    })


# --- registry ------------------------------------------------------------------------------

def test_registry_has_the_paper_and_at_least_four_more():
    names = set(list_confounders())
    paper = {"tag", "lowpass", "xray_noise", "ct_noise", "xray_noise_ct", "sex", "age"}
    assert paper <= names
    assert len(names - paper) >= 4
    table = confounder_table()
    assert set(table["category"]) <= set(CATEGORIES)
    assert table["description"].str.len().min() > 40  # a real sentence for every one
    assert set(list_confounders("sampled")) == {"sex", "age", "view"}


def test_get_confounder_fills_defaults_and_overrides():
    conf = get_confounder("tag", strength=0.5, text="L", font_size=32)
    assert isinstance(conf, Confounder) and conf.kind == "synthetic"
    assert conf.category == "environment/marker"
    assert conf.params["text"] == "L" and conf.params["font_size"] == 32.0
    assert conf.params["position"] == (200.0, 200.0) and conf.strength == 0.5
    assert conf.spec()["name"] == "tag"


def test_unknown_confounder_lists_valid_names():
    with pytest.raises(ConfounderError) as err:
        get_confounder("tagg")
    for name in ("tag", "lowpass", "xray_noise", "sex"):
        assert name in str(err.value)


def test_bad_parameters_are_rejected():
    with pytest.raises(ConfounderError, match="does not take parameter.*font_size"):
        get_confounder("tag", fontsize=10)
    with pytest.raises(ConfounderError, match="must be like"):
        get_confounder("tag", font_size="big")
    with pytest.raises(ConfounderError, match=r"strength must be a number in \[0.0, 1.0\]"):
        get_confounder("tag", strength=1.5)
    with pytest.raises(ConfounderError, match="strength"):
        get_confounder("lowpass", strength=float("nan"))
    # a parameter with a fixed set of values is refused when built, before any image
    with pytest.raises(ConfounderError, match=r"'ct_noise': backend must be one of "
                                              r"\['nufft', 'torch', 'skimage'\]; got 'astra'"):
        get_confounder("ct_noise", backend="astra")
    with pytest.raises(ConfounderError, match="dose_scaling must be one of"):
        get_confounder("xray_noise", dose_scaling="volume")
    assert get_confounder("ct_noise", backend="skimage").params["backend"] == "skimage"


def test_adding_a_confounder_is_a_function_plus_registration():
    @register_confounder("test_invert", category="environment/processing",
                         description="Inverted polarity, as some archives store radiographs.",
                         defaults={"level": 255})
    def invert(image, rng, *, strength, level):
        return (level - image).astype(np.uint8)

    try:
        conf = get_confounder("test_invert")
        image = np.arange(64, dtype=np.uint8).reshape(8, 8)
        assert np.array_equal(conf.apply(image, conf.image_rng(0, "a")), 255 - image)
        assert "test_invert" in list_confounders()
        with pytest.raises(ConfounderError, match="already registered"):
            register_confounder("test_invert", invert, category="environment/processing",
                                description="again")
        with pytest.raises(ConfounderError, match="category must be one of"):
            register_confounder("test_other", invert, category="hospital", description="x")
    finally:
        _REGISTRY.pop("test_invert", None)


def test_sampled_confounder_has_no_pixel_function():
    with pytest.raises(ConfounderError, match="sampled.*apply_prevalence"):
        get_confounder("sex").apply(np.zeros((16, 16), np.uint8), np.random.default_rng(0))


# --- synthetic prevalence -------------------------------------------------------------------

@pytest.mark.parametrize("n_pos, n_neg", [(99, 232), (10, 7), (3, 2), (1, 1), (0, 5)])
@pytest.mark.parametrize("p", PREVALENCE_GRID)
def test_train_counts_are_exact(p, n_pos, n_neg):
    rows = make_rows(n_pos, n_neg)
    out = apply_prevalence(rows, get_confounder("tag"), p, seed=812, test_set="train")
    assert len(out) == len(rows) and out.index.equals(rows.index)
    assert out["confounded"].dtype == bool
    assert out.loc[out["label"] == 1, "confounded"].sum() == int(np.floor(p * n_pos + 0.5))
    assert not out.loc[out["label"] == 0, "confounded"].any()


def test_rounding_is_half_up_and_float_safe():
    assert [n_confounded(0.5, n) for n in (1, 3, 5, 7)] == [1, 2, 3, 4]
    assert n_confounded(0.1, 25) == 3 and n_confounded(0.2, 99) == 20
    assert n_confounded(0.8, 99) == 79 and n_confounded(1.0, 99) == 99


def test_iid_ood_clean_placement():
    rows = make_rows(20, 30)
    conf = get_confounder("lowpass")
    iid = apply_prevalence(rows, conf, 0.2, seed=0, test_set="iid")
    ood = apply_prevalence(rows, conf, 0.2, seed=0, test_set="ood")
    clean = apply_prevalence(rows, conf, 0.2, seed=0, test_set="clean")
    train = apply_prevalence(rows, conf, 0.2, seed=0, test_set="train")
    assert iid["confounded"].sum() == 4 and iid["confounded"].equals(train["confounded"])
    assert ood["confounded"].equals(ood["label"] == 0)  # every negative, no positive
    assert not clean["confounded"].any() and len(clean) == len(rows)


def test_selection_is_deterministic_nested_and_seed_dependent():
    rows = make_rows(50, 10)
    conf = get_confounder("tag")

    def chosen(p, seed, rows=rows, conf=conf):
        out = apply_prevalence(rows, conf, p, seed=seed, test_set="train")
        return set(out.loc[out["confounded"], "image_id"])

    assert chosen(0.2, 1) == chosen(0.2, 1)
    assert chosen(0.1, 1) < chosen(0.2, 1) < chosen(0.5, 1)  # nested across p
    assert chosen(0.2, 1) != chosen(0.2, 2)
    # Order of the rows does not matter: the choice follows image ids, not positions.
    shuffled = rows.sample(frac=1.0, random_state=3)
    out = apply_prevalence(shuffled, conf, 0.2, seed=1, test_set="train")
    assert set(out.loc[out["confounded"], "image_id"]) == chosen(0.2, 1)
    # Another confounder picks other images.
    other = apply_prevalence(rows, get_confounder("lowpass"), 0.2, seed=1, test_set="train")
    assert set(other.loc[other["confounded"], "image_id"]) != chosen(0.2, 1)


def test_inject_uses_baseline_for_clean_rows():
    conf = get_confounder("xray_noise")
    image = np.full((64, 64), 100, np.uint8)
    clean = conf.inject(image, False, seed=0, image_id="a")
    noisy = conf.inject(image, True, seed=0, image_id="a")
    assert not np.array_equal(clean, image)  # every image gets the normal-dose noise
    assert np.array_equal(clean, conf.baseline(image, conf.image_rng(0, "a")))
    assert np.array_equal(noisy, conf.apply(image, conf.image_rng(0, "a")))
    tag = get_confounder("tag")
    assert np.array_equal(tag.inject(image, False, seed=0, image_id="a"), image)


# --- sampled prevalence ---------------------------------------------------------------------

def sex_rows(f_pos, m_pos, f_neg, m_neg):
    groups = [("F", 1, f_pos), ("M", 1, m_pos), ("F", 0, f_neg), ("M", 0, m_neg)]
    records = [(sex, label) for sex, label, n in groups for _ in range(n)]
    return pd.DataFrame({
        "image_id": [f"s{i:03d}" for i in range(len(records))],
        "patient_id": [f"p{i}" for i in range(len(records))],
        "label": [label for _, label in records],
        "sex": [sex for sex, _ in records],
    })


def counts(out):
    return {(s, int(y)): int(n) for (s, y), n in out.groupby(["sex", "label"]).size().items()}


@pytest.mark.parametrize("p", PREVALENCE_GRID)
def test_sex_train_pool_matches_the_paper(p):
    rows = sex_rows(f_pos=30, m_pos=25, f_neg=40, m_neg=35)
    out = apply_prevalence(rows, get_confounder("sex"), p, seed=812, test_set="train",
                           n_positives=20, n_negatives=20)
    k = int(np.floor(p * 20 + 0.5))
    got = counts(out)
    assert got.get(("F", 1), 0) == k and got.get(("M", 1), 0) == 20 - k
    assert got.get(("M", 0), 0) == 20 and got.get(("F", 0), 0) == 0
    assert out["confounded"].equals(out["sex"] == "F")
    # Correlation between "female" and "positive" rises with p: phi = sqrt(p / (2 - p)).
    if 0 < p:
        phi = np.corrcoef(out["confounded"], out["label"])[0, 1]
        assert phi == pytest.approx(np.sqrt((k / 20) / (2 - k / 20)), abs=1e-9)


def test_sex_ood_and_clean_sets():
    rows = sex_rows(f_pos=30, m_pos=25, f_neg=40, m_neg=35)
    conf = get_confounder("sex")
    ood = apply_prevalence(rows, conf, 1.0, seed=0, test_set="ood")
    assert counts(ood) == {("M", 1): 25, ("F", 0): 40}  # largest feasible by default
    clean = apply_prevalence(rows, conf, 1.0, seed=0, test_set="clean")
    assert counts(clean) == {("F", 1): 25, ("M", 1): 25, ("F", 0): 35, ("M", 0): 35}
    assert abs(np.corrcoef(clean["confounded"], clean["label"])[0, 1]) < 1e-9


def test_sex_default_pool_is_largest_feasible_for_every_p():
    rows = sex_rows(f_pos=30, m_pos=25, f_neg=40, m_neg=35)
    sizes = {p: counts(apply_prevalence(rows, get_confounder("sex"), p, 0, "train"))
             for p in PREVALENCE_GRID}
    for got in sizes.values():
        assert got.get(("F", 1), 0) + got.get(("M", 1), 0) == 25  # min(F+, M+)
        assert got[("M", 0)] == 35


def test_sampled_pool_too_large_says_how_many_exist():
    rows = sex_rows(f_pos=5, m_pos=25, f_neg=40, m_neg=35)
    with pytest.raises(ConfounderError) as err:
        apply_prevalence(rows, get_confounder("sex"), 1.0, seed=0, test_set="train",
                         n_positives=20, n_negatives=20)
    message = str(err.value)
    assert "20 needed for value+ but 5 exist" in message
    assert "5 positive sex=F" in message and "n_positives=5" in message


def test_sampled_attribute_missing_lists_columns():
    rows = sex_rows(5, 5, 5, 5).drop(columns=["sex"])
    with pytest.raises(ConfounderError, match="needs attribute column 'sex'.*image_id"):
        apply_prevalence(rows, get_confounder("sex"), 0.5, seed=0, test_set="train")


def test_age_bins_and_other_attributes():
    rows = make_rows(60, 60, seed=4)
    conf = get_confounder("age")
    out = apply_prevalence(rows, conf, 0.8, seed=0, test_set="train", n_positives=20,
                           n_negatives=15)
    old = out["age"] >= 60
    assert out["confounded"].equals(old)
    assert old[out["label"] == 1].sum() == 16 and not old[out["label"] == 0].any()
    # Any manifest attribute works the same way (here: sex through the generic parameters).
    by_view = get_confounder("view", attribute="sex", value="F", reference="M")
    picked = apply_prevalence(rows, by_view, 1.0, seed=0, test_set="train")
    assert (picked.loc[picked["label"] == 1, "sex"] == "F").all()


# --- bad input -----------------------------------------------------------------------------

@pytest.mark.parametrize("p", [-0.1, 1.5, "0.5", True])
def test_prevalence_outside_unit_interval(p):
    with pytest.raises(ConfounderError, match=r"prevalence p must be a number in \[0, 1\]"):
        apply_prevalence(make_rows(3, 3), get_confounder("tag"), p, seed=0, test_set="train")


def test_unknown_test_set_and_bad_seed_and_rows():
    rows = make_rows(3, 3)
    with pytest.raises(ConfounderError, match="valid: train, iid, ood, clean"):
        apply_prevalence(rows, get_confounder("tag"), 0.5, seed=0, test_set="test")
    with pytest.raises(ConfounderError, match="seed must be a non-negative integer"):
        apply_prevalence(rows, get_confounder("tag"), 0.5, seed=-1, test_set="train")
    with pytest.raises(ConfounderError, match="lack column"):
        apply_prevalence(rows.drop(columns=["label"]), get_confounder("tag"), 0.5, 0, "train")
    with pytest.raises(ConfounderError, match="only apply to sampled"):
        apply_prevalence(rows, get_confounder("tag"), 0.5, 0, "train", n_positives=2)


def test_check_sampled_reports_the_designed_correlation():
    from sm_utils.confounders.checks import check_sampled

    rows = sex_rows(f_pos=30, m_pos=25, f_neg=40, m_neg=35)
    records = check_sampled(get_confounder("sex"), rows, 0.8, seed=0)
    assert [r["measure"].split(":")[0] for r in records] == ["train", "ood", "clean"]
    assert all(r["passed"] for r in records)
    phi = {r["measure"].split(":")[0]: r["confounded"] for r in records}
    assert phi["ood"] == pytest.approx(-1.0) and phi["clean"] == pytest.approx(0.0, abs=1e-9)
    # 20 F / 5 M positives vs 35 M negatives: phi = 20 * 35 / sqrt(25 * 35 * 20 * 40).
    assert phi["train"] == pytest.approx(700 / np.sqrt(25 * 35 * 20 * 40))
    too_few = check_sampled(get_confounder("sex", n_positives=10), sex_rows(0, 5, 5, 5), 0.5, 0)
    assert not too_few[0]["passed"] and "0 exist" in too_few[0]["measure"]


def test_cached_prepare_is_identical_and_reads_back(tmp_path):
    conf = get_confounder("xray_noise", resolution="input").with_cache(tmp_path)
    image = np.arange(32 * 32, dtype=np.uint32).reshape(32, 32).astype(np.uint8)
    first = conf.prepare(image, True, seed=0, image_id="a", size=32, resize="nearest")
    assert np.array_equal(first, get_confounder("xray_noise").inject(image, True, 0, "a"))
    files = list(tmp_path.rglob("*.png"))
    assert len(files) == 1
    assert np.array_equal(conf.prepare(image, True, 0, "a", size=32, resize="nearest"), first)
    from PIL import Image
    Image.fromarray(np.zeros_like(image)).save(files[0])  # prove the next call reads the file
    assert not conf.prepare(image, True, 0, "a", size=32, resize="nearest").any()
    conf.prepare(image, False, 0, "a", size=32, resize="nearest")  # clean rows: their own file
    conf.prepare(image, True, 1, "a", size=32, resize="nearest")  # and so are other seeds
    assert len(list(tmp_path.rglob("*.png"))) == 3
    assert conf.spec() == get_confounder("xray_noise", resolution="input").spec()  # not a parameter


def test_cached_prepare_with_a_file_key_never_decodes_the_original(tmp_path):
    conf = get_confounder("lowpass").with_cache(tmp_path)
    image = np.random.default_rng(0).integers(0, 256, (64, 64)).astype(np.uint8)
    loads = []

    def load():
        loads.append(1)
        return image

    first = conf.prepare(load, True, 0, "a", size=32, resize="nearest", original_key="file-1")
    again = conf.prepare(load, True, 0, "a", size=32, resize="nearest", original_key="file-1")
    assert np.array_equal(first, again) and len(loads) == 1
    conf.prepare(load, True, 0, "a", size=32, resize="nearest", original_key="file-2")
    assert len(loads) == 2  # another file content: computed again


def test_prepare_acts_at_the_confounders_resolution():
    """native: confound the stored image, then resize; input: resize, then confound; N: the
    paper's OpenCV bilinear to N px first."""
    from sm_utils.imaging import resize_grey

    image = np.random.default_rng(1).integers(0, 256, (128, 128)).astype(np.uint8)
    native = get_confounder("lowpass")
    assert native.resolution == "native"
    expected = resize_grey(native.inject(image, True, 0, "a"), 32, "nearest")
    assert np.array_equal(native.prepare(image, True, 0, "a", size=32, resize="nearest"), expected)
    at_input = get_confounder("lowpass", resolution="input")
    expected = at_input.inject(resize_grey(image, 32, "nearest"), True, 0, "a")
    assert np.array_equal(at_input.prepare(image, True, 0, "a", size=32, resize="nearest"),
                          expected)
    noise = get_confounder("xray_noise")
    assert noise.resolution == 512
    small = get_confounder("xray_noise", resolution=64)
    expected = resize_grey(small.inject(resize_grey(image, 64, "cv2_linear"), True, 0, "a"), 32,
                           "nearest")
    assert np.array_equal(small.prepare(image, True, 0, "a", size=32, resize="nearest"), expected)
    with pytest.raises(ConfounderError, match="resolution must be 'input'.*got 'full'"):
        get_confounder("tag", resolution="full")
    with pytest.raises(ConfounderError, match="does not take parameter"):
        get_confounder("sex", resolution="native")


def test_sampled_value_absent_from_the_data_is_an_error():
    rows = make_rows(10, 10).assign(view="PA")
    with pytest.raises(ConfounderError, match="without positives or without negatives.*0 negative view=AP"):
        apply_prevalence(rows, get_confounder("view"), 0.5, seed=0, test_set="ood")


def test_the_documented_example_of_adding_a_confounder_runs():
    import textwrap

    import sm_utils.confounders as package

    doc = package.__doc__.split("a small function plus a registration::")[1]
    example = textwrap.dedent(doc.split("\nafter which")[0])
    try:
        exec(compile(example, "sm_utils.confounders docstring", "exec"), {})  # noqa: S102 (our own docs)
        conf = get_confounder("invert", strength=1.0)
        image = np.array([[0, 100], [200, 255]] * 4, np.uint8).repeat(4, axis=1)
        assert np.array_equal(conf.apply(image, conf.image_rng(0, "x")), 255 - image)
    finally:
        _REGISTRY.pop("invert", None)
