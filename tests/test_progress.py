"""Progress bars of the long data steps (issue 14): shown on a terminal or when asked, silent
otherwise, and never changing a result or a written file. Also LICENSE and CITATION.cff."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from fakes.lidc_files import make_lidc_root
from fakes.nih_files import make_nih_root
from PIL import Image

from sm_utils.data import ImageCache
from sm_utils.datasets import build_dataset
from sm_utils.manifest import Manifest
from sm_utils.progress import PROGRESS_ENV, bars_disabled

PROJECT = Path(__file__).resolve().parents[1]
LIDC_SPLITS = {"n_folds": 2, "test_fraction": 0.34, "val_fraction": 0.34}
NIH_BARS = ("reading Data_Entry_2017_v2020.csv", "indexing NIH image folders")
LIDC_BARS = ("finding DICOM files", "reading DICOM series headers",
             "reading series, writing nodule PNGs")


def small_manifest(root: Path, n: int = 6) -> Manifest:
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (40, 52), dtype=np.uint8)).save(
            root / "images" / f"img{i}.png")
    table = pd.DataFrame({"image_id": [f"img{i}" for i in range(n)],
                          "path": [f"images/img{i}.png" for i in range(n)], "label": [0, 1] * (n // 2)})
    return Manifest(table=table, root=root)


def tree_bytes(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> content)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("value,disable", [("on", False), ("1", False), ("OFF", True),
                                           ("0", True), ("auto", None), (None, None)])
def test_setting_from_the_environment(monkeypatch, value, disable):
    if value is None:
        monkeypatch.delenv(PROGRESS_ENV, raising=False)
    else:
        monkeypatch.setenv(PROGRESS_ENV, value)
    assert bars_disabled() is disable
    assert bars_disabled(True) is False and bars_disabled(False) is True  # a parameter wins


def test_unknown_setting_is_refused(monkeypatch):
    monkeypatch.setenv(PROGRESS_ENV, "loud")
    with pytest.raises(ValueError, match="on, off or auto"):
        bars_disabled()


@pytest.mark.parametrize("how", ["environment", "parameter"])
def test_cache_build_shows_a_bar_when_asked(tmp_path, capsys, monkeypatch, how):
    manifest = small_manifest(tmp_path / "data")
    monkeypatch.delenv(PROGRESS_ENV, raising=False)
    if how == "environment":
        monkeypatch.setenv(PROGRESS_ENV, "on")
    ImageCache.for_manifest(manifest, 32, tmp_path / "cache", resize="nearest",
                            progress=True if how == "parameter" else None)
    err = capsys.readouterr().err
    assert "image cache 32 px (nearest)" in err and "6/6" in err


def test_cache_build_silent_off_a_terminal_and_same_bytes(tmp_path, capsys, monkeypatch):
    manifest = small_manifest(tmp_path / "data")
    monkeypatch.delenv(PROGRESS_ENV, raising=False)
    quiet = ImageCache.for_manifest(manifest, 32, tmp_path / "quiet")  # stderr is captured
    assert capsys.readouterr().err == ""
    shown = ImageCache.for_manifest(manifest, 32, tmp_path / "shown", progress=True)
    assert "image cache 32 px (bilinear)" in capsys.readouterr().err
    assert quiet.path.name == shown.path.name
    assert tree_bytes(tmp_path / "quiet") == tree_bytes(tmp_path / "shown")
    assert np.array_equal(quiet.array, shown.array)


def test_nih_builder_bars_and_same_files(tmp_path, capsys, monkeypatch):
    root = tmp_path / "nih"
    make_nih_root(root, n_patients=60, variant="v2020")
    params = {"root": root, "views": "PA", "n_folds": 3}
    monkeypatch.setenv(PROGRESS_ENV, "on")
    build_dataset("nih_cxr14", tmp_path / "shown", **params)
    err = capsys.readouterr().err
    assert all(bar in err for bar in NIH_BARS), err
    monkeypatch.delenv(PROGRESS_ENV)
    build_dataset("nih_cxr14", tmp_path / "quiet", **params)
    assert capsys.readouterr().err == ""
    files = tree_bytes(tmp_path / "shown")
    assert set(files) == {"manifest.csv", "manifest.meta.json"}
    assert files == tree_bytes(tmp_path / "quiet")


def test_lidc_builder_bars_and_same_files(tmp_path, capsys, monkeypatch):
    _series, table = make_lidc_root(tmp_path / "LIDC-IDRI", n_patients=6)
    params = {"root": tmp_path / "LIDC-IDRI", "annotations": table, "roi_mm": 8.4,  # fits the
              **LIDC_SPLITS}                                                 # fakes' slices
    monkeypatch.setenv(PROGRESS_ENV, "on")
    build_dataset("lidc_idri", tmp_path / "shown", **params)
    err = capsys.readouterr().err
    assert all(bar in err for bar in LIDC_BARS), err
    assert "6/6" in err  # one step per series
    monkeypatch.delenv(PROGRESS_ENV)
    build_dataset("lidc_idri", tmp_path / "quiet", **params)
    assert capsys.readouterr().err == ""
    files = tree_bytes(tmp_path / "shown")
    assert sum(name.endswith(".png") for name in files) == 12
    assert files == tree_bytes(tmp_path / "quiet")


SCRIPT = textwrap.dedent("""
    import sys, warnings
    warnings.simplefilter("ignore")
    sys.path.insert(0, sys.argv[2])
    from pathlib import Path
    from fakes.nih_files import make_nih_root
    from sm_utils.data import ImageCache
    from sm_utils.datasets import build_dataset
    from sm_utils.manifest import load_manifest
    work = Path(sys.argv[1])
    make_nih_root(work / "nih", n_patients=60)
    build_dataset("nih_cxr14", work / "out", root=work / "nih", views="PA", n_folds=3)
    ImageCache.for_manifest(load_manifest(work / "out" / "manifest.csv"), 32, work / "cache")
""")


def run_script(work: Path, stderr) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != PROGRESS_ENV}
    return subprocess.run([sys.executable, "-c", SCRIPT, str(work), str(PROJECT / "tests")],
                          check=False, stderr=stderr, stdout=subprocess.DEVNULL, env=env,
                          timeout=300, cwd=PROJECT)


def test_silent_when_stderr_is_a_pipe(tmp_path):
    done = run_script(tmp_path, subprocess.PIPE)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stderr.decode() == ""


@pytest.mark.skipif(sys.platform == "win32", reason="needs a pseudo-terminal")
def test_shown_when_stderr_is_a_terminal(tmp_path):
    import fcntl
    import pty
    import struct
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    try:
        done = run_script(tmp_path, follower)
        os.close(follower)
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # Linux: EIO once the terminal is drained and closed
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(leader)
    text = b"".join(chunks).decode(errors="replace")
    assert done.returncode == 0, text
    assert all(bar in text for bar in (*NIH_BARS, "image cache 32 px (bilinear)")), text


# --- LICENSE and CITATION.cff ------------------------------------------------------------

# SHA-256 of the MIT licence's terms (from "Permission is hereby granted" on, whitespace
# collapsed), the same as in the MIT-licensed packages of the environment (e.g. jedi, pylidc).
MIT_TERMS_SHA256 = "fe2a9817987f862eaced948f0468c7f51d2fedfc48c5c505b246a49a3870e9a5"


def test_license_is_mit():
    text = (PROJECT / "LICENSE").read_text(encoding="utf-8")
    head, terms = text.split("Permission is hereby granted", 1)
    assert " ".join(head.split()) == ("MIT License Copyright (c) 2026 the Source Matters "
                                      "compendium authors")
    terms = " ".join(("Permission is hereby granted" + terms).split())
    assert hashlib.sha256(terms.encode()).hexdigest() == MIT_TERMS_SHA256
    pyproject = tomllib.loads((PROJECT / "pyproject.toml").read_text())
    assert pyproject["project"]["license"] == {"text": "MIT"}


def test_citation_cff_is_valid():
    cff = yaml.safe_load((PROJECT / "CITATION.cff").read_text(encoding="utf-8"))
    for key in ("cff-version", "message", "title", "authors"):  # required by CFF 1.2.0
        assert cff.get(key), key
    assert cff["cff-version"] == "1.2.0"
    assert all(isinstance(a, dict) and ("name" in a or "family-names" in a)
               for a in cff["authors"])
    pyproject = tomllib.loads((PROJECT / "pyproject.toml").read_text())
    assert str(cff["version"]) == pyproject["project"]["version"]
    assert cff["license"] == "MIT" and cff["type"] == "software"
    assert str(cff["date-released"]) == "2026-11-30"
    (paper,) = [r for r in cff["references"] if "Source Matters" in r.get("title", "")]
    for key in ("type", "title", "authors"):  # required in a CFF reference
        assert paper.get(key), key
    assert paper["title"] == ("Source Matters: Source Dataset Impact on Model Robustness in "
                              "Medical Imaging")
    assert [(a["family-names"], a["given-names"]) for a in paper["authors"]] == [
        ("Juodelyte", "Dovile"), ("Lu", "Yucheng"), ("Jiménez-Sánchez", "Amelia"),
        ("Bottazzi", "Sabrina"), ("Ferrante", "Enzo"), ("Cheplygina", "Veronika")]
    assert paper["year"] == 2024
    assert {"type": "other", "value": "arXiv:2403.04484",
            "description": "The arXiv identifier of the paper"} in paper["identifiers"]
