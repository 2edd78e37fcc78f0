"""The CPU's numeric code paths, pinned so that a result does not depend on which x86-64 CPU
computed it.

torch (ATen), oneDNN, MKL and numpy each pick vector kernels at run time from the CPU's
instruction sets. Other kernels sum in another order, and training amplifies the last-bit
differences: the same demo run gave o.o.d. AUCs 0.17 and 0.55 on two x86-64 CPUs. Pinned
(the default), every CPU of one instruction-set level runs the same code. Two levels:

- ``x86-64-v3`` (AVX2 and FMA: Intel since 2013, AMD since 2015), chosen on such a CPU: ATen's
  AVX2 kernels (``ATEN_CPU_CAPABILITY=avx2``), oneDNN's at most AVX2
  (``ONEDNN_MAX_CPU_ISA=AVX2``), numpy without its AVX-512 loops; an AVX-512 CPU gives up
  its wider vectors;
- ``x86-64-v2`` (SSE4.1), on an older CPU, or forced with ``SM_NUMERICS=x86-64-v2`` (e.g. a
  cluster whose nodes differ): ATen's portable kernels, oneDNN's SSE4.1 code, numpy's
  baseline loops.

Both take MKL's ``COMPATIBLE`` branch (``MKL_CBWR``), the one branch that Intel documents as
reproducible on Intel and non-Intel CPUs alike.

These variables act only when they are set before the libraries load, so ``import sm_utils``
sets them (:func:`pin`) and every process the package starts (grid workers, notebook
kernels, SLURM jobs) inherits them. Import ``sm_utils`` before numpy and torch.
``SM_NUMERICS=native`` leaves the libraries to choose (``benchmarks/bench_numerics.py``
measures what pinning costs). Each run records what was in effect (:func:`describe`) in its
``config.json``.

Not pinned: OpenBLAS, the BLAS of numpy and scipy (used by scikit-learn's logistic
regression in the probes), which picks its kernels by CPU model unless ``OPENBLAS_CORETYPE``
is set; this package leaves that variable to the machine and records it. Other architectures
(arm64) are not pinned either: their kernels differ from x86-64's whatever is set.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import warnings
from typing import Any

NUMERICS_ENV = "SM_NUMERICS"
PINNED_MACHINES = ("x86_64", "AMD64")

# The x86 extensions numpy 1.26-2.4 dispatches beyond its baseline (2.4 names them by level:
# X86_V3 = AVX2/FMA3, X86_V4 = AVX-512). A name this numpy does not dispatch only raises an
# ImportWarning, which pin() silences; children get the exact names (see pin()).
NUMPY_AVX512 = ("X86_V4", "AVX512F", "AVX512CD", "AVX512_KNL", "AVX512_KNM", "AVX512_SKX",
                "AVX512_CLX", "AVX512_CNL", "AVX512_ICL", "AVX512_SPR")
NUMPY_BEYOND_SSE = ("X86_V3", "SSSE3", "SSE41", "POPCNT", "SSE42", "AVX", "F16C", "FMA3", "AVX2",
                    *NUMPY_AVX512)
PROFILES = {
    "x86-64-v3": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                  "MKL_CBWR": "COMPATIBLE", "NPY_DISABLE_CPU_FEATURES": " ".join(NUMPY_AVX512)},
    "x86-64-v2": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41",
                  "MKL_CBWR": "COMPATIBLE", "NPY_DISABLE_CPU_FEATURES": " ".join(NUMPY_BEYOND_SSE)},
}
ATEN_OF_PROFILE = {"x86-64-v3": "AVX2", "x86-64-v2": "DEFAULT"}  # get_cpu_capability() names
MODES = ("pinned", "native", *PROFILES)
PINNED_VARIABLES = tuple(PROFILES["x86-64-v3"])
PROFILE_ENV = "SM_NUMERICS_PROFILE"  # the profile pin() chose, for children and the record
# Read for the record only (see the module docstring).
RECORDED_ENV = (*PINNED_VARIABLES, "OPENBLAS_CORETYPE", NUMERICS_ENV, PROFILE_ENV)


class NumericsError(ValueError):
    """An unknown numerics mode."""


def mode(environ=None) -> str:
    """``pinned`` (default: the CPU's level), ``native``, or a profile name, from
    ``$SM_NUMERICS``."""
    value = (os.environ if environ is None else environ).get(NUMERICS_ENV, "").strip() or "pinned"
    if value not in MODES:
        raise NumericsError(f"{NUMERICS_ENV} must be one of {list(MODES)}; got {value!r}. "
                            f"Unset it to pin the CPU numerics at this CPU's level, or set "
                            f"{NUMERICS_ENV}=native to let the libraries choose.")
    return value


def pinnable(machine: str | None = None) -> bool:
    return (machine or platform.machine()) in PINNED_MACHINES


def cpu_flags() -> set[str]:
    """The CPU's instruction-set flags, read without loading numpy or torch (Linux, macOS)."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    if sys.platform == "darwin":  # pragma: no cover (Intel Macs)
        try:
            out = subprocess.run(["sysctl", "-n", "machdep.cpu.features",
                                  "machdep.cpu.leaf7_features"], capture_output=True, text=True,
                                 timeout=5, check=False).stdout
        except (OSError, subprocess.TimeoutExpired):
            return set()
        return {word.lower() for word in out.split()}
    return set()


def profile(environ=None) -> str | None:
    """The profile a pinned process uses: the one ``$SM_NUMERICS`` names, else x86-64-v3 where
    the CPU has AVX2 and FMA, else x86-64-v2; None when not pinning."""
    chosen = mode(environ)
    if chosen == "native" or not pinnable():
        return None
    if chosen in PROFILES:
        return chosen
    flags = cpu_flags()
    return "x86-64-v3" if {"avx2", "fma"} <= flags else "x86-64-v2"


def pin() -> bool:
    """Set the pinned variables in this process's environment (and so its children's), unless
    ``SM_NUMERICS=native`` or the CPU is not x86-64. Returns whether it pinned.

    Values already in the environment are replaced: pinned means the same code on every CPU.
    Run before numpy and torch load (``import sm_utils`` does); a library loaded earlier keeps
    its own choice, which :func:`describe` shows and :func:`check` reports.
    """
    chosen = profile()
    if chosen is None:
        return False
    numpy_loaded = "numpy" in sys.modules
    os.environ.update(PROFILES[chosen])
    os.environ[PROFILE_ENV] = chosen
    with warnings.catch_warnings():  # names this numpy does not dispatch (see NUMPY_BEYOND_SSE)
        warnings.simplefilter("ignore", ImportWarning)
        import numpy  # noqa: F401  (loads with the variable set, unless it was loaded before)
    dispatched = _numpy_dispatch()
    if dispatched is not None:  # children: exactly this numpy's names, so no warning there
        wanted = set(PROFILES[chosen]["NPY_DISABLE_CPU_FEATURES"].split())
        os.environ["NPY_DISABLE_CPU_FEATURES"] = " ".join(n for n in dispatched if n in wanted)
    if numpy_loaded and _numpy_unpinned():
        warnings.warn("numpy was imported before sm_utils, so its vector kernels are not pinned "
                      "in this process; import sm_utils first (docs/REPRODUCIBILITY.md).",
                      RuntimeWarning, stacklevel=2)
    return True


def _numpy_module():
    try:
        from numpy._core import _multiarray_umath  # numpy >= 2
    except ImportError:  # pragma: no cover (numpy 1.x)
        from numpy.core import _multiarray_umath
    return _multiarray_umath


def _numpy_dispatch() -> list[str] | None:
    try:
        return list(_numpy_module().__cpu_dispatch__)
    except (ImportError, AttributeError):  # pragma: no cover
        return None


def _numpy_enabled_dispatch() -> list[str]:
    """The dispatch targets numpy runs in this process."""
    module = _numpy_module()
    features = getattr(module, "__cpu_features__", {})
    return [name for name in getattr(module, "__cpu_dispatch__", []) if features.get(name)]


def _numpy_unpinned() -> list[str]:
    """Dispatch targets numpy runs here that the chosen profile disables."""
    chosen = os.environ.get(PROFILE_ENV)
    if chosen not in PROFILES:
        return []
    disabled = set(PROFILES[chosen]["NPY_DISABLE_CPU_FEATURES"].split())
    return [name for name in _numpy_enabled_dispatch() if name in disabled]


def effective() -> dict[str, Any]:
    """What the libraries actually run in this process (loads torch)."""
    import threadpoolctl
    import torch

    blas = [{"library": info.get("internal_api"), "architecture": info.get("architecture")}
            for info in threadpoolctl.threadpool_info() if info.get("user_api") == "blas"]
    return {
        "aten_capability": torch.backends.cpu.get_cpu_capability(),
        "numpy_dispatch": _numpy_enabled_dispatch(),
        "blas": blas,
    }


def describe() -> dict[str, Any]:
    """The numerics of this process, for a run's config.json."""
    chosen = os.environ.get(PROFILE_ENV) if profile() is not None else None
    return {
        "mode": mode(),
        "pinned": chosen is not None,
        "profile": chosen,
        "machine": platform.machine(),
        "env": {name: os.environ.get(name) for name in RECORDED_ENV if os.environ.get(name)},
        **effective(),
    }


def check() -> list[str]:
    """Where this process runs other kernels than its pinned profile asks for (a library
    loaded before ``sm_utils``); empty when pinned as intended or not pinning at all."""
    chosen = os.environ.get(PROFILE_ENV) if profile() is not None else None
    if chosen is None:
        return []
    state = effective()
    problems = []
    if state["aten_capability"] != ATEN_OF_PROFILE[chosen]:
        problems.append(f"torch runs its {state['aten_capability']} kernels (pinned: "
                        f"{ATEN_OF_PROFILE[chosen]})")
    unpinned = _numpy_unpinned()
    if unpinned:
        problems.append(f"numpy runs {'/'.join(unpinned)} kernels (pinned: not those)")
    return problems


def warn_if_unpinned() -> None:
    """One warning naming what is not pinned, e.g. before training (see :func:`check`)."""
    problems = check()
    if problems:
        warnings.warn("CPU numerics not pinned as intended: " + "; ".join(problems) + ". Results "
                      "may then differ on other CPUs: import sm_utils before numpy and torch, or "
                      f"set {NUMERICS_ENV}=native to choose freely (docs/REPRODUCIBILITY.md).",
                      RuntimeWarning, stacklevel=2)
