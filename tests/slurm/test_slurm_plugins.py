"""A grid's plugin on SLURM: given as a file path, loaded by every array task before any cell;
a path that does not resolve on the node fails that node's cells with an error naming it.

The first test runs the fake SLURM of fake_slurm.py (every `make test`); the second runs the
study of tests/test_study.py (its confounder, source, dataset and metric from plugins.py) on
the real one-node cluster (`make test-slurm`).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from tiny_grid import SMALL_TASKS, run, tiny_grid

from sm_utils import plugins
from sm_utils.grid import load_grid


def test_a_plugin_missing_on_the_node_fails_its_cells_naming_the_path(
        tmp_path, fake_slurm, monkeypatch):
    monkeypatch.setenv(plugins.ENV, "")  # so that teardown removes what a grid exports
    tiny_grid(tmp_path, prevalences=[0.0, 1.0])
    plugin = tmp_path / "study" / "markers.py"
    plugin.parent.mkdir()
    plugin.write_text("MARKERS = 1\n")
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({**yaml.safe_load(grid.read_text()),
                                    "plugins": ["study/markers.py"]}))
    spec = load_grid(grid, check_names=False)
    assert spec.plugins == [str(plugin)]
    plugin.unlink()  # loaded here at launch; the node does not see it
    report = run(spec, slurm_timeout_s=120)
    assert report.succeeded == 0 and len(report.failures) == 2, report.summary()
    node = os.uname().nodename
    for _label, message in report.failures:
        assert message.startswith(f"PluginError on node {node}: plugin file {plugin}"), message
        assert "does not exist" in message and "same absolute path" in message
        assert "Traceback" not in message
    assert not list((tmp_path / "runs" / "fake").glob("*/notebook.ipynb"))  # no cell started


@pytest.mark.slurm
@pytest.mark.numerics
def test_the_study_runs_on_slurm_with_its_plugin_file(slurm_jobs, tmp_path):
    from test_study import grid_yaml, make_study

    grid = make_study(tmp_path)
    data = Path(yaml.safe_load(grid.read_text())["datasets"][0]["params"]["data_root"])
    grid.write_text(yaml.safe_dump(grid_yaml(
        data, folds=[0], slurm={**SMALL_TASKS, "cells_per_job": 2, "time_min": 10,
                                "mem_gb": 2})))
    env = {k: v for k, v in os.environ.items() if k != plugins.ENV}
    done = subprocess.run([str(Path(os.sys.executable).parent / "sm"), "run", str(grid),
                           "--executor", "slurm", "--slurm-timeout", "400", "--progress", "off"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    configs = [json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*/config.json")]
    assert len(configs) == 4   # burned_text x 2 p x fold 0 x (ward_ssl, random)
    assert {c["confounder"]["name"] for c in configs} == {"burned_text"}
    assert {c["source"]["source"] for c in configs} == {"ward_ssl", "random"}
    assert {p["file"] for c in configs for p in c["plugins"]} == {str(tmp_path / "plugins.py")}
    tasks = [p for p in (tmp_path / "runs" / "_submitit").glob("*_*") if p.is_dir()]
    assert len(tasks) == 2   # 2 array tasks of 2 cells
    assert "sensitivity_at_half" in (tmp_path / "runs" / "results.csv").read_text()
