"""The package's layout as a contract: module sizes, the layers (import-linter), the module map
in docs/ARCHITECTURE.md, and every name the README and the notebooks import."""

from __future__ import annotations

import ast
import importlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "sm_utils"
MAX_LINES = 500
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_no_module_is_over_500_lines():
    long = {str(p.relative_to(ROOT)): n for p in modules()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these modules (at most {MAX_LINES} lines): {long}"


def lint_imports(project: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT_IMPORTS), "--config", str(project / "pyproject.toml")],
                          cwd=project, env={"PYTHONPATH": str(project), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=300, check=False)


def test_the_layers_hold_and_an_upward_import_breaks_them(tmp_path):
    done = lint_imports(ROOT)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "Contracts: 2 kept, 0 broken." in done.stdout
    # the same package with runs importing the mechanisms (one layer up): refused
    copy = tmp_path / "project"
    shutil.copytree(PACKAGE, copy / "sm_utils", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", copy / "pyproject.toml")
    runs = copy / "sm_utils" / "runs.py"
    runs.write_text(runs.read_text() + "\nfrom .mechanisms import measure_run  # noqa: E402\n")
    broken = lint_imports(copy)
    assert broken.returncode != 0
    assert "sm_utils.runs -> sm_utils.mechanisms" in broken.stdout


def documented_modules() -> set[str]:
    """Module paths docs/ARCHITECTURE.md names in its module list (`x.py` within `pkg/`; a
    package's bullet stands for its `__init__.py`)."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    section = text.split("## Modules", 1)[1].split("\n## ", 1)[0]
    named = set()
    for bullet in re.split(r"\n- ", section):
        package = re.match(r"\s*`(\w+)/`", bullet)
        if package:  # a package's bullet describes its __init__.py too
            named.add(f"{package.group(1)}/__init__.py")
        for name in re.findall(r"`([\w/]+\.py)`", bullet):
            named.add(f"{package.group(1)}/{name}" if package and "/" not in name else name)
    return named


def test_architecture_doc_names_every_module_and_only_modules_that_exist():
    named = documented_modules()
    existing = {str(p.relative_to(PACKAGE)) for p in modules()}
    assert named - existing == set(), "docs/ARCHITECTURE.md names modules that do not exist"
    assert existing - named == set(), "modules missing from docs/ARCHITECTURE.md"


def python_sources() -> dict[str, str]:
    """Code of every notebook cell and every Python block of the README and docs."""
    sources = {}
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        cells = json.loads(path.read_text())["cells"]
        code = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
        sources[path.name] = "\n".join(line for cell in code for line in cell.splitlines()
                                       if not line.lstrip().startswith(("%", "!")))
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        blocks = [b for b in re.findall(r"```python\n(.*?)```", path.read_text(),
                                        flags=re.DOTALL)
                  if re.search(r"^\s*(from|import) sm_utils", b, flags=re.MULTILINE)]
        if blocks:
            sources[path.name] = "\n".join(blocks)
    return sources


def used_names(code: str) -> set[tuple[str, str]]:
    """(module, name) for ``from sm_utils.x import name`` and ``x.name`` where ``x`` is a
    module imported from sm_utils (``from sm_utils import analysis``)."""
    tree = ast.parse(code)
    used, aliases = set(), {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sm_utils"):
            for alias in node.names:
                used.add((node.module, alias.name))
                aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("sm_utils"):
                    aliases[alias.asname or alias.name] = alias.name
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in aliases):
            target = aliases[node.value.id]
            try:
                importlib.import_module(target)
            except ImportError:
                continue  # an object, not a module: its attributes are its own business
            used.add((target, node.attr))
    return used


@pytest.mark.parametrize("source", sorted(python_sources()))
def test_every_name_the_readme_and_notebooks_use_is_importable(source):
    used = used_names(python_sources()[source])
    assert used, f"{source} uses no sm_utils name (the scan found nothing)"
    missing = []
    for module, name in sorted(used):
        imported = importlib.import_module(module)
        if not hasattr(imported, name):
            try:
                importlib.import_module(f"{module}.{name}")
            except ImportError:
                missing.append(f"{module}.{name}")
    assert not missing, f"{source} uses names sm_utils no longer has: {missing}"
