"""The conda environment and pyproject must name the same runtime dependencies."""

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
# Interactive extras that environment.yml installs for convenience, not runtime dependencies.
CONDA_ONLY = {"jupyterlab"}


def requirement_name(spec: str) -> str:
    return re.split(r"[<>=!~\[; ]", spec.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_environment_yml_matches_pyproject_runtime_dependencies():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    conda_specs = [s for s in pip_section if not s.startswith("-e")]
    assert "python=3.11" in env["dependencies"]
    assert "-e ." in pip_section  # the package itself
    pyproject = {requirement_name(s): s.replace(" ", "") for s in project["dependencies"]}
    conda = {requirement_name(s): s.replace(" ", "") for s in conda_specs}
    assert set(conda) - CONDA_ONLY == set(pyproject)
    # Same version constraints too, not only the same names.
    assert {k: v for k, v in conda.items() if k not in CONDA_ONLY} == pyproject


def test_torch_pins_are_the_supported_ones():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "torch==2.14.1" in project["dependencies"]
    assert "torchvision==0.29.1" in project["dependencies"]


def test_ci_runs_the_readme_test_command_offline():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in readme and "make demo" in readme
    assert "make test" in ci and "HF_HUB_OFFLINE=1" in ci
