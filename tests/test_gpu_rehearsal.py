"""The GPU check on a bare GPU machine (no package registry, Python 3.12, its own torch): the
wheels it carries (benchmarks/gpu_wheels.py), its set-up (benchmarks/gpu_setup.py) and its CPU
rehearsal (benchmarks/gpu_check.sh --cpu-rehearsal).

The rehearsal itself (marker gpu_rehearsal: a Python 3.12 environment of only the image's
packages, the carried wheels installed as on the GPU machine, every step on the CPU, about 2
to 3 minutes) runs only when asked for: `make gpu-rehearsal` builds what it needs and runs it
(`pytest -m gpu_rehearsal tests/test_gpu_rehearsal.py`)."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["setup", "environment", "gpu_tests", "bench_training", "bench_grid", "tiny_grid",
         "ct_noise", "gpu_check_report"]
REHEARSAL_PYTHON = ROOT / ".venv-gpu-rehearsal/bin/python"
WHEELS = ROOT / ".gpu-wheels"


def _gpu_wheels():
    spec = importlib.util.spec_from_file_location("gpu_wheels", ROOT / "benchmarks/gpu_wheels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _package(name: str, *requires: str) -> dict:
    return {"metadata": {"name": name, "version": "1.0", "requires_dist": list(requires)}}


def test_the_carried_wheels_are_what_python_3_12_needs_beyond_the_image():
    gpu_wheels = _gpu_wheels()
    resolved = {p["metadata"]["name"]: p for p in [
        _package("pandas", "numpy>=1.26", "python-dateutil"), _package("numpy"),
        _package("python-dateutil", "six"), _package("six"),
        _package("papermill", "nbclient", 'aiohttp>=3.9; python_version == "3.12"',
                 'typing-extensions; python_version < "3.12"', 'black; extra == "black"',
                 "numpy"),
        _package("nbclient", "traitlets", 'pytest; extra == "dev"'), _package("traitlets"),
        _package("jsonschema", 'fqdn; extra == "format"'), _package("fqdn"),
    ]}
    wanted, absent = gpu_wheels.needed_by(resolved, ["pandas", "papermill", "jsonschema[format]"])
    # markers for Python 3.12 on Linux, whatever Python runs pip: aiohttp is needed there
    assert absent == ["aiohttp>=3.9"]
    assert wanted == {"pandas", "numpy", "python-dateutil", "six", "papermill", "nbclient",
                      "traitlets", "jsonschema", "fqdn"}
    present, _ = gpu_wheels.needed_by(resolved, ["pandas"])
    assert wanted - present == {"papermill", "nbclient", "traitlets", "jsonschema", "fqdn"}
    assert all(gpu_wheels.IMAGE_OWN.match(name) for name in
               ("torch", "torchvision", "triton", "nvidia-cudnn-cu13", "cuda-bindings"))
    assert "--python-version" in gpu_wheels.target_options()
    assert "manylinux2014_x86_64" in gpu_wheels.target_options()


def _dry_run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "benchmarks/gpu_check.sh"), "--dry-run", *args],
                          env={"PATH": "/usr/bin:/bin", "OUT": "/nowhere"},
                          capture_output=True, text=True, timeout=60, check=False)


def test_the_rehearsals_dry_run_has_the_same_steps_on_the_cpu(tmp_path):
    done = _dry_run("--cpu-rehearsal", "--wheels", str(tmp_path))
    assert done.returncode == 0, done.stderr
    steps = re.findall(r"^(\w+)\s+(\d+)s  (.*)$", done.stdout, flags=re.MULTILINE)
    assert [name for name, _, _ in steps] == STEPS
    assert sum(int(seconds) for _, seconds, _ in steps) <= 9.5 * 60
    commands = {name: command for name, _, command in steps}
    assert f"benchmarks/gpu_setup.py --wheels {tmp_path} --target" in commands["setup"]
    assert "nvidia-smi;" not in commands["environment"] and "skipped" in commands["environment"]
    assert "--device cuda" not in done.stdout
    assert "--device cpu" in commands["bench_training"] and "--device cpu" in commands["bench_grid"]
    assert "configs/gpu_check.yaml --override" in commands["tiny_grid"]
    assert "tests/test_gpu.py" in commands["gpu_tests"]
    assert "bench_ct_noise.py --gpu-check cpu --size 64" in commands["ct_noise"]
    missing = _dry_run("--wheels", str(tmp_path / "absent"))
    assert missing.returncode == 2 and "no wheel folder" in missing.stderr


def _wheel(folder: Path, name: str, *requires: str) -> Path:
    """A minimal pure-Python wheel of ``name`` 1.0 that requires ``requires``."""
    dist = f"{name}-1.0.dist-info"
    files = {
        f"{name}/__init__.py": "",
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n"
                            + "".join(f"Requires-Dist: {r}\n" for r in requires),
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                         "Tag: py3-none-any\n",
    }
    files[f"{dist}/RECORD"] = "".join(f"{n},,\n" for n in [*files, f"{dist}/RECORD"])
    path = folder / f"{name}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for member, text in files.items():
            archive.writestr(member, text)
    return path


def _set_up(tmp_path: Path, wheels: Path) -> subprocess.CompletedProcess:
    target = tmp_path / "site"
    target.mkdir(parents=True)
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path),
           "PYTHONPATH": f"{ROOT}:{target}", "JUPYTER_PATH": str(tmp_path / "k/share/jupyter"),
           "JUPYTER_DATA_DIR": str(tmp_path / "data"), "IPYTHONDIR": str(tmp_path / "ipython")}
    return subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu_setup.py"), "--wheels",
                           str(wheels), "--target", str(target), "--kernel-prefix",
                           str(tmp_path / "k")], env=env, capture_output=True, text=True,
                          timeout=120, check=False)


def test_the_set_up_never_installs_torch_and_names_what_is_missing(tmp_path):
    torch_folder = tmp_path / "with_torch"
    torch_folder.mkdir()
    (torch_folder / "torch-2.11.0-cp312-cp312-manylinux_2_28_x86_64.whl").write_bytes(b"")
    refused = _set_up(tmp_path / "a", torch_folder)
    assert refused.returncode == 1
    assert "gpu_check set-up FAILED" in refused.stderr and "never installs one" in refused.stderr
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels, "demo_carried", "not-a-package-anywhere>=1", "pandas")
    lacking = _set_up(tmp_path / "b", wheels)
    assert lacking.returncode == 1, lacking.stdout + lacking.stderr
    assert "installed 1 wheels" in lacking.stdout
    assert ("not-a-package-anywhere, needed by demo_carried (not-a-package-anywhere>=1)"
            in lacking.stderr)
    assert "make gpu-wheels" in lacking.stderr and "pandas" not in lacking.stderr


@pytest.fixture
def rehearsal(request):
    """The rehearsal's Python 3.12 environment and wheel folder (make gpu-rehearsal)."""
    if "gpu_rehearsal" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("the CPU rehearsal of the GPU check: make gpu-rehearsal "
                    "(pytest -m gpu_rehearsal)")
    if not REHEARSAL_PYTHON.exists() or not (WHEELS / "wheels.txt").exists():
        pytest.fail(f"{REHEARSAL_PYTHON} or {WHEELS} is missing: make gpu-rehearsal builds them")


def _rehearse(tmp_path: Path, wheels: Path, capture: bool) -> subprocess.CompletedProcess:
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", str(tmp_path)),
           "PYTHON": str(REHEARSAL_PYTHON), "OUT": str(tmp_path / "out"),
           "TMPDIR": str(tmp_path)}
    return subprocess.run(["bash", str(ROOT / "benchmarks/gpu_check.sh"), "--cpu-rehearsal",
                           "--wheels", str(wheels)], env=env, capture_output=capture,
                          text=True, timeout=900, check=False)


@pytest.mark.gpu_rehearsal
@pytest.mark.timeout(900)
def test_the_cpu_rehearsal_runs_every_step_with_only_the_image_and_the_wheels(rehearsal, tmp_path):
    print(f"\nthe CPU rehearsal with {REHEARSAL_PYTHON} and {WHEELS}; logs in {tmp_path / 'out'}")
    done = _rehearse(tmp_path, WHEELS, capture=False)  # its progress shows with pytest -s
    out = tmp_path / "out"
    assert done.returncode == 0, f"the rehearsal failed: see {out}"
    assert sorted(p.stem for p in out.glob("*.log")) == sorted(STEPS)
    assert "set-up ok" in (out / "setup.log").read_text()
    assert "Python 3.12" in (out / "setup.log").read_text()
    report = pd.read_csv(out / "gpu_check_report.csv")
    assert len(report) == 4 and set(report["device"]) == {"cpu"}
    assert set(report["arch"]) == {"tf_efficientnet_lite0", "keras_resnet50"}


@pytest.mark.gpu_rehearsal
@pytest.mark.timeout(300)
def test_a_missing_wheel_stops_the_rehearsal_at_the_set_up_naming_it(rehearsal, tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for wheel in WHEELS.glob("*.whl"):
        if not wheel.name.startswith("papermill-"):
            shutil.copy(wheel, wheels)
    done = _rehearse(tmp_path, wheels, capture=True)
    print(done.stdout)
    assert done.returncode == 1
    assert "papermill, needed by sm_utils (papermill>=2.5)" in done.stdout
    assert "the set-up failed, so no step can run" in done.stdout
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["setup.log"]
