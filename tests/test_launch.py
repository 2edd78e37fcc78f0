"""Binder / repo2docker: environment.yml, then postBuild, which installs the package with its
lock; the README carries the badge and says the launch is untested offline."""

import os
import re
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_post_build_is_an_executable_script_that_installs_the_package_with_the_lock():
    script = ROOT / "postBuild"
    assert os.access(script, os.X_OK)
    text = script.read_text()
    assert text.startswith("#!/bin/bash\n") and "set -euo pipefail" in text
    commands = [line for line in text.splitlines() if line and not line.startswith(("#", "set"))]
    assert commands == ["python -m pip install --no-cache-dir -c constraints.txt -e ."]
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0  # parses


def test_environment_yml_parses_for_repo2docker():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    # local references: repo2docker then copies the repository before it builds the environment
    assert "-e ." in pip and (ROOT / "constraints.txt").is_file()
    assert not (ROOT / "binder").exists()  # a binder/ folder would make repo2docker ignore both


def test_the_readme_carries_the_binder_badge_and_says_it_is_untested():
    readme = (ROOT / "README.md").read_text()
    badge = re.search(r"\[!\[Binder\]\(https://mybinder\.org/badge_logo\.svg\)\]"
                      r"\((https://mybinder\.org/v2/gh/[^)\s]+)\)", readme)
    assert badge and badge.group(1).split("?")[0].endswith("/HEAD")
    assert readme.index(badge.group(0)) < readme.index("## The procedure")  # near the top
    assert "untested offline" in readme
