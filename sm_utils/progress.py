"""Progress bars for the long data steps (image cache, dataset builders), all made alike.

Bars are tqdm's, on stderr, and shown only when stderr is a terminal (tqdm's
``disable=None``), as the grid's bar: notebooks, papermill kernels and log files get none.
``$SM_PROGRESS`` overrides that: ``on`` (or 1) shows them anywhere, ``off`` (or 0) nowhere,
``auto`` (or unset) is the default. A bar only reports; it never changes what a step
computes or writes.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable

PROGRESS_ENV = "SM_PROGRESS"
_SETTINGS = {"on": False, "1": False, "off": True, "0": True, "auto": None, "": None}


def bars_disabled(enabled: bool | None = None) -> bool | None:
    """tqdm's ``disable``: ``not enabled`` when given, else from ``$SM_PROGRESS`` (None: auto)."""
    if enabled is not None:
        return not enabled
    value = os.environ.get(PROGRESS_ENV, "").strip().lower()
    if value not in _SETTINGS:
        raise ValueError(f"${PROGRESS_ENV}={value!r}: use on, off or auto (or 1, 0, unset).")
    return _SETTINGS[value]


def progress_bar(iterable: Iterable | None, desc: str, unit: str, total: int | None = None, *,
                 enabled: bool | None = None):
    """A tqdm bar over ``iterable`` (or a manual one when it is None).

    Bars at the top level stay when done (their line says how long the step took); nested
    ones vanish. Off a terminal (when forced on) they redraw at most every 30 s.
    """
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, unit=unit, total=total, disable=bars_disabled(enabled),
                leave=None, dynamic_ncols=True, mininterval=0.5 if _terminal() else 30.0)


def _terminal() -> bool:
    return bool(getattr(sys.stderr, "isatty", None) and sys.stderr.isatty())

def available_cpus() -> int:
    """Cores this process may use for parallel file work: a SLURM job's allocation, else the
    CPU affinity mask (a container's or ``taskset``'s limit), else every core."""
    for variable in ("SLURM_CPUS_PER_TASK", "SLURM_CPUS_ON_NODE"):
        value = os.environ.get(variable, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def parallel_map(fn, items: list, *, desc: str, unit: str, workers: int | None = None,
                 chunksize: int = 1, enabled: bool | None = None) -> list:
    """``[fn(item) for item in items]`` in a process pool of ``workers`` (None:
    :func:`available_cpus`) with one progress bar, in order. Where no pool can start (a
    container that limits processes) it says so and runs them here: the same results."""
    from concurrent.futures import ProcessPoolExecutor

    workers = available_cpus() if workers is None else max(1, int(workers))
    results: list = []
    with progress_bar(None, desc, unit, total=len(items), enabled=enabled) as bar:
        if workers > 1 and len(items) > 1:
            try:
                with ProcessPoolExecutor(max_workers=min(workers, len(items))) as pool:
                    for result in pool.map(fn, items, chunksize=chunksize):
                        results.append(result)
                        bar.update(1)
                return results
            except (OSError, RuntimeError) as err:
                import warnings

                warnings.warn(f"could not start {workers} processes for {desc} ({err}); "
                              "running them in this process instead (same results, slower)",
                              RuntimeWarning, stacklevel=2)
        for item in items[len(results):]:
            results.append(fn(item))
            bar.update(1)
    return results

