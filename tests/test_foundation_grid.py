"""The foundation grid's offline rehearsal (configs/foundation_demo.yaml) end to end, as a user
runs it: `sm run` builds a small random ViT in each published format (a timm checkpoint, a
transformers folder, an open_clip checkpoint with its config), fine-tunes and linearly probes
every source, analyses the grid; `sm claims` puts the transformers-format ViT in the in-domain
role as the grid file says, or the linear probe's arm where --role says so."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
GRID = ROOT / "configs" / "foundation_demo.yaml"


def sm(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SM_CACHE_DIR": str(cwd / "cache"),
           "SM_PLUGINS": ""}
    return subprocess.run([sys.executable, "-m", "sm_utils", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=1200, check=False)


@pytest.fixture(scope="module")
def foundation_grid(tmp_path_factory):
    """The demo grid, one fold and one epoch, everything it writes under a temporary folder."""
    out = tmp_path_factory.mktemp("foundation")
    weights = out / "weights"
    override = {
        "runs_dir": str(out / "runs"), "figures_dir": str(out / "figures"), "folds": [0],
        "datasets": [{"name": "phantom_cxr", "manifest": str(out / "data/manifest.csv")}],
        "sources": [{"name": "timm_vit", "weights": str(weights / "vit.safetensors")},
                    {"name": "rad_dino", "weights": str(weights / "tiny-rad-dino")},
                    {"name": "open_clip", "weights": str(weights / "tiny-clip")}],
        "training": {"epochs": 1},
    }
    (out / "small.yaml").write_text(yaml.safe_dump(override))
    result = sm("run", str(GRID), "--override", str(out / "small.yaml"), "--progress", "off",
                cwd=out)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return out, result


@pytest.mark.numerics
def test_the_foundation_demo_runs_every_source_both_ways(foundation_grid):
    out, result = foundation_grid
    log = result.stdout + result.stderr
    assert [line for line in log.splitlines() if "warning" in line.lower()] == []
    assert "Writing model shards" not in log  # no library progress bar in the grid's log
    # Each stand-in is written in its library's published format before the cells.
    weights = out / "weights"
    assert (weights / "vit.safetensors").is_file()
    assert {p.name for p in (weights / "tiny-rad-dino").iterdir()} == {
        "config.json", "model.safetensors", "preprocessor_config.json"}
    assert {p.name for p in (weights / "tiny-clip").iterdir()} == {
        "open_clip_config.json", "open_clip_model.safetensors"}

    cells = pd.read_csv(out / "runs" / "cells.csv")
    # 1 confounder x 2 p x 1 fold x 5 sources x 2 modes, every one run
    report = json.loads((out / "runs" / "grid_report.json").read_text())
    assert len(cells) == 20 and report["succeeded"] == 20 and report["failures"] == []
    assert cells.groupby("mode")["source"].nunique().to_dict() == {"finetune": 5,
                                                                   "linear_probe": 5}
    configs = [json.loads(p.read_text()) for p in (out / "runs").glob("*/config.json")]
    modes = {(c["config"]["source"], c["config"]["mode"]) for c in configs}
    assert len(configs) == 20 and len(modes) == 10
    probes = [c for c in configs if c["config"]["mode"] == "linear_probe"]
    assert all(c["identity"]["mode"] == "linear_probe" for c in probes)
    assert all("mode" not in c["identity"] for c in configs if c not in probes)
    # the transformers folder is named by its content
    assert all(len(c["identity"]["weights"]) == 64 for c in configs
               if c["config"]["source"] == "rad_dino")

    results = pd.read_csv(out / "runs" / "results.csv")
    assert set(results["source"]) == {
        f"{s}{suffix}" for s in ("imagenet_lite0", "timm_vit", "rad_dino", "open_clip", "random")
        for suffix in ("", ":linear_probe")}
    assert (results["mode"] == "linear_probe").sum() == (results["mode"] == "finetune").sum()
    # ViTs beside a CNN: the architecture belongs to each source, so all are compared
    assert set(results["arch"]) == {"per source"}
    assert results.groupby("source")["source_arch"].nunique().max() == 1
    assert list((out / "figures").glob("*auc_vs_p.png"))


@pytest.mark.numerics
def test_claims_put_a_foundation_source_in_the_in_domain_role(foundation_grid):
    out, _ = foundation_grid

    def claims(*extra: str) -> pd.DataFrame:
        result = sm("claims", str(GRID), "--override", str(out / "small.yaml"), "--format",
                    "csv", *extra, cwd=out)
        assert result.returncode == 0, result.stderr[-3000:]
        return pd.read_csv(io.StringIO(result.stdout))

    def in_domain(table: pd.DataFrame) -> set[str]:
        rows = table[table["roles"].fillna("").str.contains("in_domain")]
        sources = rows.apply(lambda r: dict(zip(r["roles"].split(" vs "),
                                                r["sources"].split(" vs ")))["in_domain"],
                             axis=1)
        return set(sources)

    assert in_domain(claims()) == {"rad_dino"}  # the grid file's roles
    assert in_domain(claims("--role", "in_domain=rad_dino:linear_probe")) == {
        "rad_dino:linear_probe"}
