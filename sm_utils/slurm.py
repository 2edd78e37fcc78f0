"""Where submitted SLURM jobs stand, learnt from the queue rather than from accounting.

submitit learns a job's state from ``sacct``. Many small clusters run without accounting
storage (``AccountingStorageType=accounting_storage/none``): there ``sacct`` fails, submitit
sees every job as UNKNOWN forever, and a grid whose jobs were cancelled (or killed, or never
wrote a result) waits until its own time-out. :class:`JobWatcher` asks ``squeue`` instead:

* a job listed by ``squeue --states=all`` has the state SLURM gives it. SLURM keeps finished
  jobs in that listing for ``MinJobAge`` seconds (300 by default), so CANCELLED, TIMEOUT,
  FAILED, ... are seen there first, without accounting;
* a job no longer listed *left the queue*. It finished if its result file exists (the caller
  says how to find it); otherwise its state comes from ``sacct`` when accounting answers,
  else from SLURM's message in the job's log (``*** JOB 12 ON node CANCELLED AT ...``), else
  the job is reported as ``LEFT_QUEUE``: gone without a result (cancelled, killed or crashed);
* a job whose result file exists is done once SLURM no longer runs it, so that its end state
  is known: scancel sends SIGTERM first, and a submitit job may still write its result
  (e.g. cells that failed with "Kernel died") before it ends CANCELLED.

``sacct`` is only extra detail (exit code, the exact end state); the first time it fails
(accounting disabled) the watcher stops asking it. ``squeue`` runs at most once per
``min_interval_s`` (5 s by default) however often :meth:`JobWatcher.poll` is called; the result
files are checked on every call (a ``stat`` each). Job ids are those sbatch and submitit give:
``"123"`` for a job, ``"123_4"`` for task 4 of array job 123.

Typical use in a waiting loop (``jobs`` being submitit jobs)::

    watcher = JobWatcher.for_submitit(jobs)
    while pending:
        states = watcher.poll()
        for job in [j for j in pending if states[j.job_id].done]:
            state = states[job.job_id]
            if not state.has_result:          # job.result() would wait for ever
                ...report f"job {job.job_id} failed: {state.reason}"...
            else:
                ...job.result()...            # returns at once: the result file is there
                if state.state != "COMPLETED":   # e.g. cancelled after writing it
                    ...say f"job {job.job_id} {state.reason}" beside the cells' errors...
        time.sleep(1)
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# SLURM's end states, with the words used in reasons. Any other state squeue lists (PENDING,
# RUNNING, COMPLETING, SUSPENDED, REQUEUED, ...) counts as not ended.
END_STATES = {
    "COMPLETED": "completed",
    "CANCELLED": "cancelled",
    "FAILED": "failed",
    "TIMEOUT": "hit its time limit",
    "OUT_OF_MEMORY": "ran out of memory",
    "NODE_FAIL": "lost its node",
    "BOOT_FAIL": "its node failed to boot",
    "PREEMPTED": "was preempted",
    "DEADLINE": "missed its deadline",
    "REVOKED": "was revoked",
    "SPECIAL_EXIT": "ended in a special exit state",
}
LEFT_QUEUE = "LEFT_QUEUE"   # gone from the queue, no result, no record of why
# SLURM's own line in a job's stderr when it kills the job (slurmstepd).
_KILLED = re.compile(
    r"\*\*\* (?:JOB|STEP) [\w.+\-]+ ON \S+ CANCELLED AT \S+(?: DUE TO ([A-Z][A-Z ]*?))? \*\*\*")
_DUE_TO = {"TIME LIMIT": "TIMEOUT", "PREEMPTION": "PREEMPTED", "NODE FAILURE": "NODE_FAIL"}
_OOM = re.compile(r"oom[-_ ]kill", re.IGNORECASE)
_ID = re.compile(r"^(\d+)(?:_(\d+|\[[^\]]*\]))?$")
_LOG_TAIL_BYTES = 65536


class SlurmError(RuntimeError):
    """SLURM's commands are not available here (not a cluster node)."""


@dataclass(frozen=True)
class JobState:
    """What is known about one job.

    ``state`` is SLURM's word (PENDING, RUNNING, COMPLETED, CANCELLED, FAILED, TIMEOUT,
    OUT_OF_MEMORY, NODE_FAIL, PREEMPTED, ...) or ``LEFT_QUEUE`` (gone from the queue without a
    result and without a record of why). ``done``: the job will not run any more (a done job
    stays done). ``has_result``: its result file exists (None when the watcher was given no way
    to find result files). ``reason``: one line for people, e.g. "cancelled (squeue: CANCELLED)".
    ``source``: where the state came from: "squeue", "sacct", "log", "result" or "none".
    """

    job_id: str
    state: str
    done: bool
    reason: str
    has_result: bool | None = None
    source: str = "squeue"
    exit_code: str | None = None

    @property
    def ok(self) -> bool:
        """Done with a result to read (which may hold errors; ``state`` may still say CANCELLED).

        Without a way to find result files: done and COMPLETED.
        """
        if not self.done:
            return False
        return self.has_result if self.has_result is not None else self.state == "COMPLETED"


@dataclass
class _Job:
    job_id: str
    registered: float
    seen: bool = False                   # listed by squeue at least once
    queue_state: str | None = None       # state of the last listing; None once gone from it
    queue_reason: str = ""
    end: _Detail | None = None           # how it ended, per squeue, sacct or its log
    waiting_since: float | None = None   # since when a result file is awaited
    final: JobState | None = None


@dataclass
class _Detail:
    state: str
    source: str
    text: str = ""
    exit_code: str | None = None


class JobWatcher:
    """Polls ``squeue`` for a set of jobs and says, per job, whether it is done and why.

    Parameters (all but ``job_ids`` keyword-only)
    ----------
    job_ids:
        Jobs to watch (more with :meth:`add`).
    result_exists:
        ``job_id -> bool``: whether the job's result file exists (for submitit: its result
        pickle, which ``job.result()`` then reads at once). A job whose result exists is done
        (``has_result=True``) once squeue lists it ended or no longer lists it, or at the latest
        ``result_grace_s`` after the file appeared. Without it, a job is judged by SLURM's
        record only and ``has_result`` stays None.
    log_file:
        ``job_id -> path or None``: the job's stderr, read for SLURM's "CANCELLED AT ... DUE TO
        TIME LIMIT" line when neither squeue nor sacct knows the job any more.
    min_interval_s:
        At least this many seconds between two ``squeue`` calls; :meth:`poll` in between returns
        the states known, with result files checked again.
    result_grace_s:
        How long a job that ended COMPLETED or FAILED, or left the queue without a record, may
        take to show its result file (shared file systems lag) before it is declared done
        without one. Jobs SLURM reports CANCELLED, TIMEOUT, ... are done at once.
    appear_grace_s:
        How long a job just submitted may stay missing from ``squeue`` before it counts as gone.
    use_sacct:
        "auto" (when ``sacct`` is on PATH, until it first fails), True or False.
    run, clock:
        How commands are run and time is read (tests pass fakes); with the default ``run``,
        a missing ``squeue`` raises :class:`SlurmError`.
    """

    def __init__(
        self,
        job_ids: Iterable[str] = (),
        *,
        result_exists: Callable[[str], bool] | None = None,
        log_file: Callable[[str], str | os.PathLike | None] | None = None,
        min_interval_s: float = 5.0,
        result_grace_s: float = 10.0,
        appear_grace_s: float = 30.0,
        use_sacct: bool | str = "auto",
        command_timeout_s: float = 60.0,
        run: Callable[..., Any] = subprocess.run,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if run is subprocess.run and shutil.which("squeue") is None:
            raise SlurmError(
                "squeue is not on PATH here, so SLURM jobs cannot be watched: run on a node of "
                "the cluster (a login node), or use the local executor (sm run --slurm-local "
                "tries the submitit path on this machine)")
        self.result_exists = result_exists
        self.log_file = log_file
        self.min_interval_s = float(min_interval_s)
        self.result_grace_s = float(result_grace_s)
        self.appear_grace_s = float(appear_grace_s)
        self.command_timeout_s = float(command_timeout_s)
        self.run = run
        self.clock = clock
        self.squeue_calls = 0
        self.sacct_calls = 0
        self.last_error = ""          # the last squeue failure; "" after a success
        self.sacct_unavailable = ""   # why sacct is not asked; "" while it is
        if use_sacct == "auto":
            self._sacct = run is not subprocess.run or shutil.which("sacct") is not None
            if not self._sacct:
                self.sacct_unavailable = "sacct is not on PATH"
        else:
            self._sacct = bool(use_sacct)
            if not self._sacct:
                self.sacct_unavailable = "sacct not used"
        self._jobs: dict[str, _Job] = {}
        self._last_query = float("-inf")
        self.add(job_ids)

    def __repr__(self) -> str:
        done = sum(job.final is not None for job in self._jobs.values())
        return f"JobWatcher({len(self._jobs)} job(s), {done} done, {self.squeue_calls} squeue call(s))"

    @classmethod
    def for_submitit(cls, jobs: Iterable[Any], **kwargs: Any) -> JobWatcher:
        """A watcher of submitit jobs: result and log files from each job's ``paths``."""
        by_id = {str(job.job_id): job for job in jobs}

        def result_exists(job_id: str) -> bool:
            return by_id[job_id].paths.result_pickle.exists()

        def log_file(job_id: str) -> Path:
            return by_id[job_id].paths.stderr

        return cls(list(by_id), result_exists=result_exists, log_file=log_file, **kwargs)

    def add(self, job_ids: Iterable[str]) -> None:
        """Watch these jobs too (ids as sbatch gives them: "123" or "123_4")."""
        now = self.clock()
        for job_id in job_ids:
            job_id = str(job_id)
            if not _ID.match(job_id) or "[" in job_id:
                raise ValueError(f"not a SLURM job id: {job_id!r}; expected e.g. '123' or '123_4'")
            self._jobs.setdefault(job_id, _Job(job_id, now))

    @property
    def states(self) -> dict[str, JobState]:
        """The states known now, without asking SLURM."""
        return {job_id: self._state(job) for job_id, job in self._jobs.items()}

    def poll(self, force: bool = False) -> dict[str, JobState]:
        """Every watched job's state: squeue asked if ``min_interval_s`` has passed (or ``force``)."""
        now = self.clock()
        for job in self._open():
            if self._result(job.job_id):
                self._settle(job, now)
        open_jobs = self._open()
        if open_jobs and (force or now - self._last_query >= self.min_interval_s):
            self._last_query = now
            listing = self._squeue([job.job_id for job in open_jobs])
            if listing is not None:
                self._update(open_jobs, listing, now)
        return self.states

    # ------------------------------------------------------------------ internals

    def _open(self) -> list[_Job]:
        return [job for job in self._jobs.values() if job.final is None]

    def _result(self, job_id: str) -> bool | None:
        if self.result_exists is None:
            return None
        try:
            return bool(self.result_exists(job_id))
        except OSError:
            return False

    def _state(self, job: _Job) -> JobState:
        """A job not done yet."""
        if job.final is not None:
            return job.final
        has_result = self._result(job.job_id)
        if job.queue_state is None:
            if job.seen:
                state, reason = LEFT_QUEUE, "left the queue; waiting for its result file"
            else:
                state, reason = "PENDING", "submitted; not listed by squeue yet"
            return JobState(job.job_id, state, False, self._with_error(reason), has_result, "none")
        if job.queue_state in END_STATES:
            reason = f"{END_STATES[job.queue_state]}; waiting for its result file"
        else:
            reason = job.queue_state.lower().replace("_", " ")
            if job.queue_reason and job.queue_reason != "None":
                reason += f" ({job.queue_reason})"
            if has_result:
                reason += "; its result file is written"
        return JobState(job.job_id, job.queue_state, False, self._with_error(reason), has_result)

    def _with_error(self, reason: str) -> str:
        return f"{reason} (squeue failed: {self.last_error})" if self.last_error else reason

    def _update(self, open_jobs: list[_Job], listing: dict[str, tuple[str, str]], now: float) -> None:
        ended: list[_Job] = []
        for job in open_jobs:
            if job.job_id in listing:
                job.seen = True
                job.queue_state, job.queue_reason = listing[job.job_id]
                if job.queue_state in END_STATES:
                    ended.append(job)
                elif self._result(job.job_id):   # result written, SLURM not done with it yet
                    self._settle(job, now)
            elif job.seen or now - job.registered >= self.appear_grace_s:
                job.seen = True
                job.queue_state, job.queue_reason = None, ""
                ended.append(job)
        if not ended:
            return
        details = self._sacct_details([job.job_id for job in ended if job.end is None])
        for job in ended:
            if job.end is None:
                job.end = self._end_detail(job, details.get(job.job_id))
            self._settle(job, now)

    def _end_detail(self, job: _Job, sacct: _Detail | None) -> _Detail | None:
        """How a job ended: squeue's end state (sacct's if it differs, e.g. TIMEOUT), else for a
        job gone from the queue sacct's record, else SLURM's line in its log; None if unknown."""
        if sacct is not None and sacct.state not in END_STATES:
            sacct = None   # e.g. sacct still says RUNNING for a job squeue forgot: no use
        if job.queue_state is None:
            return sacct or self._from_log(job.job_id)
        note = job.queue_reason if job.queue_reason not in ("", "None") else ""
        if job.queue_state == "CANCELLED":
            note = ""   # the reason it waited before it was cancelled, e.g. Resources
        if sacct is not None and sacct.state != job.queue_state:
            return sacct
        return _Detail(job.queue_state, "squeue", note, sacct.exit_code if sacct else None)

    def _settle(self, job: _Job, now: float) -> None:
        """Make ``job`` done if what is known allows it; else start or continue a grace wait.

        With its result file written, a job is done once SLURM no longer runs it (its end state
        is then known), or ``result_grace_s`` after the file appeared. Without it, a job that
        ended CANCELLED, TIMEOUT, ... is done at once; one that ended COMPLETED or FAILED, or
        left the queue without a record, gets ``result_grace_s`` to show its file.
        """
        has_result = self._result(job.job_id)
        running = job.queue_state is not None and job.queue_state not in END_STATES
        if has_result:
            if running:
                job.waiting_since = job.waiting_since if job.waiting_since is not None else now
                if now - job.waiting_since < self.result_grace_s:
                    return
            job.final = self._final(job, None if running else job.end, True)
            return
        if running:
            return
        expect_result = has_result is False and (
            job.end is None or job.end.state in ("COMPLETED", "FAILED"))
        if expect_result:
            job.waiting_since = job.waiting_since if job.waiting_since is not None else now
            if now - job.waiting_since < self.result_grace_s:
                return
        job.final = self._final(job, job.end, has_result)

    def _final(self, job: _Job, detail: _Detail | None, has_result: bool | None) -> JobState:
        if detail is None and has_result:
            return JobState(job.job_id, "COMPLETED", True, "finished (its result file is written)",
                            True, "result")
        if detail is None:
            why = "squeue no longer lists it; " + (
                f"sacct unavailable: {self.sacct_unavailable}" if self.sacct_unavailable
                else "sacct has no record of it")
            if self.log_file is not None:
                why += "; no SLURM message in its log"
            what = ("left the queue without a result: cancelled, killed or crashed"
                    if has_result is False else "left the queue")
            return JobState(job.job_id, LEFT_QUEUE, True, f"{what} ({why})", has_result, "none")
        parts = [f"{detail.source}: {detail.state}"]
        if detail.text:
            parts.append(detail.text)
        if detail.exit_code not in (None, ""):
            parts.append(f"exit code {detail.exit_code}")
        word = END_STATES.get(detail.state, detail.state.lower())
        reason = f"{word} ({', '.join(parts)})"
        if detail.state == "COMPLETED" and has_result is False:
            reason = f"completed in SLURM but wrote no result file ({', '.join(parts)})"
        return JobState(job.job_id, detail.state, True, reason, has_result, detail.source,
                        detail.exit_code)

    def _command(self, argv: list[str]) -> tuple[int, str, str]:
        try:
            out = self.run(argv, capture_output=True, text=True, timeout=self.command_timeout_s,
                           check=False)
        except subprocess.TimeoutExpired:
            return 124, "", f"{argv[0]} did not answer within {self.command_timeout_s:g} s"
        except OSError as err:
            return 127, "", f"{argv[0]}: {err}"
        return out.returncode, out.stdout or "", out.stderr or ""

    def _squeue(self, job_ids: list[str]) -> dict[str, tuple[str, str]] | None:
        """``{job id: (state, reason)}`` of the jobs squeue lists; None when squeue failed."""
        bases = sorted({job_id.split("_")[0] for job_id in job_ids}, key=int)
        argv = ["squeue", "--noheader", "--array", "--states=all", "--format=%i|%T|%r",
                "--jobs=" + ",".join(bases)]
        self.squeue_calls += 1
        code, out, err = self._command(argv)
        if code != 0:
            if "invalid job id" in err.lower():   # every id has left slurmctld's memory
                self.last_error = ""
                return {}
            self.last_error = (err.strip() or out.strip() or f"exit code {code}").splitlines()[-1]
            return None
        self.last_error = ""
        listing: dict[str, tuple[str, str]] = {}
        for line in out.splitlines():
            fields = line.strip().split("|")
            if len(fields) < 2:
                continue
            state = fields[1].strip().split()[0].upper() if fields[1].strip() else "UNKNOWN"
            reason = fields[2].strip() if len(fields) > 2 else ""
            for job_id in _expand(fields[0].strip()):
                listing[job_id] = (state, reason)
        return listing

    def _sacct_details(self, job_ids: list[str]) -> dict[str, _Detail]:
        if not self._sacct:
            return {}
        bases = sorted({job_id.split("_")[0] for job_id in job_ids}, key=int)
        argv = ["sacct", "--noheader", "--parsable2", "--allocations",
                "--format=JobID,State,ExitCode", "--jobs=" + ",".join(bases)]
        self.sacct_calls += 1
        code, out, err = self._command(argv)
        if code != 0:
            self._sacct = False
            message = (err.strip() or out.strip() or f"exit code {code}").splitlines()[-1]
            self.sacct_unavailable = message
            return {}
        details: dict[str, _Detail] = {}
        for line in out.splitlines():
            fields = line.strip().split("|")
            if len(fields) < 2 or not fields[1].strip():
                continue
            words = fields[1].split()
            state = words[0].upper()
            text = " ".join(words[1:])   # e.g. "by 0" (the user id that cancelled)
            exit_code = fields[2].strip() if len(fields) > 2 else None
            for job_id in _expand(fields[0].strip()):
                details[job_id] = _Detail(state, "sacct", text, exit_code)
        return details

    def _from_log(self, job_id: str) -> _Detail | None:
        if self.log_file is None:
            return None
        try:
            path = self.log_file(job_id)
            if path is None:
                return None
            with open(path, "rb") as handle:
                handle.seek(0, os.SEEK_END)
                handle.seek(max(0, handle.tell() - _LOG_TAIL_BYTES))
                text = handle.read().decode("utf-8", "replace")
        except (OSError, KeyError):
            return None
        killed = list(_KILLED.finditer(text))
        if killed:
            line = killed[-1]
            state = _DUE_TO.get((line.group(1) or "").strip(), "CANCELLED")
            return _Detail(state, "log", line.group(0))
        if _OOM.search(text):
            return _Detail("OUT_OF_MEMORY", "log", "oom-kill in its log")
        return None


def queue_states(job_ids: Iterable[str], **kwargs: Any) -> dict[str, JobState]:
    """One look at the queue: ``{job id: JobState}`` (see :class:`JobWatcher` for ``kwargs``).

    Without history, a job missing from ``squeue`` counts as gone at once (no appear grace),
    and a job that ended without its result file is reported done at once (no result grace).
    In a waiting loop keep one :class:`JobWatcher` instead: it spaces its squeue calls.
    """
    kwargs = {"appear_grace_s": 0.0, "result_grace_s": 0.0, **kwargs}
    return JobWatcher(list(job_ids), **kwargs).poll(force=True)


def _expand(job_id: str) -> list[str]:
    """squeue/sacct ids to plain ids: "12" -> ["12"], "12_[1-3%2]" -> ["12_1", "12_2", "12_3"]."""
    match = _ID.match(job_id)
    if match is None:
        return []
    base, task = match.groups()
    if task is None or not task.startswith("["):
        return [job_id]
    ids = []
    for part in task[1:-1].split("%")[0].split(","):
        low, _, high = part.partition("-")
        if low.isdigit() and (not high or high.isdigit()):
            ids.extend(f"{base}_{i}" for i in range(int(low), int(high or low) + 1))
    return ids


def describe(states: Mapping[str, JobState]) -> str:
    """One line per job, e.g. for a log: ``123_4: CANCELLED, cancelled (squeue: CANCELLED)``."""
    return "\n".join(f"{job_id}: {s.state}, {s.reason}" for job_id, s in sorted(states.items()))


__all__ = ["END_STATES", "LEFT_QUEUE", "JobState", "JobWatcher", "SlurmError",
           "describe", "queue_states"]
