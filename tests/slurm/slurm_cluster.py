"""A one-node SLURM cluster run by the tests as their own processes.

Nothing is installed and no system service is touched: munged, slurmctld and slurmd run in the
foreground from a temporary folder (configuration, munge key and socket, state, spool, logs),
on free TCP ports, and are stopped afterwards. The cluster is set up as many small clusters are:
no accounting storage (``sacct`` fails), ``proctrack/linuxproc``, ``task/none``,
``select/cons_tres`` with CPUs as the only consumable. Client commands find it through
``SLURM_CONF`` (the munge socket is named in slurm.conf's ``AuthInfo``).

Needs root (slurmd launches jobs) and the Debian packages slurmctld, slurmd, slurm-client and
munge (``make test-slurm`` installs them). By hand::

    python tests/slurm/slurm_cluster.py      # starts a cluster, prints SLURM_CONF, Ctrl-C stops
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Self

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scancel", "sinfo", "srun")
SBIN = ("/usr/sbin", "/sbin", "/usr/local/sbin")   # daemons live here, often not on a user's PATH
INSTALL_HINT = ("`make test-slurm` installs them (Debian: apt-get install slurmctld slurmd "
                "slurm-client munge) and runs these tests")


def find(name: str) -> str | None:
    """``name`` on PATH, or in the sbin folders."""
    path = os.environ.get("PATH", "") + os.pathsep + os.pathsep.join(SBIN)
    return shutil.which(name, path=path)


def missing_programs() -> list[str]:
    return [name for name in DAEMONS + CLIENTS if find(name) is None]


def why_not_here() -> str | None:
    """None if a cluster can be started here, else why not (for a skip message)."""
    missing = missing_programs()
    if missing:
        return f"SLURM programs not found: {', '.join(missing)}; {INSTALL_HINT}"
    if os.geteuid() != 0:
        return f"a test SLURM cluster needs root (slurmd launches the jobs); {INSTALL_HINT}"
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _die_with_parent() -> None:
    """In a daemon about to start: SIGTERM when the test process dies (Linux), so that a killed
    test run leaves no cluster behind."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class SlurmClusterError(RuntimeError):
    pass


class SlurmCluster:
    """``start()`` / ``stop()`` (or ``with``) a one-node cluster; ``env`` reaches it."""

    def __init__(self, root: str | os.PathLike | None = None, name: str = "smtest",
                 cpus: int | None = None):
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="sm-slurm-"))
        self._own_root = root is None
        self.name = name
        self.cpus = cpus
        self.conf = self.root / "slurm.conf"
        self.logs = self.root / "log"
        self.procs: dict[str, subprocess.Popen] = {}
        self.node = ""

    # --------------------------------------------------------------- configuration

    @property
    def env(self) -> dict[str, str]:
        """The environment of client commands: this process's, SLURM_* of any outer job removed."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(
            ("SLURM_", "SBATCH_", "SALLOC_", "SRUN_", "SQUEUE_", "SACCT_"))}
        env["SLURM_CONF"] = str(self.conf)
        path = env.get("PATH", "").split(os.pathsep)
        env["PATH"] = os.pathsep.join(path + [d for d in SBIN if d not in path])
        return env

    def _node_line(self) -> str:
        """This machine as slurmd sees it (``slurmd -C``), reachable on 127.0.0.1."""
        out = subprocess.run([find("slurmd"), "-C"], capture_output=True, text=True, timeout=60,
                             check=True).stdout
        line = next(ln for ln in out.splitlines() if ln.startswith("NodeName="))
        fields = dict(part.split("=", 1) for part in line.split())
        self.node = fields["NodeName"]
        if self.cpus:
            fields = {"NodeName": self.node, "CPUs": str(self.cpus)}
        # slurmd drains a node that reports less memory than configured: stay under it
        memory = int(line.split("RealMemory=")[1].split()[0]) if "RealMemory=" in line else 1024
        fields["RealMemory"] = str(max(256, int(memory * 0.9)))
        fields.update(NodeAddr="127.0.0.1", State="UNKNOWN")
        return " ".join(f"{k}={v}" for k, v in fields.items())

    def write_config(self) -> None:
        for sub in ("munge-key", "munge", "state", "spool", "log", "jobs"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        # munged: key readable by its owner only; socket folder searchable by all
        os.chmod(self.root, 0o755)
        os.chmod(self.root / "munge", 0o755)
        os.chmod(self.root / "munge-key", 0o700)
        key = self.root / "munge-key" / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
            os.chmod(key, 0o400)
        node = self._node_line()
        r = self.root
        self.conf.write_text("\n".join([
            f"ClusterName={self.name}",
            f"SlurmctldHost={self.node}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={r / 'munge' / 'munge.socket'}",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'log' / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "MpiDefault=none",
            "ReturnToService=2",
            "KillWait=5",
            "FirstJobId=700000",   # ids unlike the fake SLURM's (submitit caches states by id)
            "MailProg=/bin/true",
            node,
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
            "",
        ]))

    # --------------------------------------------------------------- processes

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.logs / f"{name}.out", "ab")  # noqa: SIM115 (kept open while it runs)
        # preexec_fn: started before the tests start any thread (session fixture)
        self.procs[name] = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env,
            start_new_session=True, preexec_fn=_die_with_parent)  # noqa: PLW1509
        log.close()

    def _check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                log = self.logs / f"{name}.log"
                raise SlurmClusterError(
                    f"{name} exited with code {proc.returncode} while the test cluster started\n"
                    f"{_tail(self.logs / f'{name}.out')}\n{_tail(log) if log.exists() else ''}")

    def command(self, *argv: str, check: bool = True, timeout: float = 60, **kwargs):
        """Run a SLURM client command against this cluster."""
        return subprocess.run(list(argv), capture_output=True, text=True, env=self.env,
                              timeout=timeout, check=check, **kwargs)

    def sbatch(self, *args: str, cwd: str | os.PathLike | None = None) -> str:
        """Submit with sbatch; returns the job id."""
        out = self.command("sbatch", "--parsable", *args, cwd=cwd or self.root / "jobs")
        return out.stdout.strip().split(";")[0]

    def start(self, timeout_s: float = 90) -> Self:
        self.write_config()
        munge = self.root / "munge"
        self._spawn("munged", [find("munged"), "--foreground",
                               f"--socket={munge / 'munge.socket'}",
                               f"--key-file={self.root / 'munge-key' / 'munge.key'}",
                               f"--pid-file={munge / 'munged.pid'}",
                               f"--seed-file={munge / 'munged.seed'}",
                               f"--log-file={self.logs / 'munged.log'}"])
        deadline = time.monotonic() + timeout_s
        try:
            while not (munge / "munge.socket").exists():
                self._check_alive()
                if time.monotonic() > deadline:
                    raise SlurmClusterError(f"munged made no socket\n{_tail(self.logs / 'munged.log')}")
                time.sleep(0.1)
            self._spawn("slurmctld", [find("slurmctld"), "-D", "-c", "-f", str(self.conf)])
            self._spawn("slurmd", [find("slurmd"), "-D", "-f", str(self.conf)])
            state = ""
            while True:
                self._check_alive()
                out = self.command("sinfo", "--noheader", "--Node", "--format=%T", check=False,
                                   timeout=30)
                state = out.stdout.strip()
                if out.returncode == 0 and state.rstrip("*") == "idle":
                    return self
                if time.monotonic() > deadline:
                    raise SlurmClusterError(
                        f"the node is not idle after {timeout_s:g} s (sinfo: {state or out.stderr})\n"
                        f"{_tail(self.logs / 'slurmctld.log')}\n{_tail(self.logs / 'slurmd.log')}")
                time.sleep(0.5)
        except BaseException:
            self.stop()
            raise

    def cancel_all(self, timeout_s: float = 30) -> None:
        """Cancel every job and wait until none runs."""
        if "slurmctld" not in self.procs or self.procs["slurmctld"].poll() is not None:
            return
        self.command("scancel", f"--user={os.geteuid()}", check=False, timeout=30)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            out = self.command("squeue", "--noheader", "--format=%i", check=False, timeout=30)
            if out.returncode != 0 or not out.stdout.strip():
                return
            time.sleep(0.5)

    def stop(self) -> None:
        try:
            self.cancel_all()
        except (OSError, subprocess.SubprocessError):
            pass
        for name in ("slurmd", "slurmctld", "munged"):   # clients first, munge last
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=20)
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":
    reason = why_not_here()
    if reason:
        sys.exit(reason)
    with SlurmCluster() as cluster:
        print(f"export SLURM_CONF={cluster.conf}\n(Ctrl-C stops the cluster)", flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
