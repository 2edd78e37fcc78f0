"""Images checked once, up front, in parallel (sm_utils.datasets.image_check)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sm_utils.datasets import image_check


@pytest.fixture
def folder(tmp_path):
    """Twelve PNGs, three of them damaged (truncated, overwritten, empty)."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(12):
        path = tmp_path / f"{i:02d}.png"
        Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(path)
        paths.append(path)
    whole = paths[2].read_bytes()
    paths[2].write_bytes(whole[:-40])
    paths[5].write_bytes(b"GIF89a garbage")
    paths[9].write_bytes(b"")
    return paths


def test_every_damaged_file_is_found_in_parallel_as_in_one_process(folder, monkeypatch):
    monkeypatch.setattr(image_check, "CHUNK", 2)  # six tasks for two processes
    parallel = image_check.check_images(folder, workers=2)
    assert sorted(parallel) == [str(folder[i]) for i in (2, 5, 9)]
    assert parallel == image_check.check_images(folder, workers=1)
    assert all(parallel.values())  # each with its reason


def test_files_that_passed_are_not_checked_again_until_they_change(folder, tmp_path, monkeypatch):
    memo = tmp_path / "memo.json"
    assert len(image_check.check_images(folder, workers=1, memo=memo)) == 3
    checked = []
    real = image_check._check_chunk
    monkeypatch.setattr(image_check, "_check_chunk", lambda paths: checked.extend(paths)
                        or real(paths))
    assert len(image_check.check_images(folder, workers=1, memo=memo)) == 3
    assert sorted(checked) == [str(folder[i]) for i in (2, 5, 9)]  # only the damaged ones
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder[0])  # rewritten: checked again
    checked.clear()
    image_check.check_images(folder, workers=1, memo=memo)
    assert str(folder[0]) in checked and str(folder[1]) not in checked


def test_a_pool_that_cannot_start_falls_back_to_one_process(folder, monkeypatch):
    class NoPool:
        def __init__(self, *args, **kwargs):
            raise OSError("[Errno 11] Resource temporarily unavailable")

    import concurrent.futures

    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", NoPool)
    monkeypatch.setattr(image_check, "CHUNK", 2)
    with pytest.warns(RuntimeWarning, match="running them in this process instead"):
        found = image_check.check_images(folder, workers=2)
    assert sorted(found) == [str(folder[i]) for i in (2, 5, 9)]


def test_the_cores_of_a_slurm_allocation_are_used(monkeypatch):
    import os

    from sm_utils.progress import available_cpus

    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "6")
    assert available_cpus() == 6
    monkeypatch.delenv("SLURM_CPUS_PER_TASK")
    monkeypatch.delenv("SLURM_CPUS_ON_NODE", raising=False)
    assert available_cpus() == len(os.sched_getaffinity(0))


def test_the_full_size_rehearsal_runs_its_steps_on_a_slice(tmp_path):
    """benchmarks/bench_full_size.py at 2,000 rows (the full run: 112,120): each data step is
    timed, with its memory, and the parallel steps' speed-ups are printed."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "result.json"
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_full_size.py"
    done = subprocess.run([sys.executable, str(script), "--images", "2000", "--px", "64",
                           "--bases", "4", "--speedup-images", "300", "--out", str(out),
                           "--folder", str(tmp_path / "data")],
                          check=False, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    steps = {row["step"]: row for row in json.loads(out.read_text())["steps"]}
    assert steps["build_dataset nih_cxr14 (first: checks every image)"]["wall_s"] > 0
    assert any(name.startswith("image cache at 64 px") for name in steps)
    assert all(row["peak_rss_mb"] > 0 for row in steps.values() if "wall_s" in row)
    assert sum(name.startswith("speed-up of") for name in steps) == 2
    assert len(list((tmp_path / "data" / "nih").glob("images_0*/images/*.png"))) == 2000
