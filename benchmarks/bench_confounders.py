"""Images per second for each synthetic confounder, on one CPU core, at 256 and 512 px.

    .venv/bin/python benchmarks/bench_confounders.py                 # all confounders
    .venv/bin/python benchmarks/bench_confounders.py --model         # + ResNet50 training speed

On-the-fly injection runs in the data loader's worker processes (one core each), so a
confounder keeps up with training when (its images/s) x (workers) exceeds the model's training
images/s; ``--model`` prints the latter (on the GPU if there is one) for that comparison.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core per loader worker, as in training
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# isort: off
import sm_utils  # noqa: F401  (before numpy and torch: pins the CPU numerics)
# isort: on
import numpy as np
import pandas as pd

from sm_utils.confounders import apply_prevalence, get_confounder, list_confounders
from sm_utils.phantoms import render_ct, render_cxr, sample_patient


def rate(fn, min_time: float, min_calls: int = 3) -> float:
    """Calls per second of ``fn`` over at least ``min_time`` seconds and ``min_calls`` calls."""
    fn()  # warm-up (font loading, FFT plans)
    calls, start = 0, time.perf_counter()
    while calls < min_calls or time.perf_counter() - start < min_time:
        fn()
        calls += 1
    return calls / (time.perf_counter() - start)


def phantom(name: str, size: int) -> np.ndarray:
    patient = sample_patient(0, 1)
    render = render_ct if "ct" in name else render_cxr
    return render(patient, size=size, finding=True, difficulty=0.5, rng=np.random.default_rng(0))


def bench_confounders(names, sizes, min_time) -> pd.DataFrame:
    records = []
    for name in names:
        conf = get_confounder(name)
        for size in sizes:
            image = phantom(name, size)
            confounded = rate(lambda c=conf, i=image: c.inject(i, True, 0, "bench"), min_time)
            clean = rate(lambda c=conf, i=image: c.inject(i, False, 0, "bench"), min_time)
            records.append({"confounder": name, "size": size,
                            "confounded_img_per_s": confounded, "clean_img_per_s": clean})
            print(f"{name:>15} {size:4d} px: {confounded:9.1f} img/s confounded, "
                  f"{clean:9.1f} img/s clean (baseline)", flush=True)
    return pd.DataFrame(records)


def bench_prevalence(n_rows: int = 100_000) -> float:
    rows = pd.DataFrame({"image_id": [f"img{i}" for i in range(n_rows)],
                         "label": np.arange(n_rows) % 2})
    conf = get_confounder("tag")
    start = time.perf_counter()
    apply_prevalence(rows, conf, 0.5, 0, "train")
    return time.perf_counter() - start


def bench_model(sizes, batch: int, steps: int = 10) -> None:
    """Training images/s of a timm ResNet50 (random init), bf16 autocast on a GPU."""
    import timm
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(1)
        batch, steps = min(batch, 4), 2
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU, 1 thread"
    model = timm.create_model("resnet50", pretrained=False, num_classes=2).to(device)
    model = model.to(memory_format=torch.channels_last)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-4)
    for size in sizes:
        x = torch.randn(batch, 3, size, size, device=device).to(memory_format=torch.channels_last)
        y = torch.randint(0, 2, (batch,), device=device)

        def step(x=x, y=y):
            with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()

        for _ in range(2):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
        per_s = batch * steps / (time.perf_counter() - start)
        print(f"ResNet50 training on {name}, {size} px, batch {batch}: {per_s:.1f} img/s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--confounders", nargs="+", default=list_confounders("synthetic"))
    parser.add_argument("--min-time", type=float, default=1.0, help="seconds per measurement")
    parser.add_argument("--model", action="store_true", help="also time ResNet50 training")
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()

    print(f"confounders on one CPU core ({os.cpu_count()} cores here)", flush=True)
    bench_confounders(args.confounders, args.sizes, args.min_time)
    print(f"apply_prevalence on 100,000 rows: {bench_prevalence():.2f} s")
    if args.model:
        bench_model(args.sizes, args.batch)


if __name__ == "__main__":
    main()
