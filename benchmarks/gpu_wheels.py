"""The wheels benchmarks/gpu_check.sh carries to a GPU machine that reaches no package registry.

    python benchmarks/gpu_wheels.py [--dest .gpu-wheels]        # make gpu-wheels

The GPU machines start bare, with Python 3.12.3, their own torch and the packages of
benchmarks/gpu_image.txt, and take at most 64 MiB of checkout and carried files. This resolves,
with pip, sm_utils's dependencies (pyproject.toml) together with the image's packages for
CPython 3.12 on manylinux x86-64 (wheels only), at the lock's versions (constraints.txt) where
the lock has a wheel for 3.12, and downloads exactly what the image lacks: every resolved
package that is not one of the image's packages or something they need. No torch, torchvision,
triton, nvidia-* or cuda-* wheel is ever carried: the check uses the image's own. The folder
also gets wheels.txt (name==version, one a line). Printed: each wheel, the folder's size, the
tracked checkout's (as `git ls-files -z | xargs -0 du -cb`) and their sum, which must stay
within the limit (exit 1 otherwise). sm_utils itself is not a wheel: the check puts the
checkout on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

try:
    from packaging.markers import Marker
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
except ImportError:  # a bare Python: pip's own copy
    from pip._vendor.packaging.markers import Marker
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20
# The GPU machines' Python and platform (Ubuntu 24.04's Python 3.12.3, glibc 2.39); wheels up to
# manylinux_2_36, so that they also install on this project's machines (glibc 2.36), where
# `make gpu-rehearsal` tries them.
PYTHON_VERSION = "3.12"
MAX_GLIBC_MINOR = 36
PLATFORMS = ([f"manylinux_2_{minor}_x86_64" for minor in range(MAX_GLIBC_MINOR, 4, -1)]
             + ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"])
MARKER_ENV = {
    "python_version": PYTHON_VERSION, "python_full_version": "3.12.3",
    "implementation_name": "cpython", "implementation_version": "3.12.3",
    "platform_python_implementation": "CPython", "platform_system": "Linux",
    "platform_machine": "x86_64", "sys_platform": "linux", "os_name": "posix",
    "platform_release": "", "platform_version": "",
}
# never carried: the image's own torch and what belongs to it
IMAGE_OWN = re.compile(r"^(torch|torchvision|torchaudio|triton|nvidia-.*|cuda-.*)$")
# sm_utils's dependencies that the GPU check does without (imported only where used): finufft
# is ct_noise's CPU backend (7 MiB; on a GPU ct_noise runs with backend "torch"); transformers
# and open_clip_torch load the foundation-model sources (with tokenizers and what else only they
# need, 17 MiB), which the check's CNN grids do not use
NOT_CARRIED = frozenset({"finufft", "transformers", "open-clip-torch"})


def target_options() -> list[str]:
    options = ["--only-binary=:all:", "--python-version", PYTHON_VERSION, "--implementation", "cp"]
    for platform in PLATFORMS:
        options += ["--platform", platform]
    return options


def pip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "pip", *args], check=False, capture_output=True,
                          text=True)
    # this machine's pip configuration names local indexes that lack most projects: noise
    done.stderr = "\n".join(line for line in done.stderr.splitlines()
                            if "is ignored: it is neither a file nor a directory" not in line)
    if check and done.returncode != 0:
        sys.exit(f"gpu_wheels: pip {args[0]} failed:\n{done.stderr.strip()}")
    return done


def image_packages() -> list[str]:
    lines = (ROOT / "benchmarks/gpu_image.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def sm_utils_requirements() -> list[str]:
    """sm_utils's dependencies (pyproject.toml) less those of NOT_CARRIED."""
    return [spec for spec in
            tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
            if canonicalize_name(Requirement(spec).name) not in NOT_CARRIED]


def lock_pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[canonicalize_name(name)] = f"{name}=={version}"
    return pins


def has_wheel(pin: str, work: Path) -> bool:
    """Whether ``pin`` (name==version) has a wheel for the GPU machine's Python."""
    done = pip("install", "--dry-run", "--ignore-installed", "--quiet", "--no-deps",
               "--target", str(work / "probe"), *target_options(), pin, check=False)
    return done.returncode == 0


def resolve(requirements: list[str], work: Path) -> list[dict]:
    """pip's resolution of ``requirements`` for the GPU machine's Python under the lock; a pin
    without a wheel for 3.12 is dropped (said so) and the newest release that fits taken."""
    pins = lock_pins()
    for _ in range(len(pins)):
        constraints = work / "constraints.txt"
        constraints.write_text("\n".join(pins.values()) + "\n")
        report = work / "report.json"
        done = pip("install", "--dry-run", "--ignore-installed", "--quiet", "--report",
                   str(report), "--target", str(work / "target"), *target_options(),
                   "-c", str(constraints), *requirements, check=False)
        if done.returncode == 0:
            return json.loads(report.read_text())["install"]
        named = {canonicalize_name(m) for m in re.findall(
            r"(?:\(constraint\)|distribution found for|satisfies the requirement) ([\w.-]+)==",
            done.stderr)}
        unusable = [name for name in sorted(named & set(pins)) if not has_wheel(pins[name], work)]
        if not unusable:
            sys.exit(f"gpu_wheels: pip cannot resolve sm_utils's dependencies for Python "
                     f"{PYTHON_VERSION}:\n{done.stderr.strip()}")
        for name in unusable:
            print(f"the lock's {pins.pop(name)} has no wheel for Python {PYTHON_VERSION}: "
                  "taking the newest release that fits")
    sys.exit("gpu_wheels: no resolution")


def needed_by(packages: dict[str, dict], roots: list[str]) -> tuple[set[str], list[str]]:
    """The canonical names of ``roots`` and of everything they need on the GPU machine's Python
    (markers evaluated for it), within the resolved ``packages``; and the requirements of
    theirs that the resolution lacks (pip evaluates markers for the Python that runs it)."""
    seen: set[str] = set()
    absent: list[str] = []
    todo = [Requirement(root) for root in roots]
    done: set[tuple[str, frozenset]] = set()
    while todo:
        requirement = todo.pop()
        name, extras = canonicalize_name(requirement.name), frozenset(requirement.extras)
        if name not in packages:
            absent.append(str(requirement))
            continue
        if (name, extras) in done:
            continue
        done.add((name, extras))
        seen.add(name)
        for spec in packages[name]["metadata"].get("requires_dist") or []:
            needed = Requirement(spec)
            wanted = [{**MARKER_ENV, "extra": extra} for extra in sorted(extras) or [""]]
            if needed.marker is None or any(Marker(str(needed.marker)).evaluate(env)
                                            for env in wanted):
                needed.marker = None
                todo.append(needed)
    return seen, sorted(set(absent))


def tracked_bytes() -> int:
    """The checkout's tracked files, as `git ls-files -z | xargs -0 du -cb` counts them."""
    names = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.split(b"\0")
    return sum(os.lstat(ROOT / os.fsdecode(name)).st_size for name in names
               if name and os.path.lexists(ROOT / os.fsdecode(name)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", type=Path, default=ROOT / ".gpu-wheels")
    parser.add_argument("--limit-mib", type=float, default=64.0,
                        help="the most the checkout and the folder may weigh together")
    args = parser.parse_args()
    image = image_packages()
    needed = sm_utils_requirements()
    with tempfile.TemporaryDirectory(prefix="gpu_wheels.") as tmp:
        work = Path(tmp)
        requirements = image + needed
        for _ in range(10):
            resolved = {canonicalize_name(item["metadata"]["name"]): item
                        for item in resolve(requirements, work)}
            wanted, absent = needed_by(resolved, requirements)
            if not absent:
                break
            print(f"needed on Python {PYTHON_VERSION} but not resolved under this Python "
                  f"({sys.version.split()[0]}): {absent}; resolving again with them")
            requirements = requirements + absent
        present, _ = needed_by(resolved, image)
        carried = {name: resolved[name]["metadata"]["version"]
                   for name in sorted(wanted - present)}
        own = sorted(name for name in carried if IMAGE_OWN.match(name))
        if own:
            sys.exit(f"gpu_wheels: would carry the image's own {own}: they must come from the "
                     "image (are they missing from benchmarks/gpu_image.txt?)")
        print(f"Python {PYTHON_VERSION}: {len(wanted)} packages needed, {len(present)} of them in "
              f"the image (benchmarks/gpu_image.txt and what they need), {len(carried)} carried")
        download = work / "wheels"
        pip("download", "--no-deps", "--quiet", "--dest", str(download), *target_options(),
            *(f"{name}=={version}" for name, version in carried.items()))
        wheels = sorted(download.glob("*.whl"))
        got = {canonicalize_name(w.name.split("-")[0]) for w in wheels}
        if got != set(carried) or len(wheels) != len(carried):
            sys.exit(f"gpu_wheels: downloaded {sorted(w.name for w in wheels)}, expected one "
                     f"wheel each of {sorted(carried)}")
        args.dest.mkdir(parents=True, exist_ok=True)
        for old in [*args.dest.glob("*.whl"), args.dest / "wheels.txt"]:
            old.unlink(missing_ok=True)
        for wheel in wheels:
            shutil.move(wheel, args.dest / wheel.name)
    (args.dest / "wheels.txt").write_text(
        "".join(f"{name}=={version}\n" for name, version in carried.items()))
    for wheel in sorted(args.dest.glob("*.whl")):
        print(f"  {wheel.stat().st_size / MIB:6.2f} MiB  {wheel.name}")
    folder = sum(path.stat().st_size for path in args.dest.rglob("*") if path.is_file())
    checkout = tracked_bytes()
    total = folder + checkout
    print(f"{args.dest}: {folder / MIB:.1f} MiB in {len(carried)} wheels; tracked checkout "
          f"{checkout / MIB:.1f} MiB; together {total / MIB:.1f} MiB of at most "
          f"{args.limit_mib:g} MiB")
    if total > args.limit_mib * MIB:
        print(f"gpu_wheels: over the limit by {(total - args.limit_mib * MIB) / MIB:.1f} MiB",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
