"""sm_utils.slurm.JobWatcher: job states from squeue, with sacct and logs as extra detail.

Scripted squeue/sacct answers and a fake clock check the logic (no cluster, no waiting);
the last tests run the fake SLURM commands. test_slurm_cluster.py checks a real cluster.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from tiny_grid import wait_for_job_state

from sm_utils.slurm import LEFT_QUEUE, JobWatcher, SlurmError, describe, queue_states

NO_ACCOUNTING = (1, "", "Slurm accounting storage is disabled\n")


class Cluster:
    """Scripted answers of squeue and sacct, and a clock the test moves."""

    def __init__(self):
        self.now = 1000.0
        self.queue: dict[str, tuple[str, str]] = {}   # job id -> (state, reason)
        self.squeue_error: tuple[int, str] | None = None
        self.sacct: tuple[int, str, str] = NO_ACCOUNTING
        self.calls: list[list[str]] = []

    def clock(self) -> float:
        return self.now

    def run(self, argv, **kwargs):
        self.calls.append(list(argv))
        if argv[0] == "squeue":
            assert "--states=all" in argv and "--array" in argv and "--noheader" in argv
            if self.squeue_error:
                code, err = self.squeue_error
                return subprocess.CompletedProcess(argv, code, "", err)
            asked = argv[-1].split("=", 1)[1].split(",")
            lines = [f"{i}|{s}|{r}" for i, (s, r) in self.queue.items() if i.split("_")[0] in asked]
            if not lines:
                return subprocess.CompletedProcess(
                    argv, 1, "", "slurm_load_jobs error: Invalid job id specified\n")
            return subprocess.CompletedProcess(argv, 0, "\n".join(lines) + "\n", "")
        if argv[0] == "sacct":
            code, out, err = self.sacct
            return subprocess.CompletedProcess(argv, code, out, err)
        raise AssertionError(argv)

    def count(self, command: str) -> int:
        return sum(call[0] == command for call in self.calls)

    def watcher(self, ids, **kwargs) -> JobWatcher:
        return JobWatcher(ids, run=self.run, clock=self.clock, **kwargs)


def test_squeue_missing_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SlurmError, match="squeue is not on PATH.*--slurm-local"):
        JobWatcher(["12"])


def test_job_ids_are_checked():
    with pytest.raises(ValueError, match="not a SLURM job id"):
        Cluster().watcher(["12_[1-3]"])


def test_squeue_runs_at_most_once_per_interval():
    cluster = Cluster()
    cluster.queue = {"12_0": ("RUNNING", "None"), "12_1": ("PENDING", "JobArrayTaskLimit")}
    watcher = cluster.watcher(["12_0", "12_1"], min_interval_s=5)
    for _ in range(20):
        states = watcher.poll()
        cluster.now += 0.2
    assert cluster.count("squeue") == 1   # 4 s of polling
    assert states["12_0"].state == "RUNNING" and not states["12_0"].done
    assert states["12_1"].reason == "pending (JobArrayTaskLimit)"
    cluster.now += 1.0
    watcher.poll()
    assert cluster.count("squeue") == 2
    watcher.poll(force=True)
    assert cluster.count("squeue") == 3 and watcher.squeue_calls == 3
    assert cluster.calls[0][-1] == "--jobs=12"   # one query for the whole array


def test_array_ranges_and_end_states_listed_by_squeue():
    cluster = Cluster()
    cluster.queue = {"7_[2-4%2]": ("PENDING", "JobArrayTaskLimit"), "7_0": ("CANCELLED", "None"),
                     "7_1": ("TIMEOUT", "TimeLimit"), "8": ("OUT_OF_MEMORY", "OutOfMemory")}
    states = cluster.watcher(["7_0", "7_1", "7_3", "8"]).poll()
    assert states["7_3"].state == "PENDING" and not states["7_3"].done
    assert states["7_0"].done and states["7_0"].state == "CANCELLED"
    assert states["7_0"].reason == "cancelled (squeue: CANCELLED)"
    assert states["7_1"].reason == "hit its time limit (squeue: TIMEOUT, TimeLimit)"
    assert states["8"].done and states["8"].reason.startswith("ran out of memory")
    assert not states["7_0"].ok and states["7_0"].has_result is None
    assert cluster.count("sacct") == 1 and cluster.calls[-1][-1] == "--jobs=7,8"


def test_a_job_with_its_result_is_done_when_slurm_has_ended_it():
    cluster = Cluster()
    cluster.queue = {"5": ("RUNNING", "None"), "6": ("RUNNING", "None"), "7": ("RUNNING", "None")}
    results: set[str] = set()
    watcher = cluster.watcher(["5", "6", "7"], result_exists=lambda job_id: job_id in results,
                              result_grace_s=10)
    assert not watcher.poll()["5"].done
    results.update({"5", "6", "7"})   # written; a cancel may still come before the job ends
    state = watcher.poll()["5"]
    assert not state.done and state.reason == "running; its result file is written"
    cluster.queue = {"5": ("COMPLETED", "None"), "6": ("CANCELLED", "None"),
                     "7": ("RUNNING", "None")}
    cluster.now += 5
    states = watcher.poll()
    assert states["5"].done and states["5"].ok and states["5"].state == "COMPLETED"
    assert states["5"].reason == "completed (squeue: COMPLETED)"
    # a result, yet cancelled: the grid reads the result and can say the job was cancelled
    assert states["6"].done and states["6"].has_result and states["6"].state == "CANCELLED"
    assert not states["7"].done
    cluster.now += 5   # still RUNNING 10 s after its result appeared (a slow epilog): done
    state = watcher.poll()["7"]
    assert state.done and state.ok and state.source == "result"
    calls = len(cluster.calls)
    cluster.queue = {}
    cluster.now += 5
    assert watcher.poll()["5"] == states["5"]   # done stays done, and nothing is asked
    assert len(cluster.calls) == calls


def test_a_result_written_after_the_job_left_the_queue_finishes_it():
    cluster = Cluster()
    results: set[str] = set()
    watcher = cluster.watcher(["8"], result_exists=lambda job_id: job_id in results)
    results.add("8")   # a fast job: never listed
    state = watcher.poll()["8"]
    assert state.done and state.ok and state.reason == "finished (its result file is written)"
    assert cluster.count("squeue") == 0


def test_completed_or_failed_without_result_waits_for_the_file_then_says_so():
    cluster = Cluster()
    cluster.queue = {"9_0": ("COMPLETED", "None"), "9_1": ("FAILED", "NonZeroExitCode")}
    results: set[str] = set()
    watcher = cluster.watcher(["9_0", "9_1"], result_exists=lambda j: j in results,
                              result_grace_s=10)
    states = watcher.poll()
    assert not states["9_0"].done and "waiting for its result file" in states["9_0"].reason
    results.add("9_0")   # the shared file system showed it late
    cluster.now += 11
    states = watcher.poll()
    assert states["9_0"].ok
    assert states["9_1"].done and states["9_1"].has_result is False
    assert states["9_1"].reason == "failed (squeue: FAILED, NonZeroExitCode)"


def test_a_job_that_left_the_queue_without_accounting_is_reported_within_the_grace():
    cluster = Cluster()
    cluster.queue = {"3_0": ("RUNNING", "None"), "3_1": ("RUNNING", "None")}
    watcher = cluster.watcher(["3_0", "3_1"], result_exists=lambda j: False, result_grace_s=10)
    watcher.poll()
    cluster.queue = {}   # both gone (e.g. MinJobAge passed, or a pending task cancelled)
    for _ in range(3):   # 0, 5, 10 s after it was missed
        cluster.now += 5
        states = watcher.poll()
    state = states["3_0"]
    assert state.done and state.state == LEFT_QUEUE and not state.ok
    assert state.reason == ("left the queue without a result: cancelled, killed or crashed "
                            "(squeue no longer lists it; sacct unavailable: Slurm accounting "
                            "storage is disabled)")
    assert cluster.count("sacct") == 1   # disabled accounting is asked once, not every time
    assert "3_1: LEFT_QUEUE, left the queue without a result" in describe(states)


def test_sacct_gives_the_state_and_exit_code_when_accounting_answers():
    cluster = Cluster()
    cluster.queue = {"4": ("RUNNING", "None")}
    cluster.sacct = (0, "4|CANCELLED by 0|0:15\n", "")
    watcher = cluster.watcher(["4"], result_exists=lambda j: False)
    watcher.poll()
    cluster.queue = {}
    cluster.now += 5
    state = watcher.poll()["4"]
    assert state.done and state.state == "CANCELLED" and state.source == "sacct"
    assert state.reason == "cancelled (sacct: CANCELLED, by 0, exit code 0:15)"
    assert state.exit_code == "0:15"


def test_without_accounting_slurms_line_in_the_log_tells_why(tmp_path):
    cluster = Cluster()
    cluster.queue = {"11": ("RUNNING", "None"), "12": ("RUNNING", "None")}
    (tmp_path / "11.err").write_text(
        "Traceback ...\nslurmstepd-node3: error: *** JOB 11 ON node3 CANCELLED AT "
        "2024-05-01T10:00:00 DUE TO TIME LIMIT ***\n")
    (tmp_path / "12.err").write_text("slurmstepd: error: *** STEP 12.0 ON node3 CANCELLED AT "
                                     "2024-05-01T10:00:00 ***\n")
    watcher = cluster.watcher(["11", "12"], result_exists=lambda j: False,
                              log_file=lambda j: tmp_path / f"{j}.err")
    watcher.poll()
    cluster.queue = {}
    cluster.now += 5
    states = watcher.poll()   # a SLURM record of why: no grace needed
    assert states["11"].state == "TIMEOUT" and states["11"].source == "log"
    assert states["11"].reason.startswith("hit its time limit (log: TIMEOUT, *** JOB 11 ON node3")
    assert states["12"].state == "CANCELLED" and states["12"].done


def test_a_job_not_listed_yet_gets_time_to_appear():
    cluster = Cluster()
    watcher = cluster.watcher(["20"], appear_grace_s=30, result_exists=lambda j: False,
                              result_grace_s=0)
    state = watcher.poll()["20"]
    assert state.state == "PENDING" and not state.done
    assert state.reason == "submitted; not listed by squeue yet"
    cluster.now += 31
    state = watcher.poll()["20"]
    assert state.done and state.state == LEFT_QUEUE


def test_squeue_failures_change_nothing_until_it_answers_again():
    cluster = Cluster()
    cluster.queue = {"30": ("RUNNING", "None")}
    watcher = cluster.watcher(["30"])
    watcher.poll()
    cluster.squeue_error = (1, "slurm_load_jobs error: Unable to contact slurm controller\n")
    cluster.queue = {}
    cluster.now += 100
    state = watcher.poll()["30"]
    assert not state.done and state.state == "RUNNING"
    assert "squeue failed: slurm_load_jobs error: Unable to contact slurm controller" in state.reason
    cluster.squeue_error = None
    cluster.queue = {"30": ("COMPLETED", "None")}
    cluster.now += 5
    state = watcher.poll()["30"]
    assert state.done and state.ok and watcher.last_error == ""


def test_queue_states_is_one_look():
    cluster = Cluster()
    cluster.queue = {"40": ("RUNNING", "None")}
    states = queue_states(["40", "41"], run=cluster.run, clock=cluster.clock, use_sacct=False)
    assert states["40"].state == "RUNNING"
    assert states["41"].done and "sacct unavailable: sacct not used" in states["41"].reason


def test_for_submitit_reads_result_and_log_paths(tmp_path):
    cluster = Cluster()
    cluster.queue = {"50_0": ("RUNNING", "None"), "50_1": ("RUNNING", "None")}

    def job(job_id):
        paths = SimpleNamespace(result_pickle=tmp_path / f"{job_id}_result.pkl",
                                stderr=tmp_path / f"{job_id}.err")
        return SimpleNamespace(job_id=job_id, paths=paths)

    watcher = JobWatcher.for_submitit([job("50_0"), job("50_1")], run=cluster.run,
                                      clock=cluster.clock)
    watcher.poll()
    (tmp_path / "50_0_result.pkl").write_bytes(b"x")
    (tmp_path / "50_1.err").write_text("slurmstepd: error: *** JOB 51 ON n CANCELLED AT now ***")
    cluster.queue = {}
    cluster.now += 5
    states = watcher.poll()
    assert states["50_0"].ok and states["50_0"].has_result
    assert states["50_1"].done and states["50_1"].state == "CANCELLED"
    assert states["50_1"].has_result is False


# --------------------------------------------------------------------------- fake commands


@pytest.mark.parametrize("accounting", [False, True])
def test_fake_sbatch_job_cancelled_is_seen_within_seconds(fake_slurm, tmp_path, monkeypatch,
                                                          accounting):
    if accounting:
        monkeypatch.setenv("FAKE_SLURM_ACCOUNTING", "1")
    monkeypatch.setenv("FAKE_SLURM_MIN_JOB_AGE", "0")   # gone from squeue at once: the hard case
    script = tmp_path / "job.sh"
    script.write_text(f"#!/bin/bash\n#SBATCH --array=0-1\n#SBATCH --error={tmp_path}/%A_%a.err\n"
                      f"#SBATCH --output={tmp_path}/%A_%a.out\n"
                      "sleep 60\n")
    out = subprocess.run(["sbatch", str(script)], capture_output=True, text=True, check=True)
    base = out.stdout.split()[-1]
    watcher = JobWatcher([f"{base}_0", f"{base}_1"], min_interval_s=0.5,
                         result_exists=lambda j: Path(tmp_path / f"{j}.pkl").exists(),
                         log_file=lambda j: tmp_path / f"{j}.err")
    wait_for_job_state(watcher, f"{base}_0", lambda s: s.state == "RUNNING", timeout=30)
    start = time.monotonic()
    subprocess.run(["scancel", f"{base}_0"], check=True)
    state = wait_for_job_state(watcher, f"{base}_0", lambda s: s.done, timeout=30)
    assert time.monotonic() - start < 5
    assert state.state == "CANCELLED" and "cancelled" in state.reason
    assert state.source == ("sacct" if accounting else "log")
    assert not watcher.poll()[f"{base}_1"].done
    subprocess.run(["scancel", base], check=True)


def test_without_slurm_programs_the_cluster_tests_skip_naming_make_test_slurm(monkeypatch,
                                                                               tmp_path):
    import slurm_cluster

    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(slurm_cluster, "SBIN", ())
    reason = slurm_cluster.why_not_here()
    assert reason.startswith("SLURM programs not found: munged, slurmctld, slurmd, sbatch")
    assert "`make test-slurm` installs them" in reason


def test_done_jobs_are_not_asked_about_again():
    cluster = Cluster()
    cluster.queue = {"60": ("CANCELLED", "None"), "61": ("RUNNING", "None")}
    watcher = cluster.watcher(["60", "61"])
    assert watcher.poll()["60"].done
    cluster.now += 5
    watcher.poll()
    assert [c[-1] for c in cluster.calls if c[0] == "squeue"] == ["--jobs=60,61", "--jobs=61"]
