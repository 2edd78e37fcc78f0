"""The set-up step of benchmarks/gpu_check.sh: the carried wheels installed, then checked.

    python benchmarks/gpu_setup.py [--wheels .gpu-wheels --target SITE --kernel-prefix PREFIX]

With --wheels, the folder's wheels (`make gpu-wheels`) are installed as they are, with
`pip install --no-index --no-deps --target SITE`, and the python3 kernel spec into PREFIX
(share/jupyter/kernels/python3, for this Python); gpu_check.sh has already put SITE and the
checkout on PYTHONPATH and PREFIX/share/jupyter on JUPYTER_PATH. A folder holding a torch,
torchvision, triton, nvidia-* or cuda-* wheel is refused: the check uses the image's own torch.
Without --wheels, the Python at hand is checked as it is (e.g. .venv after `make setup`).

Then, whatever the Python: every requirement of sm_utils (pyproject.toml) and of every carried
package is installed, sm_utils and torch import (torch not from the wheels), and a papermill
kernel (python3) starts and runs a one-cell notebook that imports sm_utils, as the grid's kernels
do. Exit 1 with every missing package named when any of that fails.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import os
import pkgutil
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
import zipfile
from pathlib import Path

try:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
except ImportError:  # packaging comes with pytest in the image; else pip's own copy
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name

from gpu_wheels import (  # beside this script: the packages the image brings, those left out
    IMAGE_OWN,
    NOT_CARRIED,
)

ROOT = Path(__file__).resolve().parents[1]


class SetupError(Exception):
    pass


def install(wheels: Path, target: Path) -> list[str]:
    """Install the folder's wheels into ``target``; returns the wheel files' names."""
    files = sorted(wheels.glob("*.whl"))
    if not files:
        raise SetupError(f"no wheels in {wheels}: build the folder with `make gpu-wheels` and "
                         "carry it")
    own = [f.name for f in files if IMAGE_OWN.match(canonicalize_name(f.name.split("-")[0]))]
    if own:
        raise SetupError(f"{wheels} holds {own}: the check uses the image's own torch and "
                         "never installs one; rebuild the folder with `make gpu-wheels`")
    if str(target) not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
        raise SetupError(f"{target} is not on PYTHONPATH: the kernels and the steps would not "
                         "find the wheels (benchmarks/gpu_check.sh puts it there)")
    started = time.perf_counter()
    if importlib.util.find_spec("pip") is not None:
        # --isolated: this machine's pip configuration (indexes, constraints) plays no part;
        # --no-compile: the .pyc files are written when first imported, not all now
        done = subprocess.run([sys.executable, "-m", "pip", "install", "--isolated", "--quiet",
                               "--no-index", "--no-deps", "--no-compile", "--target",
                               str(target), *map(str, files)],
                              check=False, capture_output=True, text=True)
        if done.returncode != 0:
            raise SetupError(f"pip could not install the wheels of {wheels}:\n"
                             f"{done.stderr.strip()}")
    else:
        print(f"{sys.executable} has no pip: unpacking the wheels as pip --target would")
        unpack(files, target)
    importlib.invalidate_caches()
    print(f"installed {len(files)} wheels from {wheels} into {target} in "
          f"{time.perf_counter() - started:.1f} s")
    return [f.name for f in files]


def install_kernel_spec(kernel_prefix: Path) -> None:
    """The python3 kernel spec, for this Python, into PREFIX/share/jupyter/kernels."""
    done = subprocess.run([sys.executable, "-m", "ipykernel", "install", "--prefix",
                           str(kernel_prefix), "--name", "python3"],
                          check=False, capture_output=True, text=True)
    if done.returncode != 0:
        raise SetupError(f"the python3 kernel spec could not be installed:\n"
                         f"{done.stderr.strip()}")
    print(f"kernel spec python3 in {kernel_prefix}/share/jupyter/kernels")


def unpack(files: list[Path], target: Path) -> None:
    """A wheel's files into ``target``, its .data folder's purelib and platlib too (what
    `pip install --no-deps --target` does, but for scripts and data files, unused here)."""
    for wheel in files:
        with zipfile.ZipFile(wheel) as archive:
            for member in archive.namelist():
                parts = member.split("/")
                if parts[0].endswith(".data"):
                    if len(parts) < 3 or parts[1] not in ("purelib", "platlib"):
                        continue
                    parts = parts[2:]
                destination = target.joinpath(*parts)
                if member.endswith("/"):
                    continue
                destination.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(member) as source, open(destination, "wb") as out:
                    shutil.copyfileobj(source, out)


def _installed(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def unmet_requirements(target: Path | None) -> tuple[list[str], list[str]]:
    """(missing, other versions): sm_utils's requirements and those of the carried packages."""
    wanted = [("sm_utils", spec) for spec in
              tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]]
    if target is not None:
        for dist in importlib.metadata.distributions(path=[str(target)]):
            wanted += [(dist.metadata["Name"], spec) for spec in dist.requires or []]
    missing, versions = {}, {}
    for needed_by, spec in wanted:
        requirement = Requirement(spec)
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        name = canonicalize_name(requirement.name)
        if needed_by == "sm_utils" and name in NOT_CARRIED:
            continue
        have = _installed(requirement.name)
        if have is None:
            missing.setdefault(name, []).append(f"{needed_by} ({spec})")
        elif not requirement.specifier.contains(have, prereleases=True):
            versions.setdefault(name, []).append(f"{needed_by} wants {spec}, found {have}")
    return ([f"{name}, needed by {', '.join(by)}" for name, by in sorted(missing.items())],
            [f"{name}: {'; '.join(why)}" for name, why in sorted(versions.items())])


def check_imports(target: Path | None) -> None:
    """sm_utils and every module of it (their imports are the package's dependencies), papermill,
    and torch, which must be the image's."""
    # isort: off
    import sm_utils  # first, as everywhere: it pins the CPU numerics
    # isort: on
    import papermill  # noqa: F401
    import torch

    started = time.perf_counter()
    names = [module.name for module in pkgutil.walk_packages(sm_utils.__path__, "sm_utils.")
             if not module.name.endswith(".__main__")]
    failed = []
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as err:  # noqa: BLE001 (an ImportError, or a binary that does not load)
            failed.append(f"{name}: {type(err).__name__}: {err}")
    if failed:
        raise SetupError("sm_utils's modules do not all import:\n  " + "\n  ".join(failed))
    torch_file = Path(torch.__file__).resolve()
    if target is not None and target.resolve() in torch_file.parents:
        raise SetupError(f"torch came from the carried wheels ({torch_file}), not the image")
    print(f"import sm_utils: {Path(sm_utils.__file__).parent}, its {len(names)} modules in "
          f"{time.perf_counter() - started:.1f} s; torch {torch.__version__} from "
          f"{torch_file.parent}")


def check_kernel() -> None:
    """A one-cell notebook through papermill in the grid's kernel (python3)."""
    import nbformat
    import papermill
    from jupyter_client.kernelspec import KernelSpecManager

    try:
        spec = KernelSpecManager().get_kernel_spec("python3")
    except Exception as err:  # jupyter_client's NoSuchKernel and the like
        raise SetupError(f"no python3 kernel spec (JUPYTER_PATH="
                         f"{os.environ.get('JUPYTER_PATH', '')}): {err}") from err
    with tempfile.TemporaryDirectory(prefix="gpu_setup.") as tmp:
        notebook = nbformat.v4.new_notebook()
        notebook.cells = [nbformat.v4.new_code_cell(
            "import sys, sm_utils, torch\nprint(sys.executable, torch.__version__)")]
        notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                           "language": "python"}
        source, executed = Path(tmp, "kernel_check.ipynb"), Path(tmp, "executed.ipynb")
        nbformat.write(notebook, source)
        started = time.perf_counter()
        try:
            papermill.execute_notebook(str(source), str(executed), kernel_name="python3",
                                       progress_bar=False, execution_timeout=120, cwd=tmp)
        except Exception as err:  # reported as the set-up's failure
            raise SetupError(f"a papermill kernel (python3: {' '.join(spec.argv)}) did not run "
                             f"a one-cell notebook: {type(err).__name__}: {err}") from err
        output = nbformat.read(executed, as_version=4).cells[0].outputs[0]["text"].strip()
    print(f"papermill kernel python3 ({spec.resource_dir}) started and ran a cell in "
          f"{time.perf_counter() - started:.1f} s: {output}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wheels", type=Path, help="the carried wheel folder (.gpu-wheels)")
    parser.add_argument("--target", type=Path, help="where they go (on PYTHONPATH)")
    parser.add_argument("--kernel-prefix", type=Path,
                        help="where the kernel spec goes (PREFIX/share/jupyter on JUPYTER_PATH)")
    args = parser.parse_args()
    if args.wheels is not None and (args.target is None or args.kernel_prefix is None):
        parser.error("--wheels needs --target and --kernel-prefix")
    print(f"Python {sys.version.split()[0]} at {sys.executable}")
    target = args.target if args.wheels is not None else None
    try:
        if args.wheels is not None:
            install(args.wheels, args.target)
        missing, versions = unmet_requirements(target)
        for line in versions:
            print(f"warning: another version than asked: {line}")
        if missing:
            where = (f"the image and {args.wheels}" if args.wheels is not None
                     else sys.executable)
            raise SetupError(f"missing from {where}:\n  " + "\n  ".join(missing) + (
                "\nRebuild the wheel folder with `make gpu-wheels` (benchmarks/gpu_image.txt "
                "lists what the image has) and carry it" if args.wheels is not None else
                "\nInstall them (`make setup`), or carry the wheel folder (--wheels)"))
        if args.wheels is not None:
            install_kernel_spec(args.kernel_prefix)
        check_imports(target)
        check_kernel()
    except ImportError as err:
        print(f"gpu_check set-up FAILED: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    except SetupError as err:
        print(f"gpu_check set-up FAILED: {err}", file=sys.stderr)
        return 1
    print("set-up ok: sm_utils imports and a papermill kernel runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
