import json
import os
from dataclasses import asdict, fields
from pathlib import Path

import pandas as pd
import pytest
import torch

from sm_utils import numerics, runs
from sm_utils.io import stable_hash
from sm_utils.runs import RunConfig, RunError, execute_run

CONTRACT_FIELDS = [
    "manifest", "confounder", "strength", "confounder_params", "p", "fold", "source", "weights",
    "arch", "image_size", "resize", "epochs", "batch_size", "lr", "optimizer", "weight_decay", "patience",
    "augment", "drop_rate", "seed", "mode", "probe", "attribution", "device", "precision", "deterministic",
    "num_workers", "runs_dir",
]


def test_run_config_has_exactly_the_contract_fields():
    assert [f.name for f in fields(RunConfig)] == CONTRACT_FIELDS


def test_run_id_is_a_stable_hash_of_the_result_defining_fields(tmp_path):
    from sm_utils.identity import manifest_digest

    manifest = tmp_path / "m.csv"
    manifest.write_text("image_id\na\n")
    m = str(manifest)
    config = RunConfig(manifest=m, runs_dir="a", device="cpu", num_workers=0)
    identity = {k: v for k, v in asdict(config).items()
                if k not in ("runs_dir", "device", "precision", "deterministic", "num_workers",
                             "probe", "attribution", "mode")}
    identity.update(manifest=manifest_digest(manifest), weights=None)
    assert config.run_id == stable_hash(identity) and len(config.run_id) == 12
    # Mechanism measurements are extra outputs: off they leave the id alone, on they make a new run.
    assert RunConfig(manifest=m, probe=True).run_id not in (config.run_id,
                                                           RunConfig(manifest=m, attribution=True).run_id)
    same = RunConfig(manifest=m, runs_dir="elsewhere", device="cuda", num_workers=8, p=0.5,
                     precision="fp32", deterministic=True)
    assert same.run_id == config.run_id
    assert RunConfig(manifest=m, lr=1e-4).run_id != config.run_id
    # Fine-tuning is the default mode, so every run from before modes keeps its id; a linear
    # probe is another run.
    assert RunConfig(manifest=m, mode="finetune").run_id == config.run_id
    assert RunConfig(manifest=m, mode="linear_probe").identity()["mode"] == "linear_probe"
    assert RunConfig(manifest=m, mode="linear_probe").run_id != config.run_id
    assert RunConfig(manifest=m, p=1).run_id == RunConfig(manifest=m, p=1.0).run_id
    # Without a confounder p and strength change nothing: one run serves every p.
    none = [RunConfig(manifest=m, confounder="none", p=p) for p in (0.0, 0.5, 1.0)]
    assert len({c.run_id for c in none}) == 1
    # The manifest is named by its content: a copy elsewhere is the same run, an edit is not.
    copy = tmp_path / "other" / "m.csv"
    copy.parent.mkdir()
    copy.write_text(manifest.read_text())
    assert RunConfig(manifest=str(copy)).run_id == RunConfig(manifest=m).run_id
    manifest.write_text("image_id\nb\n")
    assert RunConfig(manifest=m).run_id != RunConfig(manifest=str(copy)).run_id
    # So are the weights.
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"1")
    with_weights = RunConfig(manifest=str(copy), weights=str(weights)).run_id
    weights.write_bytes(b"2")
    assert RunConfig(manifest=str(copy), weights=str(weights)).run_id != with_weights


def test_bad_configs_are_refused():
    with pytest.raises(RunError, match="valid"):
        RunConfig.from_dict({"manifest": "m.csv", "learning_rate": 0.1})
    with pytest.raises(RunError, match=r"\[0, 1\]"):
        RunConfig(p=1.5)
    with pytest.raises(RunError, match="resize must be one of.*'nearest'"):
        RunConfig(resize="lanczos")
    with pytest.raises(RunError, match=r"mode must be one of \['finetune', 'linear_probe'\].*"
                                       r"got 'frozen'"):
        RunConfig(mode="frozen")


def _config(manifest, tmp_path, **overrides):
    values = {"manifest": str(manifest), "confounder": "tag", "p": 1.0, "source": "random",
              "arch": "tf_efficientnet_lite0", "image_size": 32, "epochs": 2, "batch_size": 16,
              "seed": 7, "device": "cpu", "runs_dir": str(tmp_path / "runs")}
    values.update(overrides)
    return RunConfig(**values)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("image_cache")


@pytest.mark.numerics
def test_run_directory_is_complete_and_metrics_follow_the_contract(phantom_cxr, tmp_path,
                                                                   cache_dir):
    config = _config(phantom_cxr, tmp_path, source="imagenet_lite0", arch=None)
    run_dir = execute_run(config, progress=False, cache_dir=cache_dir, n_boot=50)
    assert run_dir == tmp_path / "runs" / config.run_id
    assert {p.name for p in run_dir.iterdir()} == {
        "config.json", "history.csv", "predictions.csv", "curves.png", "metrics.json"}

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["run_id"] == config.run_id and metrics["config"] == asdict(config)
    assert set(metrics["test_sets"]) == {"iid", "ood", "clean"}
    for entry in metrics["test_sets"].values():
        assert set(entry) == {"auc", "auc_ci_low", "auc_ci_high", "micro_auc", "keras_auc", "n",
                              "n_patients", "n_pos", "n_confounded", "group_auc"}
        assert 0 <= entry["auc"] <= 1 and "sex=F" in entry["group_auc"]
    sets = metrics["test_sets"]
    assert sets["clean"]["n_confounded"] == 0
    assert sets["iid"]["n_confounded"] == sets["iid"]["n_pos"]  # p = 1: every positive tagged
    assert sets["ood"]["n_confounded"] == sets["ood"]["n"] - sets["ood"]["n_pos"]
    assert 1 <= metrics["best_epoch"] <= metrics["epochs_run"] <= 2

    predictions = pd.read_csv(run_dir / "predictions.csv")
    assert len(predictions) == sum(s["n"] for s in sets.values())
    assert {"test_set", "image_id", "label", "score", "confounded", "sex"} <= set(predictions)
    history = pd.read_csv(run_dir / "history.csv")
    assert list(history.columns) == ["epoch", "train_loss", "val_loss", "val_auc", "seconds"]

    resolved = json.loads((run_dir / "config.json").read_text())
    assert resolved["source"]["weights_sha256"] and len(resolved["source"]["weights_sha256"]) == 64
    assert resolved["versions"]["torch"] and resolved["versions"]["timm"]
    assert "commit" in resolved["git"]
    assert resolved["preprocessing"]["name"] == "efficientnet_lite"
    assert resolved["device"]["deterministic"] is True
    recorded = resolved["device"]["numerics"]  # the CPU kernels it ran (sm_utils.numerics)
    assert recorded["mode"] == numerics.mode()
    assert recorded["pinned"] is (numerics.profile() is not None)
    if recorded["pinned"]:
        assert recorded["aten_capability"] == numerics.ATEN_OF_PROFILE[recorded["profile"]]
        assert recorded["env"]["MKL_CBWR"] == "COMPATIBLE"


@pytest.mark.numerics
def test_rerun_on_cpu_reproduces_metrics_exactly(phantom_cxr, tmp_path, cache_dir):
    config = _config(phantom_cxr, tmp_path, confounder="xray_noise", p=0.5)
    first = json.loads((execute_run(config, progress=False, cache_dir=cache_dir, n_boot=50)
                        / "metrics.json").read_text())
    again = _config(phantom_cxr, tmp_path, confounder="xray_noise", p=0.5,
                    runs_dir=str(tmp_path / "again"))
    second = json.loads((execute_run(again, progress=False, cache_dir=cache_dir, n_boot=50)
                         / "metrics.json").read_text())
    assert first["test_sets"] == second["test_sets"]
    assert first["best_epoch"] == second["best_epoch"]


@pytest.mark.numerics
def test_sampled_confounder_and_no_confounder(phantom_cxr, tmp_path, cache_dir):
    sex = execute_run(_config(phantom_cxr, tmp_path, confounder="sex", p=1.0, epochs=1),
                      progress=False, cache_dir=cache_dir, n_boot=20)
    sets = json.loads((sex / "metrics.json").read_text())["test_sets"]
    predictions = pd.read_csv(sex / "predictions.csv")
    ood = predictions[predictions["test_set"] == "ood"]
    # o.o.d. for sex reverses the correlation: positives male, negatives female.
    assert set(ood.loc[ood["label"] == 1, "sex"]) == {"M"}
    assert set(ood.loc[ood["label"] == 0, "sex"]) == {"F"}
    assert sets["ood"]["n_confounded"] == (ood["sex"] == "F").sum()

    none = execute_run(_config(phantom_cxr, tmp_path, confounder="none", epochs=1),
                       progress=False, cache_dir=cache_dir, n_boot=20)
    sets = json.loads((none / "metrics.json").read_text())["test_sets"]
    assert all(s["n_confounded"] == 0 for s in sets.values())
    assert sets["iid"]["auc"] == sets["ood"]["auc"] == sets["clean"]["auc"]


@pytest.mark.numerics
def test_slow_confounders_are_computed_once_and_give_the_same_metrics(phantom_cxr, tmp_path,
                                                                      monkeypatch):
    from sm_utils.confounders import get_confounder

    conf_cache = tmp_path / "image_cache" / "confounders" / "ct_noise"
    overrides = {"confounder": "ct_noise", "p": 0.5, "epochs": 2,
                 "confounder_params": {"n_angles": 16}}
    config = _config(phantom_cxr, tmp_path, **overrides)
    assert get_confounder("ct_noise").memoise and not get_confounder("tag").memoise
    first = execute_run(config, progress=False, cache_dir=tmp_path / "image_cache", n_boot=20)
    cached = sorted(conf_cache.rglob("*.png"))
    predictions = pd.read_csv(first / "predictions.csv")
    # one file per distinct (image, confounded) pair seen, whatever the epochs: train and val
    # images, plus the test images in each confounded state they appear in
    n_train_val = sum(json.loads((first / "config.json").read_text())["split_sizes"][s]["n"]
                      for s in ("train", "val"))
    n_test = len(predictions[["image_id", "confounded"]].drop_duplicates())
    assert len(cached) == n_train_val + n_test
    mtimes = [path.stat().st_mtime_ns for path in cached]
    # the rerun reads the cache (nothing rewritten) and gets the metrics of the first run
    second = execute_run(_config(phantom_cxr, tmp_path / "again", **overrides), progress=False,
                         cache_dir=tmp_path / "image_cache", n_boot=20)
    assert [path.stat().st_mtime_ns for path in sorted(conf_cache.rglob("*.png"))] == mtimes
    metrics = [json.loads((d / "metrics.json").read_text())["test_sets"] for d in (first, second)]
    assert metrics[0] == metrics[1]


@pytest.mark.numerics
def test_interrupted_run_leaves_no_metrics(phantom_cxr, tmp_path, cache_dir, monkeypatch):
    config = _config(phantom_cxr, tmp_path, epochs=1)
    run_dir = config.run_dir()
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.json").write_text("{}")  # from an older, now invalid, run

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runs, "plot_curves", crash)
    with pytest.raises(KeyboardInterrupt):
        execute_run(config, progress=False, cache_dir=cache_dir, n_boot=20)
    assert not (run_dir / "metrics.json").exists()
    assert (run_dir / "predictions.csv").exists()
    assert not [p for p in run_dir.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.numerics
@pytest.mark.parametrize("mode", ["linear_probe", "finetune"])
def test_a_linear_probe_trains_only_the_head(phantom_cxr, tmp_path, cache_dir, mode):
    """Linear probing leaves every backbone tensor, batch-norm statistics included, byte for
    byte as loaded and trains the head; fine-tuning (the control) changes the backbone."""
    from sm_utils.sources import create_model
    from sm_utils.training import classifier, reset_head

    config = _config(phantom_cxr, tmp_path, source="imagenet_lite0", arch=None, mode=mode,
                     epochs=1)
    torch.manual_seed(config.seed)  # the model as train_run starts it: loaded, a fresh head
    loaded, _ = create_model("imagenet_lite0", num_classes=2, drop_rate=config.drop_rate)
    reset_head(loaded)
    head = {f"{name}.{key}" for name, module in loaded.named_modules()
            if module is classifier(loaded) for key in ("weight", "bias")}
    with runs.train_run(config, progress=False, cache_dir=cache_dir) as run:
        trained = run.model.state_dict()
        assert run.result.epochs_run == 1
    before = loaded.state_dict()
    assert set(trained) == set(before) and head == {"classifier.weight", "classifier.bias"}
    changed = {k for k in before if k not in head
               and trained[k].cpu().numpy().tobytes() != before[k].numpy().tobytes()}
    if mode == "linear_probe":
        assert changed == set()
        assert not torch.equal(trained["classifier.weight"], before["classifier.weight"])
    else:  # the control: the same check sees a fine-tuned backbone
        assert any(".running_mean" in k for k in changed) and any(k.endswith(".weight")
                                                                for k in changed)


@pytest.mark.numerics
def test_notebook_03_runs_headless_with_non_default_parameters(phantom_cxr, tmp_path):
    import papermill

    from sm_utils.paths import project_root

    parameters = {"manifest": str(phantom_cxr), "confounder": "lowpass", "strength": 0.5,
                  "p": 1.0, "fold": 1, "source": "random", "arch": "tf_efficientnet_lite0",
                  "image_size": 32, "epochs": 1, "batch_size": 16, "optimizer": "adamw",
                  "augment": False, "seed": 3, "mode": "linear_probe", "device": "cpu",
                  "runs_dir": str(tmp_path)}
    papermill.execute_notebook(
        str(project_root() / "notebooks" / "03_fine_tuning.ipynb"), str(tmp_path / "out.ipynb"),
        parameters=parameters, kernel_name="python3", progress_bar=False)
    # the notebook's own defaults fill the rest (e.g. the demo's confounder_params)
    (path,) = tmp_path.glob("*/metrics.json")
    metrics = json.loads(path.read_text())
    assert metrics["config"]["confounder"] == "lowpass" and metrics["config"]["fold"] == 1
    assert metrics["config"]["optimizer"] == "adamw" and metrics["epochs_run"] == 1
    assert metrics["config"]["mode"] == "linear_probe"
    assert metrics["test_sets"]["iid"]["n_confounded"] == metrics["test_sets"]["iid"]["n_pos"]


@pytest.mark.numerics
def test_device_resident_data_gives_the_same_run_on_cpu(phantom_cxr, tmp_path, cache_dir):
    """The GPU's data path (images kept on the device, augmented there) checked on the CPU,
    where it must reproduce the DataLoader path exactly."""
    config = _config(phantom_cxr, tmp_path / "a", epochs=2, augment=True, p=0.5)
    loaded = execute_run(config, progress=False, cache_dir=cache_dir, n_boot=20)
    resident = execute_run(_config(phantom_cxr, tmp_path / "b", epochs=2, augment=True, p=0.5),
                           progress=False, cache_dir=cache_dir, n_boot=20, resident=True)
    first, second = (json.loads((d / "metrics.json").read_text()) for d in (loaded, resident))
    assert first["test_sets"] == second["test_sets"]
    assert pd.read_csv(loaded / "history.csv").drop(columns="seconds").equals(
        pd.read_csv(resident / "history.csv").drop(columns="seconds"))
    assert json.loads((resident / "config.json").read_text())["device"]["resident_data"] is True


@pytest.mark.numerics
def test_a_run_asked_for_its_mechanisms_needs_the_hook_and_calls_it(phantom_cxr, tmp_path,
                                                                    cache_dir):
    """Runs sit below the mechanisms (docs/ARCHITECTURE.md): the caller hands execute_run the
    hook that measures them, and the run calls it with its fine-tuned model and data."""
    config = _config(phantom_cxr, tmp_path, epochs=1, probe=True)
    with pytest.raises(RunError, match=r"mechanisms=sm_utils\.mechanisms\.measure_run"):
        execute_run(config, progress=False, cache_dir=cache_dir)
    seen = {}

    def hook(run, given):
        seen.update(config=given, test_sets=run.test_sets, model=type(run.model).__name__)
        return {"probe_auc": 0.5}

    run_dir = execute_run(config, progress=False, cache_dir=cache_dir, n_boot=10, mechanisms=hook)
    assert seen["config"] is config and seen["test_sets"] == ["iid", "ood", "clean"]
    assert json.loads((run_dir / "metrics.json").read_text())["mechanisms"] == {"probe_auc": 0.5}
    # without probe/attribution the hook is not called
    seen.clear()
    execute_run(_config(phantom_cxr, tmp_path / "plain", epochs=1), progress=False,
                cache_dir=cache_dir, n_boot=10, mechanisms=hook)
    assert seen == {}


@pytest.mark.parametrize("grid", ["paper_cxr", "paper_ct"])
def test_the_paper_grids_augment_as_the_papers_keras_did(grid):
    """Every cell of the paper's grids augments, shearing by at most 0.1 degree (Keras 2.15
    reads shear_range=0.1 in degrees), with a zoom per axis and edges repeated."""
    import numpy as np

    from sm_utils.grid import expand_cells, load_grid
    from sm_utils.runs import run_augmentation

    spec = load_grid(Path(__file__).resolve().parents[1] / "configs" / f"{grid}.yaml",
                     check_paths=False)
    cells = expand_cells(spec)
    assert cells
    for cell in cells:
        augmentation = run_augmentation(RunConfig.from_dict(cell.params))
        assert augmentation is not None, cell.label()
        assert augmentation.shear_degrees == 0.1 and augmentation.rotation_degrees == 10.0
        assert augmentation.shift == 0.1 and augmentation.zoom == 0.1
    rng = np.random.default_rng(0)
    shears = [augmentation.sample(rng, 224, 224)["shear"] for _ in range(1000)]
    assert max(abs(s) for s in shears) <= 0.1


def test_images_stay_on_the_gpu_only_within_their_memory_budget(monkeypatch):
    """NIH ChestX-ray14 at 224 px (112,120 images: 5.24 GiB as uint8) on an 80 GiB GPU: resident
    for one run per GPU (budget 20 GiB); with 4 runs sharing it (5 GiB each) the pinned-memory
    DataLoader with workers instead; asked-for workers are honoured."""
    from types import SimpleNamespace

    from sm_utils.runs import FALLBACK_WORKERS, data_placement

    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: SimpleNamespace(total_memory=80 * 2**30))
    gpu = torch.device("cuda")
    monkeypatch.delenv("SM_RUNS_PER_GPU", raising=False)
    alone = data_placement(gpu, 112_120, 224)
    assert alone["resident"] and alone["budget_bytes"] == 20 * 2**30
    monkeypatch.setenv("SM_RUNS_PER_GPU", "4")
    shared = data_placement(gpu, 112_120, 224)
    assert not shared["resident"] and shared["budget_bytes"] == 5 * 2**30
    assert shared["num_workers"] == min(FALLBACK_WORKERS, len(os.sched_getaffinity(0)))
    assert "5.24 GiB of images exceed the budget of 5.00 GiB" in shared["reason"]
    assert data_placement(gpu, 1000, 64)["resident"]  # a small data set still fits
    asked = data_placement(gpu, 1000, 64, num_workers=3)
    assert not asked["resident"] and asked["num_workers"] == 3
    assert data_placement(torch.device("cpu"), 1000, 64, num_workers=2) == {
        "resident": False, "num_workers": 2, "bytes": 1000 * 64 * 64, "reason": "CPU run"}
