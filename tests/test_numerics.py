"""Pinned CPU numerics (sm_utils.numerics): the same bits whichever x86-64 CPU computes them.

Another CPU is emulated by the variables that cap what the libraries may use (ATen's
capability, oneDNN's ISA, MKL's branch, numpy's dispatch): this machine then runs the kernels
that a CPU with only those instruction sets would run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sm_utils import numerics

ROOT = Path(__file__).resolve().parents[1]
CHILD = ROOT / "tests" / "cpu_emulation.py"
NUMPY_OFF = numerics.PROFILES["x86-64-v2"]["NPY_DISABLE_CPU_FEATURES"]


def emulated_cpus() -> dict[str, dict[str, str]]:
    """Kernel choices of other x86-64 CPUs, as far as this one can run them."""
    flags = numerics.cpu_flags()
    cpus = {
        "SSE4.1 (no AVX)": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41",
                            "MKL_CBWR": "COMPATIBLE", "NPY_DISABLE_CPU_FEATURES": NUMPY_OFF},
        "AVX (no AVX2)": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "AVX",
                          "MKL_CBWR": "AVX", "NPY_DISABLE_CPU_FEATURES": NUMPY_OFF},
    }
    if {"avx2", "fma"} <= flags:
        cpus["AVX2"] = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                        "MKL_CBWR": "AVX2"}
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        cpus["AVX-512"] = {"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE",
                           "MKL_CBWR": "AVX512"}
    return cpus


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in numerics.RECORDED_ENV
           or k == "OPENBLAS_CORETYPE"}  # the machine's OpenBLAS setting stays as it is
    return {**env, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **extra}


def run_children(manifest: Path, tmp_path: Path, settings: dict[str, dict[str, str]]):
    """Each setting in a fresh process (two at a time); their JSON outputs by name."""
    outputs, running = {}, []
    names = list(settings)
    while names or running:
        while names and len(running) < 2:
            name = names.pop(0)
            proc = subprocess.Popen(
                [sys.executable, str(CHILD), str(manifest), str(tmp_path / "runs" / name)],
                env=clean_env(**settings[name]), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                text=True, cwd=ROOT)
            running.append((name, proc))
        name, proc = running.pop(0)
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{name}: {err[-2000:]}"
        outputs[name] = json.loads(out.strip().splitlines()[-1])
    return outputs


@pytest.mark.numerics
@pytest.mark.slow
@pytest.mark.skipif(not numerics.pinnable(), reason="numerics are pinned on x86-64 only")
def test_training_and_pretraining_are_bit_identical_across_emulated_cpus(phantom_cxr, tmp_path):
    cpus = emulated_cpus()
    assert len(cpus) >= 3, f"this machine can emulate only {list(cpus)}"
    # left to choose (native), the oldest and the newest CPU show that the kernels differ
    oldest, newest = next(iter(cpus)), list(cpus)[-1]
    modes = {"native": [oldest, newest], "pinned": list(cpus), "x86-64-v2": list(cpus)}
    results = {mode: run_children(phantom_cxr, tmp_path / mode,
                                  {name: {**cpus[name], "SM_NUMERICS": mode} for name in names})
               for mode, names in modes.items()}

    # The emulations really pick other kernels: left to choose, the CPUs disagree ...
    native = results["native"]
    assert native[oldest]["run_weights"] != native[newest]["run_weights"], native
    assert native[oldest]["source_weights"] != native[newest]["source_weights"], native
    # ... pinned, every CPU gives the same bits: weights, scores, AUCs, pretrained source, at
    # this CPU's level (x86-64-v3 where it has AVX2) and at the older level forced.
    level = numerics.profile({})
    for mode, expected_aten in (("pinned", numerics.ATEN_OF_PROFILE[level]),
                                ("x86-64-v2", "DEFAULT")):
        outputs = results[mode]
        reference = outputs["SSE4.1 (no AVX)"]
        for name, out in outputs.items():
            assert out["aten"] == expected_aten, (mode, name)
            assert out["profile"] == (level if mode == "pinned" else mode), (mode, name)
            for key in ("run_weights", "run_scores", "source_weights", "auc_iid", "auc_ood",
                        "auc_clean", "source_val_loss"):
                assert out[key] == reference[key], f"{mode}, {name}: {key} differs from SSE4.1's"
    # x86-64-v2 is exactly what an SSE4.1 CPU computes when left to itself.
    assert native["SSE4.1 (no AVX)"]["run_weights"] == results["x86-64-v2"]["SSE4.1 (no AVX)"]["run_weights"]


def python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=clean_env(**env), cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)


def test_importing_sm_utils_pins_this_process_and_its_children():
    child = ("import os, json; print(json.dumps({k: os.environ.get(k) for k in "
             f"{list(numerics.PINNED_VARIABLES)}}}))")
    code = ("import subprocess, sys, json, sm_utils\n"
            "from sm_utils import numerics\n"
            f"child = subprocess.run([sys.executable, '-c', {child!r}], capture_output=True, "
            "text=True).stdout\n"
            "print(json.dumps({'state': numerics.describe(), 'child': json.loads(child)}))")
    done = python(code, ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    if not numerics.pinnable():
        assert out["state"]["pinned"] is False
        return
    state = out["state"]
    level = numerics.profile({})
    assert state["pinned"] is True and state["mode"] == "pinned" and state["profile"] == level
    assert state["aten_capability"] == numerics.ATEN_OF_PROFILE[level]  # the user's own replaced
    assert state["env"]["ONEDNN_MAX_CPU_ISA"] == numerics.PROFILES[level]["ONEDNN_MAX_CPU_ISA"]
    assert state["env"]["MKL_CBWR"] == "COMPATIBLE"
    assert not set(state["numpy_dispatch"]) & set(numerics.NUMPY_AVX512)
    for name in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR"):
        assert out["child"][name] == numerics.PROFILES[level][name]
    # children get exactly this numpy's dispatch targets (no warning about unknown names)
    import numpy._core._multiarray_umath as umath
    disabled = out["child"]["NPY_DISABLE_CPU_FEATURES"].split()
    assert disabled and set(disabled) <= set(umath.__cpu_dispatch__)
    assert done.stderr == ""


def test_a_cpu_without_avx2_is_pinned_at_the_older_level(monkeypatch):
    monkeypatch.setattr(numerics, "pinnable", lambda machine=None: True)
    monkeypatch.setattr(numerics, "cpu_flags", lambda: {"sse4_1", "sse4_2", "avx"})
    assert numerics.profile({}) == "x86-64-v2"
    monkeypatch.setattr(numerics, "cpu_flags", lambda: {"sse4_1", "avx", "avx2", "fma"})
    assert numerics.profile({}) == "x86-64-v3"
    assert numerics.profile({"SM_NUMERICS": "x86-64-v2"}) == "x86-64-v2"  # forced
    assert numerics.profile({"SM_NUMERICS": "native"}) is None


def test_native_leaves_the_libraries_to_choose():
    done = python("import json, sm_utils; from sm_utils import numerics; "
                  "print(json.dumps(numerics.describe()))",
                  SM_NUMERICS="native", ONEDNN_MAX_CPU_ISA="AVX")
    assert done.returncode == 0, done.stderr
    state = json.loads(done.stdout)
    assert state["pinned"] is False and state["mode"] == "native"
    assert state["env"].get("ONEDNN_MAX_CPU_ISA") == "AVX"  # the user's own choice stays
    assert "ATEN_CPU_CAPABILITY" not in state["env"]


def test_an_unknown_mode_is_refused_with_the_valid_ones():
    done = python("import sm_utils", SM_NUMERICS="fast")
    assert done.returncode != 0
    assert ("SM_NUMERICS must be one of ['pinned', 'native', 'x86-64-v3', 'x86-64-v2']; "
            "got 'fast'") in done.stderr


@pytest.mark.slow
@pytest.mark.skipif(not numerics.pinnable(), reason="numerics are pinned on x86-64 only")
def test_numpy_imported_first_is_named_and_training_warns():
    done = python("import numpy\nimport sm_utils, torch\nfrom sm_utils import numerics\n"
                  "from sm_utils.training import configure_device\n"
                  "print(numerics._numpy_enabled_dispatch())\n"
                  "with configure_device(torch.device('cpu'), threads=1) as record:\n"
                  "    print(record['numerics']['numpy_dispatch'])",
                  SM_NUMERICS="x86-64-v2")  # the level that disables most of numpy's kernels
    assert done.returncode == 0, done.stderr
    enabled = done.stdout.splitlines()[0]
    if enabled == "[]":
        pytest.skip("numpy dispatches no extension beyond its baseline on this CPU")
    assert "numpy was imported before sm_utils" in done.stderr
    assert "import sm_utils first" in done.stderr
    # training says so again, and the run's record shows the kernels numpy really ran
    assert "CPU numerics not pinned as intended: numpy runs" in done.stderr
    assert done.stdout.splitlines()[1] == enabled
