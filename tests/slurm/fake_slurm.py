"""A fake SLURM for tests without a cluster: sbatch, srun, squeue, scancel and sacct.

:func:`install` writes small wrappers named like SLURM's commands into a folder (put it first
on PATH); each runs this file with the command's name. The fake keeps its jobs as JSON files in
a state folder and runs them on this machine:

- ``sbatch SCRIPT`` records its arguments and the script's ``#SBATCH`` options in
  ``submissions.jsonl``, prints "Submitted batch job N" and starts the job (each task of an
  ``--array=0-N%P``, at most P at once) in the background with SLURM's variables
  (SLURM_JOB_ID, SLURM_ARRAY_JOB_ID, SLURM_ARRAY_TASK_ID, ...), stdout and stderr in the
  files ``--output``/``--error`` name (%A, %a, %j expanded);
- ``srun [options] CMD`` runs CMD (options ignored);
- ``squeue`` prints ``--format`` (%i %T %r %A %a %j) for the jobs of ``--jobs``; finished jobs
  only with ``--states=all`` and for ``FAKE_SLURM_MIN_JOB_AGE`` seconds (default 300);
- ``scancel ID...`` kills the tasks (their process group), marks them CANCELLED and writes
  SLURM's "*** JOB N ON node CANCELLED AT ... ***" line to their stderr;
- ``sacct`` answers like accounting when ``FAKE_SLURM_ACCOUNTING=1``, else fails like a
  cluster without accounting storage ("Slurm accounting storage is disabled").

Faults, from the environment of whoever calls the command (the tests' environment):
``FAKE_SLURM_FAIL_TASKS=1,3`` makes these array tasks die before their script runs (exit 1,
FAILED, no result); ``FAKE_SLURM_REJECT=text`` makes sbatch refuse the job;
``FAKE_SLURM_SQUEUE_DOWN=1`` makes squeue fail as when slurmctld does not answer.
Every call is appended to ``calls.jsonl``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

COMMANDS = ("sbatch", "srun", "squeue", "scancel", "sacct")
NODE = "fakenode"
ACTIVE = ("PENDING", "RUNNING")


def install(bin_dir: Path, state_dir: Path, python: str = sys.executable) -> Path:
    """Write the fake commands into ``bin_dir`` (state kept in ``state_dir``); returns bin_dir."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    state_dir.mkdir(parents=True, exist_ok=True)
    for name in COMMANDS:
        wrapper = bin_dir / name
        wrapper.write_text(
            "#!/bin/sh\n"
            f"FAKE_SLURM_DIR={shlex.quote(str(state_dir))} exec {shlex.quote(python)} "
            f"{shlex.quote(str(Path(__file__).resolve()))} {name} \"$@\"\n")
        wrapper.chmod(0o755)
    return bin_dir


# --------------------------------------------------------------------------- state


def _state_dir() -> Path:
    return Path(os.environ["FAKE_SLURM_DIR"])


def _jobs_dir() -> Path:
    path = _state_dir() / "jobs"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def _read_task(key: str) -> dict | None:
    try:
        return json.loads((_jobs_dir() / f"{key}.json").read_text())
    except (OSError, ValueError):
        return None


def _update_task(key: str, **changes) -> dict:
    task = _read_task(key) or {}
    task.update(changes)
    _write_json(_jobs_dir() / f"{key}.json", task)
    return task


def _tasks() -> list[dict]:
    out = []
    for path in sorted(_jobs_dir().glob("*.json")):
        try:
            out.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return out


def _next_job_id() -> int:
    import fcntl

    counter = _state_dir() / "next_job_id"
    with open(_state_dir() / "lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        value = int(counter.read_text()) if counter.exists() else 4242
        counter.write_text(str(value + 1))
    return value


def _log_call(name: str, argv: list[str]) -> None:
    with open(_state_dir() / "calls.jsonl", "a") as handle:
        handle.write(json.dumps({"command": name, "argv": argv, "time": time.time()}) + "\n")


def calls(state_dir: Path, command: str | None = None) -> list[list[str]]:
    """The argument lists the fake commands received (in order)."""
    path = state_dir / "calls.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [row["argv"] for row in rows if command is None or row["command"] == command]


def submissions(state_dir: Path) -> list[dict]:
    """What sbatch received: argv, the script, its #SBATCH options and the job id given."""
    path = state_dir / "submissions.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def task_states(state_dir: Path) -> dict[str, str]:
    """``{"4242_0": "COMPLETED", ...}``: the state of every task the fake ran."""
    out = {}
    for path in sorted((state_dir / "jobs").glob("*.json")):
        task = json.loads(path.read_text())
        out[task["id"]] = task["state"]
    return out


def kill_everything(state_dir: Path) -> None:
    """Kill whatever the fake still runs (test teardown)."""
    for path in (state_dir / "jobs").glob("*.json"):
        task = json.loads(path.read_text())
        for key in ("pgid", "runner_pid"):
            pid = task.get(key)
            if pid and task.get("state") in ACTIVE:
                try:
                    (os.killpg if key == "pgid" else os.kill)(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass


# --------------------------------------------------------------------------- sbatch


def _sbatch_options(args: list[str], script: str | None) -> dict[str, str]:
    """Long options of the script's #SBATCH lines, then of the command line (which win)."""
    lines = []
    if script:
        for line in Path(script).read_text().splitlines()[1:]:
            stripped = line.strip()
            if stripped.startswith("#SBATCH"):
                lines.extend(shlex.split(stripped[len("#SBATCH"):]))
            elif stripped and not stripped.startswith("#"):
                break   # sbatch stops reading options at the first command
    options: dict[str, str] = {}
    for arg in lines + args:
        if arg.startswith("--"):
            key, _, value = arg[2:].partition("=")
            options[key] = value if _ else "true"
    return options


def _expand_path(pattern: str, job_id: int, array_id: int, index: int | None) -> str:
    out = pattern.replace("%A", str(array_id)).replace("%j", str(job_id))
    return out.replace("%a", str(index if index is not None else 0))


def sbatch(argv: list[str]) -> int:
    if os.environ.get("FAKE_SLURM_REJECT"):
        print(f"sbatch: error: {os.environ['FAKE_SLURM_REJECT']}", file=sys.stderr)
        return 1
    script = next((a for a in argv if not a.startswith("-")), None)
    options = _sbatch_options([a for a in argv if a != script], script)
    array_id = _next_job_id()
    indices: list[int | None] = [None]
    parallel = 1
    if "array" in options:
        spec, _, limit = options["array"].partition("%")
        low, _, high = spec.partition("-")
        indices = list(range(int(low), int(high or low) + 1))
        parallel = int(limit) if limit else len(indices)
    fail = {int(i) for i in os.environ.get("FAKE_SLURM_FAIL_TASKS", "").split(",") if i.strip()}
    with open(_state_dir() / "submissions.jsonl", "a") as handle:
        handle.write(json.dumps({"argv": argv, "script": script, "options": options,
                                 "script_text": Path(script).read_text() if script else "",
                                 "job_id": str(array_id)}) + "\n")
    keys = []
    for n, index in enumerate(indices):
        key = str(array_id) if index is None else f"{array_id}_{index}"
        job_id = array_id if n == 0 else _next_job_id()   # each array task has its own job id
        _update_task(key, id=key, job_id=job_id, array_id=array_id, index=index, state="PENDING",
                     reason="None", script=script, fail=index in fail, submitted=time.time(),
                     cwd=os.getcwd(),
                     output=_expand_path(options.get("output", "slurm-%j.out"), job_id, array_id, index),
                     error=_expand_path(options.get("error", options.get("output", "slurm-%j.out")),
                                        job_id, array_id, index))
        keys.append(key)
    # the scheduler of this submission, detached from the caller
    subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "_schedule", str(parallel),
                      *keys], start_new_session=True, stdin=subprocess.DEVNULL,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ))
    print(f"Submitted batch job {array_id}")
    return 0


def _schedule(argv: list[str]) -> int:
    parallel, keys = int(argv[0]), argv[1:]
    running: dict[str, subprocess.Popen] = {}
    waiting = list(keys)
    while waiting or running:
        for key, proc in list(running.items()):
            code = proc.poll()
            if code is None:
                continue
            del running[key]
            task = _read_task(key) or {}
            if task.get("state") == "RUNNING":   # not cancelled meanwhile
                _update_task(key, state="COMPLETED" if code == 0 else "FAILED",
                             reason="None" if code == 0 else "NonZeroExitCode",
                             exit_code=f"{max(code, 0)}:{max(-code, 0)}",
                             ended=time.time())
        while waiting and len(running) < parallel:
            key = waiting.pop(0)
            task = _read_task(key) or {}
            if task.get("state") != "PENDING":   # cancelled while pending
                continue
            env = {**os.environ, "SLURM_JOB_ID": str(task["job_id"]), "SLURM_JOBID": str(task["job_id"]),
                   "SLURM_NTASKS": "1", "SLURM_JOB_NUM_NODES": "1", "SLURM_NODEID": "0",
                   "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_JOB_NODELIST": NODE,
                   "SLURMD_NODENAME": NODE}
            if task["index"] is not None:
                env.update(SLURM_ARRAY_JOB_ID=str(task["array_id"]),
                           SLURM_ARRAY_TASK_ID=str(task["index"]))
            Path(task["output"]).parent.mkdir(parents=True, exist_ok=True)
            out = open(task["output"], "ab")  # noqa: SIM115 (the child holds it)
            err = out if task["error"] == task["output"] else open(task["error"], "ab")  # noqa: SIM115
            argv = ["/bin/sh", "-c", "exit 1"] if task["fail"] else ["/bin/bash", task["script"]]
            proc = subprocess.Popen(argv, cwd=task["cwd"], env=env, stdout=out, stderr=err,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
            out.close()
            err.close()
            _update_task(key, state="RUNNING", pgid=proc.pid, runner_pid=os.getpid(),
                         started=time.time())
            running[key] = proc
        time.sleep(0.2)
    return 0


# --------------------------------------------------------------------------- the others


def srun(argv: list[str]) -> int:
    takes_value = {"--output", "--error", "-o", "-e", "--ntasks", "-n", "--cpus-per-task", "-c"}
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        i += 2 if argv[i] in takes_value else 1
    if i >= len(argv):
        print("srun: fatal: No command given to execute.", file=sys.stderr)
        return 1
    os.execvp(argv[i], argv[i:])
    return 127


def _wanted(ids: list[str], task: dict) -> bool:
    if not ids:
        return True
    return any(i in (task["id"], str(task["array_id"]), str(task["job_id"])) for i in ids)


def _option(argv: list[str], short: str, long: str) -> list[str]:
    values = []
    for n, arg in enumerate(argv):
        if arg.startswith(long + "="):
            values.append(arg.split("=", 1)[1])
        elif arg in (short, long) and n + 1 < len(argv):
            values.append(argv[n + 1])
    return values


def squeue(argv: list[str]) -> int:
    if os.environ.get("FAKE_SLURM_SQUEUE_DOWN"):
        print("slurm_load_jobs error: Unable to contact slurm controller (connect failure)",
              file=sys.stderr)
        return 1
    ids = [i for value in _option(argv, "-j", "--jobs") for i in value.split(",") if i]
    states = ",".join(_option(argv, "-t", "--states")).lower()
    fmt = (_option(argv, "-o", "--format") or ["%.18i %.9P %.8j %.8u %.2t %.10M %.6D %R"])[-1]
    min_age = float(os.environ.get("FAKE_SLURM_MIN_JOB_AGE", "300"))
    now = time.time()
    tasks = [t for t in _tasks() if _wanted(ids, t)]
    if ids and not tasks:
        print("slurm_load_jobs error: Invalid job id specified", file=sys.stderr)
        return 1
    for task in tasks:
        ended = task["state"] not in ACTIVE
        if ended and ("all" not in states or now - task.get("ended", now) > min_age):
            continue
        fields = {"i": task["id"], "T": task["state"], "r": task.get("reason", "None"),
                  "A": str(task["array_id"]), "a": str(task["index"]), "j": "job"}
        print(re.sub(r"%\.?\d*([a-zA-Z])", lambda m, f=fields: f.get(m.group(1), "?"), fmt))
    return 0


def scancel(argv: list[str]) -> int:
    ids = [a for a in argv if not a.startswith("-")]
    stamp = datetime.now().strftime("%Y-%m-%dT%H:%M:%S")
    for task in _tasks():
        if not _wanted(ids, task) or task["state"] not in ACTIVE:
            continue
        was_running = task["state"] == "RUNNING"
        _update_task(task["id"], state="CANCELLED", reason="None", exit_code="0:15",
                     ended=time.time())
        if was_running:
            try:
                os.killpg(task["pgid"], signal.SIGKILL)
            except ProcessLookupError:
                pass
            with open(task["error"], "a") as handle:
                handle.write(f"slurmstepd: error: *** JOB {task['job_id']} ON {NODE} "
                             f"CANCELLED AT {stamp} ***\n")
    return 0


def sacct(argv: list[str]) -> int:
    if os.environ.get("FAKE_SLURM_ACCOUNTING") != "1":
        print("Slurm accounting storage is disabled", file=sys.stderr)
        return 1
    ids = [i for value in _option(argv, "-j", "--jobs") for i in value.split(",") if i]
    fields = ",".join(_option(argv, "-o", "--format")).split(",")
    header = not any(a in ("-n", "--noheader") for a in argv)
    rows = [fields] if header else []
    for task in _tasks():
        if not _wanted(ids, task):
            continue
        state = task["state"] + (" by 0" if task["state"] == "CANCELLED" else "")
        values = {"JobID": task["id"], "State": state, "ExitCode": task.get("exit_code", "0:0"),
                  "NodeList": NODE if task["state"] != "PENDING" else "None assigned"}
        rows.append([values.get(f, "") for f in fields])
    print("\n".join("|".join(row) for row in rows))
    return 0


def main() -> int:
    name, argv = sys.argv[1], sys.argv[2:]
    if name != "_schedule":
        _log_call(name, argv)
    handler = {"sbatch": sbatch, "srun": srun, "squeue": squeue, "scancel": scancel,
               "sacct": sacct, "_schedule": _schedule}[name]
    return handler(argv)


if __name__ == "__main__":
    sys.exit(main())
