"""Checks against the real single-node SLURM cluster of scripts/local_slurm.sh.

Bring it up first:
    bash scripts/local_slurm.sh up && eval "$(bash scripts/local_slurm.sh env)"
    python -m pytest -q -m slurm tests/test_local_slurm.py

Every test skips (with the reason) when `sinfo` is not on PATH or the cluster does not
answer. If SLURM_CONF is not exported, the config of the default state dir
($LOCAL_SLURM_DIR or /tmp/vlm_sweep_slurm) is used when it exists.
"""

from __future__ import annotations

import operator
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import skip_or_fail_without_slurm

pytestmark = pytest.mark.slurm

STATE_DIR = Path(os.environ.get("LOCAL_SLURM_DIR", "/tmp/vlm_sweep_slurm"))
UP_HINT = "start it with: bash scripts/local_slurm.sh up && eval \"$(bash scripts/local_slurm.sh env)\""


def _run(*cmd: str, timeout: float = 30) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def _controller_refuses(conf: str | None) -> bool:
    """True when SLURM_CONF names a controller whose port refuses connections (sinfo
    would spend ~10 s retrying before it fails)."""
    if not conf or not Path(conf).is_file():
        return False
    host, port = None, 6817
    for line in Path(conf).read_text().splitlines():
        key, _, value = line.strip().partition("=")
        if key.lower() == "slurmctldhost" and host is None:
            host = value.split("(")[-1].rstrip(")") if "(" in value else value
        elif key.lower() == "slurmctldport" and value.isdigit():
            port = int(value)
    if not host:
        return False
    try:
        socket.create_connection((host, port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    return False


@pytest.fixture(scope="module", autouse=True)
def slurm_cluster():
    """Skip unless a cluster answers; make SLURM_CONF point at it for this module."""
    if shutil.which("sinfo") is None:
        skip_or_fail_without_slurm(f"sinfo is not on PATH (no SLURM client installed); {UP_HINT}")
    with pytest.MonkeyPatch.context() as mp:
        conf = STATE_DIR / "etc" / "slurm.conf"
        if not os.environ.get("SLURM_CONF") and conf.exists():
            mp.setenv("SLURM_CONF", str(conf))
        if _controller_refuses(os.environ.get("SLURM_CONF")):
            skip_or_fail_without_slurm(f"the SLURM cluster is not up (nothing listens on its slurmctld port); {UP_HINT}")
        try:
            proc = subprocess.run(["sinfo", "-h", "-o", "%P %T"], capture_output=True, text=True, timeout=15)
        except subprocess.TimeoutExpired:
            skip_or_fail_without_slurm(f"the SLURM cluster does not answer (sinfo timed out); {UP_HINT}")
        if proc.returncode != 0 or not proc.stdout.strip():
            skip_or_fail_without_slurm(f"the SLURM cluster is not up (sinfo: {proc.stderr.strip() or 'no partitions'}); {UP_HINT}")
        yield proc.stdout.strip()


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2):
    """Poll predicate() until it returns something truthy; fail after timeout seconds."""
    end = time.monotonic() + timeout
    last = None
    while time.monotonic() < end:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def sbatch(*args: str) -> str:
    out = _run("sbatch", "--parsable", *args)
    return out.strip().split(";")[0]


def sacct_state(job_id: str) -> str:
    """State of the job's latest run in accounting ('' while not recorded yet)."""
    out = _run("sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State")
    lines = [line.strip() for line in out.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def squeue_state(job_id: str) -> str:
    proc = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=30)
    return proc.stdout.strip()  # '' (and a non-zero exit) once the job has left the queue


def _cancel_quietly(job_id: str) -> None:
    subprocess.run(["scancel", job_id], capture_output=True, timeout=30)


def test_default_partition_is_debug(slurm_cluster):
    partitions = _run("sinfo", "-h", "-o", "%P").split()
    assert "debug*" in partitions, f"expected a default partition 'debug', got {partitions}"


def test_sbatch_wrap_completes_in_sacct(tmp_path):
    out = tmp_path / "hello_%j.out"
    job_id = sbatch("--job-name=vlm-hello", f"--output={out}", "--wrap", "echo hello-from-slurm")
    wait_for(lambda: sacct_state(job_id) == "COMPLETED", 30, f"job {job_id} COMPLETED in sacct")
    exit_code = _run("sacct", "-n", "-X", "-P", "-j", job_id, "-o", "ExitCode").split()[-1]
    assert exit_code == "0:0"
    log = Path(str(out).replace("%j", job_id))
    assert "hello-from-slurm" in wait_for(lambda: log.exists() and log.read_text(), 10, f"{log}")


def test_requeued_job_comes_back_and_completes(tmp_path):
    out = tmp_path / "requeue_%j.out"
    # first run (restart count 0) blocks until it is requeued; the second run exits at once
    script = 'echo "run ${SLURM_RESTART_COUNT:-0}"; [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ] || sleep 300'
    job_id = sbatch("--requeue", "--open-mode=append", f"--output={out}", "--wrap", script)
    try:
        wait_for(lambda: squeue_state(job_id) == "RUNNING", 30, f"job {job_id} RUNNING")
        _run("scontrol", "requeue", job_id)
        t0 = time.monotonic()
        wait_for(lambda: sacct_state(job_id) == "COMPLETED", 45, f"requeued job {job_id} COMPLETED")
        print(f"requeue -> COMPLETED in {time.monotonic() - t0:.1f}s")
    finally:
        _cancel_quietly(job_id)
    log = Path(str(out).replace("%j", job_id)).read_text()
    assert "run 0" in log and "run 1" in log, log
    history = _run("sacct", "-n", "-X", "-P", "--duplicates", "-j", job_id, "-o", "State").split()
    assert "REQUEUED" in history and history[-1] == "COMPLETED", history


def test_scancel_running_job_is_cancelled_in_sacct():
    job_id = sbatch("--output=/dev/null", "--wrap", "sleep 300")
    try:
        wait_for(lambda: squeue_state(job_id) == "RUNNING", 30, f"job {job_id} RUNNING")
        _run("scancel", job_id)
        t0 = time.monotonic()
        state = wait_for(
            lambda: (s := sacct_state(job_id)).startswith("CANCELLED") and s, 10, f"job {job_id} CANCELLED in sacct"
        )
        print(f"scancel -> {state} in sacct after {time.monotonic() - t0:.1f}s")
    finally:
        _cancel_quietly(job_id)
    wait_for(lambda: squeue_state(job_id) in ("", "CANCELLED"), 15, f"job {job_id} to leave the queue")


def test_array_of_three_tasks_finishes(tmp_path):
    # 2 CPUs, 3 tasks: must not deadlock (they share CPUs or queue, both are fine)
    job_id = sbatch("--array=0-2", f"--output={tmp_path}/arr_%A_%a.out", "--wrap", "sleep 2; echo task $SLURM_ARRAY_TASK_ID")
    try:

        def all_completed():
            out = _run("sacct", "-n", "-X", "-P", "-j", job_id, "-o", "JobID,State")
            states = dict(line.split("|") for line in out.splitlines() if "|" in line)
            done = [k for k, v in states.items() if v == "COMPLETED" and "[" not in k]
            return len(done) == 3 and states

        wait_for(all_completed, 40, f"array {job_id} (3 tasks) COMPLETED")
    finally:
        _cancel_quietly(job_id)


# --------------------------------------------------------------------------- submitit


def _result_within(job, timeout: float):
    """job.result() in a thread, so that a hang fails the test instead of blocking it."""
    box: dict = {}

    def target():
        try:
            box["result"] = job.result()
        except BaseException as exc:  # noqa: BLE001 - reported to the caller
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    t0 = time.monotonic()
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise AssertionError(f"job {job.job_id}: result() still blocked after {timeout}s (state {job.state})")
    return box, time.monotonic() - t0


def test_submitit_returns_function_result(tmp_path):
    submitit = pytest.importorskip("submitit")
    executor = submitit.AutoExecutor(folder=tmp_path / "%j", cluster="slurm")
    executor.update_parameters(timeout_min=5, slurm_partition="debug")
    job = executor.submit(operator.mul, 6, 7)
    box, elapsed = _result_within(job, 60)
    assert box.get("error") is None, box.get("error")
    assert box["result"] == 42
    print(f"submitit result in {elapsed:.1f}s")


def test_submitit_cancelled_job_result_raises(tmp_path):
    """With accounting (slurmdbd) sacct reports CANCELLED, so result() raises instead of hanging."""
    submitit = pytest.importorskip("submitit")
    executor = submitit.AutoExecutor(folder=tmp_path / "%j", cluster="slurm")
    executor.update_parameters(timeout_min=5, slurm_partition="debug")
    job = executor.submit(time.sleep, 300)
    try:
        wait_for(lambda: squeue_state(job.job_id) == "RUNNING", 30, f"submitit job {job.job_id} RUNNING")
        job.cancel()
        # submitit: sacct poll (a few s) + 15 s waiting for a result pickle, then UncompletedJobError
        box, elapsed = _result_within(job, 60)
    finally:
        _cancel_quietly(job.job_id)
    assert isinstance(box.get("error"), submitit.core.utils.UncompletedJobError), box
    assert "CANCELLED" in str(box["error"])
    print(f"submitit result() raised {elapsed:.1f}s after cancel")
