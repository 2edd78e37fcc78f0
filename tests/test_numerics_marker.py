"""The guard of the ``numerics`` marker (tests/model_use/guard.py): `make test-foreign` repeats
only the tests so marked, so a test that runs a model without the marker must fail, whether the
model runs in the test, in a fixture it uses or in a process it starts."""

from __future__ import annotations

import os
from pathlib import Path

from model_use.guard import MODEL_USE_ENV

TESTS = Path(__file__).resolve().parent

INNER = '''
import subprocess, sys
import pytest
import torch

def forward():
    torch.nn.Linear(2, 1)(torch.zeros(1, 2))

@pytest.fixture(scope="module")
def trained():
    forward()
    return 1

def test_in_process():
    forward()

@pytest.mark.numerics
def test_in_process_marked():
    forward()

def test_in_a_child():
    code = "import torch; torch.nn.Linear(2, 1)(torch.zeros(1, 2))"
    subprocess.run([sys.executable, "-c", code], check=True)

def test_a_child_without_a_model():
    subprocess.run([sys.executable, "-c", "import torch; torch.zeros(2).sum()"], check=True)

def test_first_user_of_the_fixture(trained):
    pass

def test_second_user_of_the_fixture(trained):
    pass

def test_no_model():
    assert torch.zeros(2).sum() == 0
'''


def test_a_model_run_without_the_marker_fails_the_test_and_names_the_marker(pytester,
                                                                           monkeypatch):
    pytester.makepyfile(test_inner=INNER)
    pytester.makeini("[pytest]\nmarkers =\n    numerics: runs a model\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), os.environ["PYTHONPATH"]]))
    monkeypatch.delenv(MODEL_USE_ENV)  # the inner run's models are its tests', not this test's
    result = pytester.runpytest_subprocess("-p", "model_use.guard", "-p", "no:cacheprovider",
                                           "-rE")
    errors = {line.split("::")[1].split(" ")[0] for line in result.outlines
              if line.startswith("ERROR test_inner.py::")}
    # in the test, in a child process, in a fixture (for every test that uses it)
    assert errors == {"test_in_process", "test_in_a_child", "test_first_user_of_the_fixture",
                      "test_second_user_of_the_fixture"}
    result.stdout.fnmatch_lines([
        "*test_in_process runs a model but is not marked @pytest.mark.numerics*add the marker",
        "*test_second_user_of_the_fixture runs a model (through fixture trained) but is not*"])
    result.assert_outcomes(passed=7, errors=4)  # every test passed; 4 also failed at teardown
