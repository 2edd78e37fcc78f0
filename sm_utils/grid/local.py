"""The local executor: a pool of worker processes, one per GPU on a GPU machine (else a share
of the CPU cores), each running cells in its own warm kernel."""

from __future__ import annotations

import dataclasses
import os
import shutil

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
    if workers == "auto":
        workers = (gpus * max(1, int(runs_per_gpu)) if gpus
                   else max(1, (os.cpu_count() or 1) // max(1, threads_per_worker or 1)))
        if not gpus and threads_per_worker is None:
            workers = 1 if (os.cpu_count() or 1) < 2 else min(workers, 4)
    workers = int(workers)
    threads = threads_per_worker or max(1, (os.cpu_count() or 1) // workers)
    envs = []
    for index in range(workers):
        env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
               "SM_WORKER_INDEX": str(index)}
        if gpus:  # nvidia-smi's numbering, which CUDA follows only in PCI bus order
            env.update(CUDA_DEVICE_ORDER="PCI_BUS_ID", CUDA_VISIBLE_DEVICES=ids[index % gpus])
        envs.append(env)
    return envs


GIB = 1024 ** 3
MEMORY_MARGIN = 1.15  # allocator fragmentation and the workers' own CUDA contexts


def check_runs_fit(runs_per_gpu: int, need_bytes: float, free_bytes: dict[str, float],
                   what: str) -> None:
    """Raise GridError unless ``runs_per_gpu`` runs of ``need_bytes`` fit in every GPU's free
    memory (``free_bytes``: GPU id -> bytes), saying the measured need and how many would fit."""
    need = need_bytes * MEMORY_MARGIN
    short = {gpu: free for gpu, free in free_bytes.items() if runs_per_gpu * need > free}
    if short:
        gpu, free = min(short.items(), key=lambda item: item[1])
        fit = int(free // need)
        raise GridError(
            f"run.runs_per_gpu={runs_per_gpu} does not fit: one run needs {need / GIB:.2f} GiB "
            f"(measured: {what}, peak {need_bytes / GIB:.2f} GiB, plus {MEMORY_MARGIN - 1:.0%}), "
            f"so {runs_per_gpu} need {runs_per_gpu * need / GIB:.1f} GiB, but GPU {gpu} has "
            f"{free / GIB:.1f} GiB free. Set runs_per_gpu to {max(fit, 1)} or less"
            + (" (not even one fits: free the GPU or lower the batch size)" if fit < 1 else "")
            + ".")


def measure_run_memory(source: str, arch: str | None, weights: str | None, image_size: int,
                       batch_size: int, n_images: int) -> tuple[float, dict[str, float], str]:
    """Peak GPU memory of one training step of the grid's model (bf16, channels_last, as a run)
    plus its images kept on the GPU, and every visible GPU's free memory."""
    import torch

    from ..sources import create_model

    device = torch.device("cuda")
    torch.cuda.reset_peak_memory_stats(device)
    model, prep = create_model(source, arch=arch, weights=weights, num_classes=2)
    model = model.to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters())
    images = torch.randint(0, 256, (batch_size, 1, image_size, image_size), dtype=torch.uint8,
                           device=device)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(prep(images).contiguous(memory_format=torch.channels_last)).float().mean()
    loss.backward()
    optimizer.step()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_reserved(device) + n_images * image_size * image_size
    del model, optimizer, images, loss
    torch.cuda.empty_cache()
    free = {str(i): float(torch.cuda.mem_get_info(i)[0]) for i in range(torch.cuda.device_count())}
    what = f"{arch or source} at {image_size} px, batch {batch_size}, {n_images} images resident"
    return float(peak), free, what

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
