"""What pinning the CPU numerics costs (sm_utils.numerics): training speed pinned vs native.

Each measurement runs in a fresh process (the kernels are chosen when the libraries load),
one thread, deterministic algorithms as the runs use them; the modes alternate, so a machine
that gets busier affects both alike. Printed: images/s of the training step (forward,
backward, Adam) per model and mode, their median over the repeats and the ratio; with the
demo built (`make demo`), also the training seconds of one whole demo run (fold 0, tag,
p = 0.5, ImageNet lite0):

    .venv/bin/python benchmarks/bench_numerics.py                # 3 repeats
    .venv/bin/python benchmarks/bench_numerics.py --repeats 5 --no-demo-run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = {  # (architecture, input px, batch): the demo's model, and the paper's ResNet50
    "tf_efficientnet_lite0 64 px, batch 32": ("tf_efficientnet_lite0", 64, 32),
    "keras_resnet50 64 px, batch 16": ("keras_resnet50", 64, 16),
}

STEP_CHILD = """
import json, sys, time
import sm_utils  # first: pins the numerics unless SM_NUMERICS=native
import torch
from torch import nn
from sm_utils.sources import make_architecture
from sm_utils.training import configure_device
arch, size, batch, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.manual_seed(0)
with configure_device(torch.device("cpu"), threads=1) as record:
    model = make_architecture(arch, num_classes=2, drop_rate=0.5).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.rand(batch, 3, size, size)
    y = torch.randint(0, 2, (batch,))
    def step():
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    for _ in range(2):
        step()
    tic = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = time.perf_counter() - tic
print(json.dumps({"images_per_s": steps * batch / seconds,
                  "aten": record["numerics"]["aten_capability"]}))
"""

RUN_CHILD = """
import json, sys
import sm_utils  # first: pins the numerics unless SM_NUMERICS=native
from sm_utils.grid import expand_cells, load_grid
from sm_utils.runs import RunConfig, train_run
spec = load_grid(sys.argv[1])
cell = next(c for c in expand_cells(spec) if c.params["source"] == "imagenet_lite0"
            and c.params["confounder"] == "tag" and c.params["p"] == 0.5 and c.params["fold"] == 0)
config = RunConfig.from_dict(dict(cell.params, device="cpu", runs_dir=sys.argv[2]))
with train_run(config, progress=False, threads=1) as run:
    print(json.dumps({"train_seconds": run.result.train_seconds}))
"""


def child(code: str, mode: str, *args: str) -> dict:
    env = {**os.environ, "SM_NUMERICS": mode, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    for name in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR",
                 "NPY_DISABLE_CPU_FEATURES"):  # this process's pins must not reach "native"
        env.pop(name, None)
    done = subprocess.run([sys.executable, "-c", code, *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{mode}: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(name: str, values: dict[str, list[float]], unit: str, higher_is_faster: bool) -> None:
    median = {mode: statistics.median(v) for mode, v in values.items()}
    cost = (median["native"] / median["pinned"] if higher_is_faster
            else median["pinned"] / median["native"])
    for mode, v in values.items():
        print(f"  {mode:7s} {median[mode]:8.2f} {unit} (median of {len(v)}: "
              f"{', '.join(f'{x:.2f}' for x in v)})")
    print(f"  pinned takes {cost:.2f}x the time of native")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8, help="timed training steps per process")
    parser.add_argument("--no-demo-run", action="store_true")
    args = parser.parse_args()
    import platform

    print(f"{platform.machine()}, {os.cpu_count()} cores; one thread per process")
    for name, (arch, size, batch) in MODELS.items():
        values: dict[str, list[float]] = {"native": [], "pinned": []}
        for _ in range(args.repeats):
            for mode, measured in values.items():
                out = child(STEP_CHILD, mode, arch, str(size), str(batch), str(args.steps))
                measured.append(out["images_per_s"])
        print(f"training step, {name} (images/s):")
        report(name, values, "images/s", higher_is_faster=True)
    demo = ROOT / "configs" / "demo.yaml"
    if not args.no_demo_run:
        if not (ROOT / "data" / "demo" / "phantom_cxr" / "manifest.csv").exists():
            print("demo run: skipped (build the demo's data first: make demo)")
            return 0
        import tempfile

        values = {"native": [], "pinned": []}
        with tempfile.TemporaryDirectory() as runs:
            for _ in range(args.repeats):
                for mode, measured in values.items():
                    measured.append(child(RUN_CHILD, mode, str(demo), runs)["train_seconds"])
        print("one demo run (imagenet_lite0, tag, p = 0.5, fold 0), training seconds:")
        report("demo run", values, "s", higher_is_faster=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
