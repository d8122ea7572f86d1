"""Sweeps on a real SLURM cluster (scripts/local_slurm.sh up): array tasks, preemption + requeue,
a cancelled job failing the sweep cleanly. CI brings the cluster up; elsewhere these skip."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, skip_or_fail_without_slurm

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

STATE_DIR = Path(os.environ.get("LOCAL_SLURM_DIR", "/tmp/vlm_sweep_slurm"))


def _slurm_env() -> dict:
    env = dict(os.environ)
    conf = STATE_DIR / "etc" / "slurm.conf"
    env.setdefault("SLURM_CONF", str(conf))
    return env


@pytest.fixture(scope="module", autouse=True)
def cluster():
    if shutil.which("sinfo") is None:
        skip_or_fail_without_slurm("no SLURM client (sinfo) on PATH: run scripts/local_slurm.sh up")
    up = subprocess.run(["bash", str(ROOT / "scripts" / "local_slurm.sh"), "status"], capture_output=True)
    if up.returncode != 0:
        skip_or_fail_without_slurm("the local SLURM cluster is not up: run scripts/local_slurm.sh up")
    return _slurm_env()


def _sweep_cmd(sweep: Path, mlflow_uri: str, *overrides: str) -> list:
    return [sys.executable, str(ROOT / "launch.py"), "-m", "hydra/launcher=slurm", "hydra.launcher.partition=debug",
            "hydra.launcher.cpus_per_task=1", f"hydra.sweep.dir={sweep}", f"tracking.uri={mlflow_uri}",
            "eval=none", "dataset.max_val_samples=4", *overrides]


def _sacct(job_id: str, env: dict) -> list:
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job_id, "--format=JobID,State"], env=env,
                         capture_output=True, text=True).stdout
    return [line.split("|") for line in out.splitlines() if line]


def _children(uri: str, sweep: Path) -> list:
    from mlflow.tracking import MlflowClient

    parent_id = json.loads((sweep / "mlflow_parent.json").read_text())["run_id"]
    client = MlflowClient(uri)
    exp = client.get_run(parent_id).info.experiment_id
    return client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")


def test_three_job_sweep_runs_as_array_tasks(tmp_path, mlflow_uri, cluster):
    sweep = tmp_path / "sweep"
    proc = subprocess.run(_sweep_cmd(sweep, mlflow_uri, "optimizer.lr=1e-3,2e-3,5e-3", "step_scheduler.max_steps=4",
                                     "step_scheduler.ckpt_every_steps=4", "step_scheduler.val_every_steps=4"),
                          cwd=ROOT, env=cluster, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    statuses = [json.loads((sweep / str(i) / "job_status.json").read_text()) for i in range(3)]
    assert [s["status"] for s in statuses] == ["FINISHED"] * 3
    array_ids = {s["slurm_job_id"].split("_")[0] for s in statuses}
    assert len(array_ids) == 1, "one job array"
    assert sorted(s["slurm_job_id"].split("_")[1] for s in statuses) == ["0", "1", "2"]
    array_id = array_ids.pop()
    # The result files land a moment before slurmdbd records the end of the tasks.
    _wait_for(lambda: sorted(state for _, state in _sacct(array_id, cluster)) == ["COMPLETED"] * 3, 60,
              "sacct to show three COMPLETED array tasks")
    children = _children(mlflow_uri, sweep)
    assert len(children) == 3
    assert {c.data.tags["vlm_sweep.slurm_job_id"] for c in children} == {s["slurm_job_id"] for s in statuses}
    assert (sweep / "report.md").exists() and (sweep / "metric_vs_hparams.png").exists()


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _steps(job_dir: Path) -> list:
    path = job_dir / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


def test_preempted_job_checkpoints_requeues_and_resumes_unbroken(tmp_path, mlflow_uri, cluster):
    from mlflow.tracking import MlflowClient

    sweep = tmp_path / "sweep"
    sweep_proc = subprocess.Popen(
        _sweep_cmd(sweep, mlflow_uri, "optimizer.lr=5e-3", "step_scheduler.max_steps=60",
                   "step_scheduler.ckpt_every_steps=1000", "step_scheduler.val_every_steps=1000",
                   "tracking.flush_every_steps=1"),
        cwd=ROOT, env=cluster, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    job = sweep / "0"
    _wait_for(lambda: len(_steps(job)) >= 10, 180, "the job to train 10 steps")
    slurm_id = json.loads((job / "job_status.json").read_text())["slurm_job_id"]
    # What SLURM sends before preemption / the time limit (submitit asks for USR2).
    subprocess.run(["scancel", "--signal=USR2", slurm_id.split("_")[0]], env=cluster, check=True)
    out, err = sweep_proc.communicate(timeout=600)
    assert sweep_proc.returncode == 0, err[-3000:]
    log = (job / "launch.log").read_text()
    assert "checkpointed at step" in log and "resumed from" in log
    assert _steps(job) == list(range(1, 61))
    status = json.loads((job / "job_status.json").read_text())
    assert status["status"] == "FINISHED"
    history = MlflowClient(mlflow_uri).get_metric_history(status["mlflow_run_id"], "loss")
    assert sorted(m.step for m in history) == list(range(1, 61)), "one unbroken curve, no step twice"
    assert len(_children(mlflow_uri, sweep)) == 1


def test_cancelled_job_fails_the_sweep_cleanly(tmp_path, mlflow_uri, cluster):
    sweep = tmp_path / "sweep"
    sweep_proc = subprocess.Popen(
        _sweep_cmd(sweep, mlflow_uri, "optimizer.lr=1e-3", "step_scheduler.max_steps=4,400",
                   "step_scheduler.ckpt_every_steps=1000", "step_scheduler.val_every_steps=1000"),
        cwd=ROOT, env=cluster, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Job 0 finishes (4 steps); job 1 (400 steps) is cancelled while it trains.
    long_job = sweep / "1"
    _wait_for(lambda: len(_steps(long_job)) >= 3, 240, "a long job to train")
    slurm_id = json.loads((long_job / "job_status.json").read_text())["slurm_job_id"]
    subprocess.run(["scancel", slurm_id], env=cluster, check=True)
    started = time.monotonic()
    out, err = sweep_proc.communicate(timeout=600)
    assert sweep_proc.returncode == 1, err[-3000:]
    assert time.monotonic() - started < 300
    status = json.loads((long_job / "job_status.json").read_text())
    # scancel sends SIGTERM: the job checkpoints and stops (KILLED), or dies outright (FAILED).
    assert status["status"] in ("KILLED", "FAILED")
    assert "SIGTERM" in status["error"] or slurm_id in status["error"]
    assert "job 1" in err and "log:" in err and "1 of 2 jobs did not finish" in err
    assert json.loads((sweep / "0" / "job_status.json").read_text())["status"] == "FINISHED"


def test_job_with_two_slurm_tasks_trains_on_two_ranks(tmp_path, mlflow_uri, cluster):
    """tasks_per_node=2: SLURM's tasks become torch.distributed ranks (no torchrun inside)."""
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        _sweep_cmd(sweep, mlflow_uri, "hydra.launcher.tasks_per_node=2", "parallel=ddp", "optimizer.lr=1e-3",
                   "step_scheduler.max_steps=2", "step_scheduler.ckpt_every_steps=2", "dataset.val_split=null"),
        cwd=ROOT, env=cluster, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = json.loads((sweep / "0" / "checkpoints" / "step_2" / "training_state" / "trainer_state.json").read_text())
    assert state["world_size"] == 2
    assert (sweep / "0" / "checkpoints" / "step_2" / "training_state" / "rank_1.pt").exists()
    assert len(_children(mlflow_uri, sweep)) == 1  # one MLflow run per job, from rank 0 only
