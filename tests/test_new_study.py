"""`sm new DIR`: a study folder outside the checkout that `sm run DIR/grid.yaml` runs offline
at once, as written (its grid unchanged), with the plugin's names listed by `sm list`.

The compendium it uses is a fresh clone of this checkout's last commit (``SM_PROJECT_ROOT``:
its notebooks; ``SM_CACHE_DIR``: an image cache of its own), so nothing built in this checkout
before is needed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SM = str(Path(sys.executable).parent / "sm")


def sm(*args, cwd: Path, timeout: float = 900, env: dict | None = None
       ) -> subprocess.CompletedProcess:
    start = time.perf_counter()
    done = subprocess.run([SM, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**{k: v for k, v in os.environ.items()
                                                   if k not in ("SM_PLUGINS", "SM_CACHE_DIR")},
                                                **(env or {})}, check=False)
    done.seconds = time.perf_counter() - start
    return done


@pytest.fixture(scope="module")
def new_study(tmp_path_factory):
    """`sm new` then `sm run` on the grid exactly as written (8 runs, 32 px, 1 epoch)."""
    base = tmp_path_factory.mktemp("studies")
    fresh = base / "fresh_clone"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(fresh)], check=True, timeout=120)
    assert not (fresh / "cache").exists() and not (fresh / "data" / "demo").exists()
    env = {"SM_PROJECT_ROOT": str(fresh), "SM_CACHE_DIR": str(fresh / "cache" / "images")}
    folder = base / "drain_study"
    assert ROOT not in folder.resolve().parents
    out = {"folder": folder, "fresh": fresh, "new": sm("new", folder, cwd=base, env=env)}
    out["run"] = sm("run", folder / "grid.yaml", "--progress", "off", cwd=base, env=env)
    out["list"] = sm("list", folder / "grid.yaml", cwd=base, env=env)
    out["report"] = sm("report", folder / "grid.yaml", folder / "kit", "--permutations", "99",
                       cwd=base, env=env)
    return out


@pytest.mark.numerics
def test_sm_new_writes_a_study_folder(new_study):
    folder = new_study["folder"]
    assert new_study["new"].returncode == 0, new_study["new"].stderr
    assert {p.name for p in folder.iterdir()} >= {"grid.yaml", "plugins.py", "README.md",
                                                   ".gitignore", "weights"}
    grid = yaml.safe_load((folder / "grid.yaml").read_text())
    assert grid["name"] == "drain_study" and grid["plugins"] == ["plugins.py"]
    assert grid["root"] == "." and grid["runs_dir"] == "runs"
    ignored = (folder / ".gitignore").read_text().split()
    assert {"runs/", "data/", "figures/", "weights/", "kit/"} <= set(ignored)
    readme = (folder / "README.md").read_text()
    assert "# drain_study" in readme and "data_root:" in readme and "EXTENDING.md" in readme


@pytest.mark.numerics
def test_sm_run_runs_the_new_study_offline_at_once(new_study):
    run = new_study["run"]
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    folder = new_study["folder"]
    configs = [json.loads(p.read_text()) for p in (folder / "runs").glob("*/config.json")]
    assert len(configs) == 8
    assert {c["confounder"]["name"] for c in configs} == {"chest_drain"}
    assert {c["source"]["source"] for c in configs} == {"in_house", "random"}
    house = next(c for c in configs if c["source"]["source"] == "in_house")
    assert "Stand-in written by `sm new`" in house["source"]["provenance"]
    assert house["manifest"]["meta"]["dataset"] == "ward_table"
    results = pd.read_csv(folder / "runs" / "results.csv")
    assert results["sensitivity_at_spec90"].between(0, 1).all() and len(results) == 24
    assert (folder / "figures" / "drain_study_auc_vs_p.png").exists()
    fresh = new_study["fresh"]
    assert f"analysis: {fresh / 'notebooks' / '04_analysis.ipynb'}" in run.stdout
    assert f"with {fresh / 'notebooks' / '01_data_preparation.ipynb'}" in run.stdout
    assert any((fresh / "cache" / "images").iterdir())   # an image cache of its own, built now


@pytest.mark.numerics
def test_sm_report_turns_the_new_study_into_a_kit(new_study):
    report = new_study["report"]
    assert report.returncode == 0, report.stderr[-3000:]
    kit = new_study["folder"] / "kit"
    assert (kit / "tables" / "auc.tex").exists() and (kit / "figures" / "captions.md").exists()
    methods = (kit / "methods.md").read_text()
    assert (f"plugin `{new_study['folder'] / 'plugins.py'}` (file; file "
            f"`{new_study['folder'] / 'plugins.py'}`; sha256 `") in methods
    assert "registers confounder:chest_drain, dataset:ward_table, metric:sensitivity_at_spec90, " \
        "source:in_house" in methods


@pytest.mark.numerics
def test_sm_list_names_the_plugin_beside_each_name_it_registered(new_study):
    listed = new_study["list"]
    assert listed.returncode == 0, listed.stderr
    origin = {line.split()[0]: line.split(None, 1)[1] for line in listed.stdout.splitlines()
              if line.startswith("  ")}
    plugin = f"plugin file {new_study['folder'] / 'plugins.py'}"
    for name in ("chest_drain", "in_house", "ward_table", "sensitivity_at_spec90"):
        assert origin[name] == plugin, name
    assert origin["tag"] == origin["random"] == origin["phantom_cxr"] == "sm_utils (built-in)"


def test_sm_new_refuses_a_folder_with_files(tmp_path):
    (tmp_path / "grid.yaml").write_text("mine\n")
    done = sm("new", tmp_path, cwd=tmp_path)
    assert done.returncode == 2
    assert "already exists and holds grid.yaml" in done.stderr
    assert "expected a new or empty folder" in done.stderr
    assert (tmp_path / "grid.yaml").read_text() == "mine\n"
    assert not (tmp_path / "plugins.py").exists()
