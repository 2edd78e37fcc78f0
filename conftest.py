"""How `make test` runs the package tests and the notebook checks together on 2 processes
(pytest-xdist, ``--dist loadfile``): each test file is one unit of work (its module fixtures are
built once), the notebooks are one unit run in order on one process (they share data/ and
figures/), and the longest units start first so that neither process waits for the other at
the end. Every notebook check is numerics-sensitive (``make test-foreign`` repeats it)."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]  # tests/test_numerics_marker.py runs pytest on a test file of its own

NOTEBOOK_TIMEOUT_S = 1800  # a notebook cell may take this long before it counts as hung:
# notebook 05 takes under 6 min pinned, another CPU's kernels (make test-foreign) up to 2.8x more

# Units by their time on 2 cores (`pytest --durations=0`), longest first; the others follow in
# collection order. An order only: a file missing here still runs.
LONGEST_FIRST = [
    "notebooks",
    "tests/test_paper_e2e.py",
    "tests/test_numerics.py",
    "tests/test_grid.py",
    "tests/test_mechanisms.py",
    "tests/test_foundation_grid.py",
    "tests/test_report.py",
    "tests/test_cli.py",
    "tests/slurm/test_slurm_grid.py",
    "tests/test_padchest_vindr.py",
    "tests/test_chexpert_mimic.py",
    "tests/test_runs.py",
    "tests/test_table_builder.py",
]


def is_notebook_check(item: pytest.Item) -> bool:
    return item.path.suffix == ".ipynb"


def unit_of(nodeid: str) -> str:
    path = nodeid.split("::", 1)[0]
    return "notebooks" if path.endswith(".ipynb") else path


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        if is_notebook_check(item):
            item.add_marker(pytest.mark.numerics)
            item.add_marker(pytest.mark.timeout(NOTEBOOK_TIMEOUT_S))
    rank = {unit: i for i, unit in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(unit_of(item.nodeid), len(rank)))  # stable within units


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist: pytest runs without it too
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadfile`` with the notebooks as one file (xdist's own ``loadgroup`` markers do
    not reach its scheduler under pytest 9)."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ByUnit(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return unit_of(nodeid)

    return ByUnit(config, log)
