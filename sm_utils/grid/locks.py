"""Claims on grid cells: two launches of one grid never run the same cell at once.

Before a worker runs a cell it claims it: it creates ``runs_dir/.claims/<run_id>.json`` (host,
process id, time) while holding a lock on the claims folder, and keeps the file's modification
time fresh (a heartbeat every :data:`HEARTBEAT_S` seconds) until the cell is done. Another
launch (a relaunch while the first still runs, or a local run beside a SLURM one) finds the
claim and leaves the cell alone. A dead process cannot hold a claim forever: a claim is
abandoned when its process no longer exists (same host) or its heartbeat is older than
:data:`STALE_AFTER_S` (any host, e.g. a SLURM job on a node that died); the next launch takes
it over.

The lock is ``fcntl.flock`` on ``runs_dir/.claims/.lock``: exclusive between processes on one
machine, and on shared file systems that support it (NFS v4, Lustre, GPFS), so deciding that a
claim is abandoned and replacing it is one step.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
from pathlib import Path

CLAIMS_DIR = ".claims"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 600.0


def _pid_alive(pid: int) -> bool:
    """True while process ``pid`` runs on this host (a zombie, killed but not reaped, is dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    try:  # Linux: state "Z" after the name in /proc/<pid>/stat
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


class CellClaim:
    """The exclusive right of this process to run one cell (see the module docstring)."""

    def __init__(self, runs_dir: str | os.PathLike, run_id: str, *,
                 heartbeat_s: float = HEARTBEAT_S, stale_after_s: float = STALE_AFTER_S):
        self.folder = Path(runs_dir) / CLAIMS_DIR
        self.path = self.folder / f"{run_id}.json"
        self.heartbeat_s = heartbeat_s
        self.stale_after_s = stale_after_s
        self.record = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def _locked(self):
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def holder(self) -> dict | None:
        """Who holds the claim now (with ``age_s``, seconds since its last heartbeat), or None."""
        try:
            record = json.loads(self.path.read_text())
            record["age_s"] = time.time() - self.path.stat().st_mtime
        except (OSError, ValueError):
            return None
        return record

    def abandoned(self, holder: dict) -> bool:
        """A claim whose process is gone or whose heartbeat stopped."""
        if holder["age_s"] > self.stale_after_s:
            return True
        same_host = holder.get("host") == socket.gethostname()
        return same_host and not _pid_alive(int(holder.get("pid", -1)))

    def acquire(self) -> bool:
        """Claim the cell; False when another live process holds it."""
        with self._locked():
            holder = self.holder()
            if holder is not None and not self.abandoned(holder):
                return False
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.record))
            os.replace(tmp, self.path)
        self._thread = threading.Thread(target=self._beat, daemon=True,
                                        name=f"claim {self.path.stem}")
        self._thread.start()
        return True

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        """Give the claim up (only if it is still ours)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._locked():
            holder = self.holder()
            if holder and (holder.get("host"), holder.get("pid")) == (self.record["host"],
                                                                     self.record["pid"]):
                self.path.unlink(missing_ok=True)

    def describe(self, holder: dict | None = None) -> str:
        holder = holder or self.holder() or {}
        return (f"claimed by process {holder.get('pid')} on {holder.get('host')} "
                f"(heartbeat {holder.get('age_s', 0):.0f} s ago)")
