"""Plugins (sm_utils.plugins): loading, who registered each name, duplicates, import errors,
installed plugins found through their entry point, and plugins' code in run ids.

The end-to-end study (its own confounder, source and dataset through `sm validate`, `sm run`,
`sm analyse`, `sm report`) is tests/test_study.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sm_utils import plugins
from sm_utils.confounders import ConfounderError, get_confounder, list_confounders
from sm_utils.confounders import registry as confounder_registry
from sm_utils.datasets import list_datasets
from sm_utils.identity import run_identity
from sm_utils.metrics import MetricError, compute_metrics, list_metrics
from sm_utils.sources import SourceError
from sm_utils.sources import registry as source_registry

BIN = Path(sys.executable).parent


@pytest.fixture
def isolated(monkeypatch):
    """The registries and the plugins' records as they are now, restored after the test."""
    from sm_utils import datasets, metrics

    monkeypatch.setattr(confounder_registry, "_REGISTRY", dict(confounder_registry._REGISTRY))
    monkeypatch.setattr(source_registry, "_SOURCES", dict(source_registry._SOURCES))
    monkeypatch.setattr(datasets, "_BUILDERS", dict(datasets._BUILDERS))
    monkeypatch.setattr(metrics, "_METRICS", dict(metrics._METRICS))
    monkeypatch.setattr(plugins, "_LOADED", dict(plugins._LOADED))
    monkeypatch.setattr(plugins, "_REGISTRATIONS", dict(plugins._REGISTRATIONS))
    monkeypatch.setattr(plugins, "_STATE", dict(plugins._STATE))
    monkeypatch.setenv(plugins.ENV, "")  # so that teardown removes what a grid exports


CONFOUNDER = '''
import numpy as np
from sm_utils.confounders import register_confounder

@register_confounder("{name}", category="environment/marker",
                     description="A chest drain's tube across the lower right lung.")
def drain(image, rng, *, strength):
    out = image.copy()
    out[-4:, :] = np.uint8(255 * strength)
    return out
'''


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def test_builtin_names_are_recorded_as_the_package_s_own():
    assert plugins.registered_by("confounder", "tag") == "sm_utils (built-in)"
    assert plugins.registered_by("source", "random") == "sm_utils (built-in)"
    assert plugins.registered_by("dataset", "phantom_cxr") == "sm_utils (built-in)"
    assert plugins.code_digest("confounder", "tag") is None   # the package's code: not in ids


def test_a_plugin_file_registers_and_is_named_as_its_origin(tmp_path, isolated):
    path = write(tmp_path / "ward" / "markers.py", CONFOUNDER.format(name="drain_a"))
    plugin = plugins.load_plugin("ward/markers.py", base=tmp_path)
    assert plugin.file == str(path.resolve()) and plugin.how == "file"
    assert "drain_a" in list_confounders()
    assert plugins.registered_by("confounder", "drain_a") == f"plugin file {path.resolve()}"
    out = get_confounder("drain_a").apply(__import__("numpy").zeros((8, 8), "uint8"), None)
    assert out[-1, 0] == 255 and out[0, 0] == 0
    assert plugins.load_plugin(str(path)) is plugin          # once per process
    [described] = [p for p in plugins.describe_plugins() if p["file"] == str(path.resolve())]
    assert described["registers"] == ["confounder:drain_a"]
    assert described["sha256"] == plugins._sha256_file(path)


def test_a_taken_name_is_refused_naming_both_unless_replace(tmp_path, isolated):
    taken = write(tmp_path / "taken.py", CONFOUNDER.format(name="tag"))
    with pytest.raises(plugins.PluginError) as info:
        plugins.load_plugin(str(taken))
    message = str(info.value)
    assert "confounder 'tag' is already registered (by sm_utils (built-in))" in message
    assert f"plugin file {taken}" in message and "replace=True" in message
    assert plugins.registered_by("confounder", "tag") == "sm_utils (built-in)"

    replacing = write(tmp_path / "replacing.py", CONFOUNDER.format(name="tag").replace(
        'description="A chest', 'replace=True, description="A chest'))
    plugins.load_plugin(str(replacing))
    assert plugins.registered_by("confounder", "tag") == f"plugin file {replacing}"
    assert get_confounder("tag").description.startswith("A chest drain")


def test_duplicate_source_dataset_and_metric_names_name_both(tmp_path, isolated):
    from sm_utils.datasets import register_dataset
    from sm_utils.metrics import register_metric
    from sm_utils.sources import Source, get_source, register_source

    with pytest.raises(SourceError, match=r"source 'random' is already registered \(by "
                       r"sm_utils \(built-in\)\); plugin module .*test_plugins"):
        register_source(get_source("random"))
    with pytest.raises(ValueError, match=r"dataset 'table' is already registered \(by sm_utils"):
        register_dataset("table")(lambda out_dir: None)
    register_metric("m_once", lambda y, s: 0.0, description="d")
    with pytest.raises(MetricError, match=r"metric 'm_once' is already registered \(by plugin "
                       r"module .*test_plugins.*replace=True"):
        register_metric("m_once", lambda y, s: 1.0, description="d")
    assert isinstance(get_source("random"), Source)


def test_a_syntax_error_names_file_and_line(tmp_path, isolated):
    path = write(tmp_path / "broken.py", "import numpy\n\ndef drain(image:\n    return image\n")
    with pytest.raises(plugins.PluginError) as info:
        plugins.load_plugin(str(path))
    assert f"SyntaxError at {path}:3" in str(info.value)
    assert "no cell has started" in str(info.value)
    assert str(path) not in plugins._LOADED


def test_a_failing_import_names_its_line_and_the_missing_dependency(tmp_path, isolated):
    path = write(tmp_path / "needs.py", "import os\nimport sm_no_such_dependency_xyz\n")
    with pytest.raises(plugins.PluginError) as info:
        plugins.load_plugin(str(path))
    message = str(info.value)
    assert f"at {path}:2: ModuleNotFoundError" in message
    assert "needs the module 'sm_no_such_dependency_xyz'" in message


def test_missing_file_and_unknown_module_say_what_was_expected(tmp_path, isolated):
    with pytest.raises(plugins.PluginError, match=r"plugin file .*nowhere\.py \(named in grid "
                       r"file g\.yaml\) does not exist on .*Expected a \.py file"):
        plugins.load_plugin("nowhere.py", base=tmp_path, where="grid file g.yaml")
    with pytest.raises(plugins.PluginError, match=r"plugin module 'sm_no_such_study' .* not "
                       r"importable .*pip install -e"):
        plugins.load_plugin("sm_no_such_study")


def test_sm_plugins_variable_is_loaded_on_first_lookup(tmp_path, isolated, monkeypatch):
    path = write(tmp_path / "env_plugin.py", CONFOUNDER.format(name="drain_env"))
    assert "drain_env" not in list_confounders()
    monkeypatch.setenv(plugins.ENV, str(path))
    assert "drain_env" in list_confounders()


def test_plugin_code_is_part_of_the_run_id_builtin_names_add_nothing(tmp_path, isolated):
    path = write(tmp_path / "code.py", CONFOUNDER.format(name="drain_id"))
    plugins.load_plugin(str(path))
    params = {"manifest": "m.csv", "confounder": "drain_id", "strength": 1, "p": 0.5,
              "source": "random", "weights": None}
    identity = run_identity(params, manifest="digest")
    assert identity["plugin_code"] == {"confounder": plugins.code_digest("confounder", "drain_id")}
    assert len(identity["plugin_code"]["confounder"]) == 64
    assert "plugin_code" not in run_identity({**params, "confounder": "tag"}, manifest="digest")


def test_registered_metric_is_computed_and_its_failure_named(isolated):
    from sm_utils.metrics import register_metric

    @register_metric("positives_share", description="share of positives")
    def share(labels, scores):
        return labels.mean()

    assert "positives_share" in list_metrics()
    assert compute_metrics([0, 1, 1, 1], [0.1, 0.2, 0.3, 0.4])["positives_share"] == 0.75

    register_metric("broken_metric", lambda y, s: 1 / 0, description="fails")
    with pytest.raises(MetricError, match=r"metric 'broken_metric' \(from plugin module "
                       r".*\) failed on a test set of 2 images: ZeroDivisionError"):
        compute_metrics([0, 1], [0.2, 0.8])


def _sm(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "sm"), *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300, check=False)


@pytest.fixture(scope="module")
def installed_plugin(tmp_path_factory):
    """A tiny distribution, built and installed by pip into a folder of its own (no network):
    it declares an entry point in the group sm_utils.plugins."""
    root = tmp_path_factory.mktemp("dist")
    project = root / "sm_ward_plugin"
    write(project / "pyproject.toml", """
        [build-system]
        requires = ["setuptools"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "sm-ward-plugin"
        version = "0.3.1"

        [project.entry-points."sm_utils.plugins"]
        ward = "sm_ward_plugin"
    """)
    write(project / "sm_ward_plugin" / "__init__.py", CONFOUNDER.format(name="ward_drain"))
    target = root / "site"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                           "--no-index", "--no-build-isolation", "--target", str(target),
                           str(project)], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    return target


def test_installed_plugin_is_found_without_being_named(installed_plugin, tmp_path):
    env = {"PYTHONPATH": str(installed_plugin)}
    listed = _sm("list", cwd=tmp_path, env=env)
    assert listed.returncode == 0, listed.stderr
    [line] = [x for x in listed.stdout.splitlines() if "ward_drain" in x]
    assert line.split(None, 1)[1] == "sm-ward-plugin 0.3.1 (entry point ward)"
    assert "sm_utils (built-in)" in next(x for x in listed.stdout.splitlines() if " tag " in x)

    off = _sm("list", cwd=tmp_path, env={**env, plugins.AUTOLOAD_ENV: "0"})
    assert "ward_drain" not in off.stdout

    grid = write(tmp_path / "grid.yaml", """
        name: ward
        datasets: [{name: phantom_cxr, manifest: data/m.csv}]
        confounders: [ward_drain]
        prevalences: [0.5]
        sources: [random]
    """)
    valid = _sm("validate", str(grid), "--no-check-paths", cwd=tmp_path, env=env)
    assert valid.returncode == 0, valid.stderr
    assert "valid; 1 cells" in valid.stdout
    unknown = _sm("validate", str(grid), "--no-check-paths", cwd=tmp_path,
                  env={**env, plugins.AUTOLOAD_ENV: "0"})
    assert unknown.returncode == 2 and "unknown confounders ['ward_drain']" in unknown.stderr


def test_datasets_registry_lists_through_plugins(tmp_path, isolated):
    path = write(tmp_path / "ds.py", """
        from sm_utils.datasets import register_dataset

        @register_dataset("ward_table")
        def ward_table(out_dir, table=None):
            raise NotImplementedError
    """)
    plugins.load_plugin(str(path))
    assert "ward_table" in list_datasets()
    assert plugins.registered_by("dataset", "ward_table") == f"plugin file {path}"


def test_confounder_error_still_raised_for_duplicates_in_the_package(isolated):
    from sm_utils.confounders import register_confounder

    with pytest.raises(ConfounderError, match="already registered"):
        register_confounder("tag", lambda image, rng, *, strength: image,
                            category="environment/marker", description="d")


def test_the_examples_of_docs_extending_register_as_a_plugin(tmp_path, isolated):
    """Every Python block of docs/EXTENDING.md, together in one plugin file, registers what it
    says, and its confounder and metric compute."""
    import re

    import numpy as np

    from sm_utils.metrics import get_metric
    from sm_utils.sources import get_source

    text = (Path(__file__).resolve().parents[1] / "docs" / "EXTENDING.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
    assert len(blocks) == 4
    path = write(tmp_path / "extending.py", "\n\n".join(blocks))
    plugins.load_plugin(str(path))
    mine = f"plugin file {path}"
    for kind, name in (("confounder", "burned_text"), ("source", "in_house"),
                       ("dataset", "ward_cxr"), ("metric", "sensitivity_at_spec90")):
        assert plugins.registered_by(kind, name) == mine, (kind, name)
    out = get_confounder("burned_text").apply(np.zeros((32, 32), np.uint8), None)
    assert out[1:4, 1:10].min() == 255 and out[8:, :].max() == 0
    assert get_source("in_house").default_arch == "tf_efficientnet_lite0"
    labels, scores = np.array([0] * 10 + [1, 1]), np.array([*np.linspace(0, 0.9, 10), 0.95, 0.5])
    assert get_metric("sensitivity_at_spec90").fn(labels, scores) == 0.5


def test_a_memoised_plugin_confounder_is_recomputed_when_its_code_changes(tmp_path, isolated,
                                                                         monkeypatch):
    """The disk cache of a slow confounder is keyed by the plugin's code too: an edited plugin
    never reads the outputs of the old one."""
    import dataclasses

    import numpy as np

    path = write(tmp_path / "slow.py", CONFOUNDER.format(name="drain_slow").replace(
        'description="A chest', 'memoise=True, description="A chest'))
    plugins.load_plugin(str(path))
    conf = get_confounder("drain_slow").with_cache(tmp_path / "cache")
    image = np.full((32, 32), 60, np.uint8)
    first = conf.prepare(image, True, 0, "img1", size=32, resize="bilinear")
    assert first[-1, 0] == 255
    cached = sorted((tmp_path / "cache").rglob("*.png"))
    assert len(cached) == 1
    conf.prepare(image, True, 0, "img1", size=32, resize="bilinear")
    assert sorted((tmp_path / "cache").rglob("*.png")) == cached       # reused as it is
    old = plugins.registration("confounder", "drain_slow")
    monkeypatch.setitem(plugins._REGISTRATIONS, ("confounder", "drain_slow"),
                        dataclasses.replace(old, code_sha256="0" * 64))  # as after an edit
    conf.prepare(image, True, 0, "img1", size=32, resize="bilinear")
    assert len(sorted((tmp_path / "cache").rglob("*.png"))) == 2


def test_an_edited_plugin_dataset_builder_does_not_reuse_its_old_manifest(tmp_path, isolated):
    """The manifest records the builder's code hash; after an edit the grid refuses the old
    manifest, saying to delete it (built-in builders record their params only, as before)."""
    import json

    import yaml

    from sm_utils.grid import GridError, load_grid, prepare

    write(tmp_path / "ds.py", """
        from sm_utils.datasets import register_dataset

        @register_dataset("ward_rebuilt")
        def ward_rebuilt(out_dir, n_folds=2):
            raise NotImplementedError
    """)
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump({
        "name": "g", "root": ".", "plugins": ["ds.py"],
        "datasets": [{"name": "w", "builder": "ward_rebuilt", "manifest": "data/w/manifest.csv",
                      "params": {"n_folds": 2}}],
        "confounders": ["tag"], "prevalences": [0.5], "sources": ["random"]}))
    spec = load_grid(tmp_path / "grid.yaml", check_paths=False)
    digest = plugins.code_digest("dataset", "ward_rebuilt")
    assert len(digest) == 64
    folder = tmp_path / "data" / "w"
    folder.mkdir(parents=True)
    (folder / "manifest.csv").write_text("image_id\n")
    record = folder / "grid_dataset_params.json"
    record.write_text(json.dumps({"n_folds": 2, "builder_code_sha256": digest}))
    prepare(spec, log=lambda message: None)   # the same code: the manifest is reused
    record.write_text(json.dumps({"n_folds": 2, "builder_code_sha256": "0" * 64}))
    with pytest.raises(GridError, match=rf"was built with .*'builder_code_sha256': '0{{64}}'.* "
                       rf"asks for .*'{digest}'.*delete {folder} to rebuild it"):
        prepare(spec, log=lambda message: None)


def test_a_plugin_that_asks_a_registry_while_it_loads_is_loaded_once(tmp_path, isolated,
                                                                      monkeypatch):
    """As in a SLURM job: SM_PLUGINS names the plugin, the job loads it, and the plugin looks a
    name up at import (which loads what SM_PLUGINS names): no second import, no duplicate."""
    path = write(tmp_path / "asks.py", CONFOUNDER.format(name="drain_asks") + (
        "\nfrom sm_utils.confounders import list_confounders\n"
        "ASKED = 'drain_asks' in list_confounders()\n"))
    monkeypatch.setenv(plugins.ENV, str(path))
    plugins.load_plugin(str(path))
    module = next(m for n, m in sys.modules.items() if n.startswith("_sm_plugin_asks_"))
    assert module.ASKED is True
    assert list_confounders().count("drain_asks") == 1


def test_a_plugin_named_by_module_is_imported_and_named(tmp_path, isolated, monkeypatch):
    write(tmp_path / "ward_pkg" / "__init__.py", "")
    path = write(tmp_path / "ward_pkg" / "markers.py", CONFOUNDER.format(name="drain_mod"))
    monkeypatch.syspath_prepend(str(tmp_path))
    assert plugins.resolve_ref("ward_pkg.markers", base="/elsewhere") == "ward_pkg.markers"
    plugin = plugins.load_plugin("ward_pkg.markers")
    assert plugin.how == "module" and plugin.file == str(path)
    assert plugins.registered_by("confounder", "drain_mod") == \
        f"plugin module ward_pkg.markers ({path})"
    assert plugins.code_digest("confounder", "drain_mod") is not None
