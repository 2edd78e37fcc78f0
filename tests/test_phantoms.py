import hashlib

import numpy as np
import pytest

from sm_utils.datasets import build_dataset, list_datasets
from sm_utils.manifest import ManifestError, load_manifest
from sm_utils.phantoms import (
    PhantomConfig,
    phantom_table,
    render_ct_hu,
    render_cxr,
    render_row,
    sample_patient,
)


def digest(folder):
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*.png")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def test_builders_are_registered():
    assert {"phantom_cxr", "phantom_ct"} <= set(list_datasets())


@pytest.mark.parametrize("name", ["phantom_cxr", "phantom_ct"])
def test_same_seed_gives_same_bytes(tmp_path, name):
    a = build_dataset(name, tmp_path / "a", n_patients=24, image_size=64, seed=5, n_folds=2,
                      test_fraction=0.25, val_fraction=0.25)
    b = build_dataset(name, tmp_path / "b", n_patients=24, image_size=64, seed=5, n_folds=2,
                      test_fraction=0.25, val_fraction=0.25)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert (tmp_path / "a" / "manifest.csv").read_bytes() == (tmp_path / "b" / "manifest.csv").read_bytes()
    c = build_dataset(name, tmp_path / "c", n_patients=24, image_size=64, seed=6, n_folds=2,
                      test_fraction=0.25, val_fraction=0.25)
    assert digest(tmp_path / "a") != digest(tmp_path / "c")
    assert len(a.table) == len(b.table) and len(c.table) > 0


def test_manifest_is_valid_and_has_attributes(phantom_cxr):
    manifest = load_manifest(phantom_cxr)  # validates files, labels, leakage
    table = manifest.table
    assert {"sex", "age", "view"} <= set(manifest.attributes)
    assert set(table["sex"]) == {"F", "M"}
    assert table.groupby("patient_id").size().max() > 1  # several images per patient
    assert 0.2 < table["label"].mean() < 0.5
    assert manifest.folds == [0, 1]


@pytest.mark.parametrize("size", [64, 200, 1024])
def test_any_size_from_64_to_1024(size):
    config = PhantomConfig(image_size=size, seed=1)
    image = render_row(config, 0, 0, 1)
    assert image.shape == (size, size) and image.dtype == np.uint8
    assert image.std() > 20  # real anatomy, not a flat image


def test_sizes_outside_range_are_rejected():
    with pytest.raises(ManifestError, match="from 64 to 1024 px; got 32"):
        render_row(PhantomConfig(image_size=32), 0, 0, 0)


def test_finding_changes_the_lung_region_and_difficulty_scales_it():
    patient = sample_patient(0, 3)
    rng = lambda: np.random.default_rng(11)
    clean = render_cxr(patient, size=128, finding=False, difficulty=0.0, rng=rng()).astype(float)
    easy = render_cxr(patient, size=128, finding=True, difficulty=0.0, rng=rng()).astype(float)
    hard = render_cxr(patient, size=128, finding=True, difficulty=1.0, rng=rng()).astype(float)
    # The opacity is brighter (denser) than the clean lung, more so when easy.
    assert (easy - clean).mean() > (hard - clean).mean() > 0


def test_sex_changes_anatomy_in_a_learnable_way():
    # Female breast shadows raise the brightness of the lower lung fields on average.
    def lower_lung_mean(sex):
        values = []
        for i in range(40):
            patient = sample_patient(1, i)
            if patient.sex != sex:
                continue
            image = render_cxr(patient, size=64, finding=False, difficulty=0.5,
                               rng=np.random.default_rng(i))
            values.append(image[36:52, 8:56].mean())
        return np.mean(values)

    assert lower_lung_mean("F") > lower_lung_mean("M") + 3


def test_ct_nodule_malignant_is_larger():
    patient = sample_patient(0, 1)
    benign = render_ct_hu(patient, size=128, finding=False, difficulty=0.0, rng=np.random.default_rng(2))
    malignant = render_ct_hu(patient, size=128, finding=True, difficulty=0.0, rng=np.random.default_rng(2))
    # Same pose, vessels and noise: the difference is the nodule, which grows when malignant.
    grown = np.abs(malignant - benign) > 300
    assert grown.sum() > 20
    assert -1100 < np.median(benign) < 100  # plausible HU range


def test_table_is_deterministic_and_labels_follow_patients():
    a = phantom_table(PhantomConfig(n_patients=400, seed=2))
    b = phantom_table(PhantomConfig(n_patients=400, seed=2))
    assert a.equals(b)
    assert not a.equals(phantom_table(PhantomConfig(n_patients=400, seed=3)))
    # Sex and age are the patient's (sample_patient), the same on every image of a patient.
    for patient_index, images in a.groupby("patient_index"):
        patient = sample_patient(2, patient_index)
        assert set(images["sex"]) == {patient.sex} and set(images["age"]) == {patient.age}
    # Labels follow the patient's disease: a patient's second image is mostly positive when
    # the first is (85 % of a diseased patient's images are) and rarely when it is not, far
    # from the ~34 % of images that are positive overall.
    pairs = a[a["image_index"] < 2].pivot(index="patient_index", columns="image_index",
                                          values="label").dropna()
    assert len(pairs) > 200
    after_positive = pairs.loc[pairs[0] == 1, 1].mean()
    after_negative = pairs.loc[pairs[0] == 0, 1].mean()
    assert after_positive > 0.7 and after_negative < 0.2
    assert 0.25 < a["label"].mean() < 0.45
