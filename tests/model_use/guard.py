"""The ``numerics`` marker's guard, a pytest plugin (tests/conftest.py loads it): a test that
runs a torch module's forward, in its own process, in a fixture it uses or in a process it
starts (sitecustomize.py beside this file, on PYTHONPATH), fails at teardown unless it carries
the marker, so that ``make test-foreign`` cannot miss a numerics-sensitive test."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

MODEL_USE_ENV = "SM_TEST_MODEL_USE"
PROBE_DIR = Path(__file__).parent  # its sitecustomize.py watches child processes


class ModelUse:
    """Whether the running test (or a child process of it) has run a torch module's forward."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.in_process = False
        self.file: Path | None = None
        self.fixtures: set[tuple[str, str]] = set()  # (where, name) of fixtures that ran one
        self.count = 0
        torch.nn.modules.module.register_module_forward_hook(self._forward)

    def _forward(self, module, inputs, output):
        self.in_process = True

    def start(self) -> None:
        self.count += 1
        self.in_process = False
        self.file = self.folder / f"{self.count}.txt"
        os.environ[MODEL_USE_ENV] = str(self.file)

    def seen(self) -> bool:
        return self.in_process or (self.file is not None and self.file.exists())


def pytest_configure(config):
    folder = Path(tempfile.mkdtemp(prefix="sm_tests_"))
    config.stash[MODEL_USE] = ModelUse(folder)
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(PROBE_DIR), *(p for p in paths if p and p != str(PROBE_DIR))])
    # an image cache per test process (xdist worker), not the checkout's cache/ or the user's
    os.environ["SM_CACHE_DIR"] = str(folder / "cache")


MODEL_USE = pytest.StashKey[ModelUse]()


def pytest_unconfigure(config):
    if MODEL_USE in config.stash:
        shutil.rmtree(config.stash[MODEL_USE].folder, ignore_errors=True)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_setup(item):
    item.config.stash[MODEL_USE].start()
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef, request):
    use = request.config.stash[MODEL_USE]
    before = use.seen()
    result = yield
    if not before and use.seen():
        use.fixtures.add((fixturedef.baseid, fixturedef.argname))
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    result = yield
    use = item.config.stash[MODEL_USE]
    if isinstance(item, pytest.Function) and item.get_closest_marker("numerics") is None:
        names = set(getattr(item, "fixturenames", ()))
        through = sorted(name for where, name in use.fixtures
                         if name in names and item.nodeid.startswith(where))
        if use.seen() or through:
            where = f" (through fixture {', '.join(through)})" if through else ""
            pytest.fail(f"{item.nodeid} runs a model{where} but is not marked "
                        "@pytest.mark.numerics, so `make test-foreign` would not repeat it under "
                        "another CPU's kernels: add the marker", pytrace=False)
    return result
