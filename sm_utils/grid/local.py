"""The local executor: a pool of worker processes, one per GPU on a GPU machine (else a share
of the CPU cores), each running cells in its own warm kernel."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
from pathlib import Path

from ..progress import available_cpus
from .cells import Cell
from .errors import GridError
from .report import GridReport
from .runner import CellRunner, RunnerSettings


def _local_worker(settings: RunnerSettings, tasks, results, parent_pid: int) -> None:
    """Worker process: pull cells from ``tasks``, push ("start"/"done", ...) to ``results``."""
    import queue as queue_module

    runner = CellRunner(settings)
    try:
        while True:
            try:
                cell = tasks.get(timeout=2.0)
            except queue_module.Empty:
                if os.getppid() != parent_pid:  # the grid process is gone: stop
                    return
                continue
            if cell is None or os.getppid() != parent_pid:  # done, or the grid process is gone
                return
            results.put(("start", os.getpid(), cell.run_id))
            results.put(("done", os.getpid(), runner.run(cell)))
    finally:
        runner.close()
        results.put(("kernel", os.getpid(), runner.kernel_start_seconds))


def visible_gpus() -> list[str]:
    """The CUDA devices cells may use, as CUDA_VISIBLE_DEVICES names them: its own entries when
    set, else one per GPU that ``nvidia-smi -L`` lists (its index), except that a GPU split
    into MIG slices gives one device per slice (its MIG UUID). Empty without a GPU."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [v.strip() for v in visible.split(",") if v.strip() not in ("", "-1")]
    if shutil.which("nvidia-smi") is None:
        return []
    import re
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20,
                             check=False)
    except (OSError, subprocess.TimeoutExpired):
        return []
    devices: list[list[str]] = []   # per GPU: [its index, then its MIG UUIDs]
    for line in out.stdout.splitlines():
        gpu = re.match(r"GPU (\d+):", line)
        mig = re.search(r"\bMIG\b.*\(UUID: (MIG-[^)\s]+)\)", line)
        if gpu:
            devices.append([gpu.group(1)])
        elif mig and devices:
            devices[-1].append(mig.group(1))
    return [uuid for gpu in devices for uuid in (gpu[1:] or gpu[:1])]


def detect_gpus() -> int:
    """Number of visible CUDA devices: GPUs, or their MIG slices (0 without nvidia-smi)."""
    return len(visible_gpus())


def nvidia_driver_version() -> str | None:
    """The NVIDIA driver version nvidia-smi reports (None without nvidia-smi or an answer)."""
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = [line.strip() for line in out.stdout.splitlines() if line.strip()]
    return lines[0] if lines else None


def check_gpus_usable(device: str, log=print) -> None:
    """Refuse before any cell when nvidia-smi lists GPUs that torch cannot use: ``device:
    auto`` would train every cell on the CPU, ``cuda`` fail every cell (e.g. torch's default
    CUDA 13 wheel on a driver older than 580). ``auto`` without any GPU is said once."""
    device = str(device)
    if device != "auto" and not device.startswith("cuda"):
        return
    gpus = detect_gpus()
    if not gpus:
        if device == "auto":
            log("device auto: no NVIDIA GPU here, every cell runs on the CPU")
        return
    import torch

    if torch.cuda.is_available():
        return
    build = torch.version.cuda
    raise GridError(
        f"nvidia-smi lists {gpus} GPU(s) (driver {nvidia_driver_version() or 'unknown'}) but "
        f"torch {torch.__version__} cannot use them ("
        + (f"a build for CUDA {build}, which needs a newer driver" if build
           else "a CPU-only build")
        + f"): device {device!r} would "
        + ("train every cell on the CPU" if device == "auto" else "fail every cell")
        + ". Install a torch build your driver supports into this environment, e.g. a CUDA 12 "
          "build (drivers >= 525): pip install torch torchvision --index-url "
          "https://download.pytorch.org/whl/cu126 (README: Running a grid); or set run.device: cpu."
    )


def worker_environments(workers: int | str, threads_per_worker: int | None = None,
                        runs_per_gpu: int = 1) -> list[dict[str, str]]:
    """Environment per local worker: on a GPU machine ``runs_per_gpu`` workers share each GPU
    (``workers="auto"``: GPUs x runs_per_gpu; a GPU in MIG slices counts a GPU per slice),
    else a share of the CPU cores each."""
    ids = visible_gpus()
    gpus = len(ids)
    cpus = available_cpus()  # a SLURM allocation or affinity mask, not the whole machine
    if workers == "auto":
        workers = (gpus * max(1, int(runs_per_gpu)) if gpus
                   else max(1, cpus // max(1, threads_per_worker or 1)))
        if not gpus and threads_per_worker is None:
            workers = 1 if cpus < 2 else min(workers, 4)
    workers = int(workers)
    threads = threads_per_worker or max(1, cpus // workers)
    envs = []
    for index in range(workers):
        env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
               "SM_WORKER_INDEX": str(index)}
        if gpus:  # nvidia-smi's numbering, which CUDA follows only in PCI bus order
            env.update(CUDA_DEVICE_ORDER="PCI_BUS_ID", CUDA_VISIBLE_DEVICES=ids[index % gpus],
                       SM_RUNS_PER_GPU=str(max(1, int(runs_per_gpu))))  # runs' data budget
        envs.append(env)
    return envs


def _set_environment(env: dict[str, str]) -> None:
    os.environ.update(env)


@contextlib.contextmanager
def spawned_child(device: str = "auto", gpu: str | None = None):
    """An executor of one fresh (spawned) process for work the grid does itself on the grid's
    device (source probes, the memory check): on a GPU machine the child sees the first GPU
    the workers use (MIG slice included; ``gpu``: another of them), so its CUDA context, and
    the memory it held, end with it instead of staying in the grid process on every GPU for
    the whole grid."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    ids = [gpu] if gpu is not None else visible_gpus() if device != "cpu" else []
    env = {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": ids[0]} if ids else {}
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn"),
                             initializer=_set_environment, initargs=(env,)) as pool:
        yield pool


GIB = 1024 ** 3
MEMORY_MARGIN = 1.15  # allocator fragmentation beyond the measured peak
# One process's CUDA context with its cuDNN and cuBLAS handles: GPU memory outside torch's
# allocator (0.3-0.6 GiB on recent GPUs and CUDA 12/13), counted once per run.
CONTEXT_ALLOWANCE = 0.75 * GIB


def check_runs_fit(runs_per_gpu: int, need_bytes: float, free_bytes: dict[str, float],
                   what: str) -> None:
    """Raise GridError unless ``runs_per_gpu`` runs of ``need_bytes`` (allocator peak and
    resident images, :func:`measure_run_memory`) fit in every GPU's free memory
    (``free_bytes``: GPU id -> bytes), saying the measured need and how many would fit. Each run
    also holds a CUDA context (:data:`CONTEXT_ALLOWANCE`)."""
    need = need_bytes * MEMORY_MARGIN + CONTEXT_ALLOWANCE
    short = {gpu: free for gpu, free in free_bytes.items() if runs_per_gpu * need > free}
    if short:
        gpu, free = min(short.items(), key=lambda item: item[1])
        fit = int(free // need)
        raise GridError(
            f"run.runs_per_gpu={runs_per_gpu} does not fit: one run needs {need / GIB:.2f} GiB "
            f"(measured: {what}, peak {need_bytes / GIB:.2f} GiB, plus {MEMORY_MARGIN - 1:.0%} "
            f"and {CONTEXT_ALLOWANCE / GIB:.2f} GiB for its CUDA context), so {runs_per_gpu} "
            f"need {runs_per_gpu * need / GIB:.1f} GiB, but GPU {gpu} has {free / GIB:.1f} GiB "
            f"free. Set runs_per_gpu to {max(fit, 1)} or less"
            + (" (not even one fits: free the GPU or lower the batch size)" if fit < 1 else "")
            + ".")


MEMORY_KEYS = ("source", "arch", "weights", "image_size", "batch_size", "optimizer", "precision",
               "deterministic", "attribution", "num_workers")


def memory_configurations(cells) -> list[dict]:
    """The distinct configurations of ``cells`` that can differ in GPU memory (model, input
    size, batch, optimizer, precision, attribution, data placement), each with its largest
    manifest (rows: an upper bound on the images a run keeps resident)."""
    import pandas as pd

    configurations: dict[tuple, dict] = {}
    rows: dict[str, int] = {}
    for cell in cells:
        p = cell.params
        config = {k: p.get(k) for k in MEMORY_KEYS}
        config.update(precision=p.get("precision", "auto"),
                      deterministic=bool(p.get("deterministic")),
                      attribution=bool(p.get("attribution")), num_workers=int(p.get("num_workers") or 0))
        if p["manifest"] not in rows:
            rows[p["manifest"]] = len(pd.read_csv(p["manifest"], usecols=["image_id"]))
        key = tuple(str(config[k]) for k in MEMORY_KEYS)
        known = configurations.setdefault(key, {**config, "n_images": 0})
        known["n_images"] = max(known["n_images"], rows[p["manifest"]])
    return list(configurations.values())


def measure_run_memory(config: dict, device: str = "cuda", runs_per_gpu: int = 1) -> dict:
    """The memory one run of ``config`` (:func:`memory_configurations`) needs, measured as a
    run uses it: the model, its optimizer, one epoch of training steps on random images under
    the run's precision and device settings (cuDNN autotuning on unless deterministic), the fp32
    evaluation pass and, with attribution, the attribution backward pass. Meant for a fresh
    process (:func:`spawned_child`): on a GPU the allocator's peak, plus the images the run
    would keep resident there (:func:`sm_utils.runs.data_placement`), and the GPU's free and
    total memory; on the CPU the growth of the process's peak resident memory."""
    import torch

    from ..runs import RUNS_PER_GPU_ENV, data_placement
    from ..sources import create_model
    from ..training import configure_device, train_model

    target = torch.device(device)
    baseline = _start_peak_rss()
    if target.type == "cuda":
        torch.cuda.reset_peak_memory_stats(target)
    size, batch = int(config["image_size"]), int(config["batch_size"])
    passes = []
    with configure_device(target, deterministic=config["deterministic"],
                          precision=config["precision"]):
        model, prep = create_model(config["source"], arch=config["arch"],
                                   weights=config["weights"], num_classes=2, image_size=size)
        generator = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (2 * batch, 1, size, size), dtype=torch.uint8,
                               generator=generator)
        data = torch.utils.data.TensorDataset(images, torch.arange(2 * batch) % 2)
        loader = torch.utils.data.DataLoader(data, batch_size=batch)
        train_model(model, prep, loader, loader, device=target, epochs=1, lr=1e-4,
                    optimizer=config["optimizer"] or "adam", patience=0, progress=False,
                    precision=config["precision"])
        passes += ["training", "evaluation"]
        if config["attribution"]:
            from ..mechanisms.attribution import activation_maps

            activation_maps(model, prep, images[:32, 0].numpy(), device=target)
            passes.append("attribution")
    out = {"passes": passes, "resident_bytes": 0, "free_bytes": None, "total_bytes": None}
    if target.type == "cuda":
        torch.cuda.synchronize(target)
        out["peak_bytes"] = int(torch.cuda.max_memory_reserved(target))
        os.environ[RUNS_PER_GPU_ENV] = str(runs_per_gpu)
        placement = data_placement(target, config["n_images"], size, config["num_workers"])
        out["resident_bytes"] = placement["bytes"] if placement["resident"] else 0
        del model, images, data, loader
        torch.cuda.empty_cache()
        out["free_bytes"], out["total_bytes"] = map(int, torch.cuda.mem_get_info(target))
    else:
        out["peak_bytes"] = _peak_rss() - baseline
    return out


def _proc_status_bytes(field: str) -> int | None:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in bytes; None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _start_peak_rss() -> int:
    """Start measuring this process's peak resident memory; returns the baseline. On Linux the
    peak (VmHWM) is reset to the current RSS (writing 5 to /proc/self/clear_refs), so what the
    imports held at their own peak does not hide what comes after."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _proc_status_bytes("VmRSS") or _peak_rss()
    except OSError:
        return _peak_rss()


def _peak_rss() -> int:
    import resource

    return _proc_status_bytes("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def free_gpu_memory() -> int:
    """Free bytes of the (one) GPU this process sees, for :func:`spawned_child`."""
    import torch

    return int(torch.cuda.mem_get_info(0)[0])


def measure_grid_memory(cells, runs_per_gpu: int) -> tuple[float, dict[str, float], str]:
    """(the largest need of one run over the grid's distinct configurations, every GPU's free
    memory, what that need was measured on). Each measurement runs in a fresh child process on
    the first GPU the workers use, so no CUDA context is left in the grid process, and each
    other GPU (or MIG slice) is asked for its free memory by a child of its own. The children's
    free memory excludes their own CUDA context, which ends with them: it is added back."""
    ids = visible_gpus()
    needs = []
    for config in memory_configurations(cells):
        with spawned_child("cuda", gpu=ids[0]) as child:
            measured = child.submit(measure_run_memory, config, "cuda", runs_per_gpu).result()
        need = measured["peak_bytes"] + measured["resident_bytes"]
        what = (f"{config['arch'] or config['source']} at {config['image_size']} px, batch "
                f"{config['batch_size']}, {' + '.join(measured['passes'])}"
                + (f", {measured['resident_bytes'] / GIB:.2f} GiB of images resident"
                   if measured["resident_bytes"] else ""))
        needs.append((need, what, measured["free_bytes"]))
    need, what, first_free = max(needs, key=lambda item: item[0])
    free = {ids[0]: first_free + CONTEXT_ALLOWANCE}
    for gpu in ids[1:]:
        with spawned_child("cuda", gpu=gpu) as child:
            free[gpu] = child.submit(free_gpu_memory).result() + CONTEXT_ALLOWANCE
    return float(need), free, what


def run_local(cells: list[Cell], settings: RunnerSettings, envs: list[dict[str, str]],
              report: GridReport, progress) -> None:
    import multiprocessing as mp
    import queue as queue_module

    ctx = mp.get_context("spawn")
    tasks, results = ctx.Queue(), ctx.Queue()
    for cell in cells:
        tasks.put(cell)
    label_of = {c.run_id: c.label() for c in cells}

    def start_worker(env: dict[str, str]):
        worker_settings = dataclasses.replace(settings, env={**settings.env, **env})
        proc = ctx.Process(target=_local_worker, args=(worker_settings, tasks, results, os.getpid()),
                           daemon=False)
        proc.start()
        return proc

    workers = {}
    for env in envs[: max(1, len(cells))]:
        proc = start_worker(env)
        workers[proc.pid] = (proc, env)
    for _ in workers:
        tasks.put(None)
    in_flight: dict[int, str] = {}
    finished = 0
    closed: set[int] = set()
    while finished < len(cells) or len(closed) < len(workers):
        try:
            kind, pid, payload = results.get(timeout=1.0)
        except queue_module.Empty:
            for pid, (proc, env) in list(workers.items()):
                if pid in closed or proc.is_alive():
                    continue
                closed.add(pid)  # died without saying goodbye (killed, out of memory)
                run_id = in_flight.pop(pid, None)
                if run_id is not None:
                    message = f"worker process {pid} died (exit code {proc.exitcode}) during this cell"
                    report.failures.append((label_of[run_id], message))
                    finished += 1
                    progress.update(1)
                if finished < len(cells):  # replace it so the remaining cells still run
                    new = start_worker(env)
                    workers[new.pid] = (new, env)
                    tasks.put(None)
            continue
        if kind == "start":
            in_flight[pid] = payload
        elif kind == "done":
            in_flight.pop(pid, None)
            report.add(payload)
            finished += 1
            progress.update(1)
            progress.set_postfix(ok=report.succeeded, failed=len(report.failures))
        elif kind == "kernel":
            report.kernel_start_seconds += payload
            closed.add(pid)
    for proc, _ in workers.values():
        proc.join(timeout=30)
