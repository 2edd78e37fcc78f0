"""Fixtures of the SLURM tests: a real one-node cluster (marker ``slurm``) and a fake SLURM.

Tests marked ``slurm`` run on a cluster the tests start themselves (slurm_cluster.py); they
run only when selected with ``-m slurm`` (``make test-slurm``), and skip, naming that target,
where the SLURM programs are missing. The other tests here use the fake commands of
fake_slurm.py and run in every ``make test``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import fake_slurm as fake
from slurm_cluster import SlurmCluster, why_not_here

MARKER = "slurm: needs a real SLURM cluster, which the tests start (run with `make test-slurm`)"


def pytest_configure(config):
    # Registered here until pyproject.toml lists the marker (addopts has --strict-markers).
    if not any(line.split(":")[0].strip() == "slurm" for line in config.getini("markers")):
        config.addinivalue_line("markers", MARKER)


def pytest_collection_modifyitems(config, items):
    if "slurm" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="SLURM cluster tests run with `make test-slurm` (pytest -m slurm)")
    for item in items:
        if item.get_closest_marker("slurm") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def slurm_cluster():
    """A one-node cluster of this machine, with SLURM_CONF set for the whole test process."""
    reason = why_not_here()
    if reason:
        pytest.skip(reason)
    saved = dict(os.environ)
    cluster = SlurmCluster().start()
    try:
        env = cluster.env
        os.environ.clear()
        os.environ.update(env)
        yield cluster
    finally:
        os.environ.clear()
        os.environ.update(saved)
        cluster.stop()


@pytest.fixture
def slurm_jobs(slurm_cluster):
    """The cluster, emptied of jobs after the test."""
    yield slurm_cluster
    slurm_cluster.cancel_all()


_FAKE_IDS = iter(range(4000, 10**6, 1000))


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """Fake sbatch/srun/squeue/scancel/sacct first on PATH; yields the fake's state folder.

    Job ids never repeat within a session, as on a real cluster: submitit's state cache is
    shared by all jobs of a process.
    """
    state = tmp_path / "fake-slurm"
    bin_dir = fake.install(tmp_path / "fake-bin", state)
    (state / "next_job_id").write_text(str(next(_FAKE_IDS)))
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    for name in list(os.environ):
        if name.startswith(("SLURM_", "SBATCH_", "SQUEUE_", "FAKE_SLURM_")):
            monkeypatch.delenv(name)
    try:
        yield state
    finally:
        fake.kill_everything(state)
