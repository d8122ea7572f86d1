"""Sweeps: -m multirun through the basic and submitit launchers, tracked as one MLflow parent with
children, isolated failures, resumable, reported; DDP inside a submitit job; a real mlflow server."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import run_launch

TINY = ["step_scheduler.max_steps=4", "step_scheduler.val_every_steps=2", "step_scheduler.ckpt_every_steps=2",
        "eval=none", "dataset.max_val_samples=4"]


def _children(uri: str, sweep_dir: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    parent_id = json.loads((sweep_dir / "mlflow_parent.json").read_text())["run_id"]
    parent = client.get_run(parent_id)
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")
    return client, parent, children


def _assert_tracked(uri: str, sweep_dir: Path, jobs: int, steps: int = 4) -> None:
    client, parent, children = _children(uri, sweep_dir)
    assert len(children) == jobs
    assert {c.data.tags["vlm_sweep.job_num"] for c in children} == {str(i) for i in range(jobs)}
    for child in children:
        assert child.data.tags["vlm_sweep.sweep_dir"] == str(sweep_dir.resolve())
        assert child.info.run_name and "optimizer.lr=" in child.info.run_name
        history = client.get_metric_history(child.info.run_id, "loss")
        assert sorted(m.step for m in history) == list(range(1, steps + 1))  # none lost, none twice


@pytest.mark.slow
def test_basic_sweep_parent_children_report_and_rerun_skips(tmp_path, mlflow_uri):
    sweep = tmp_path / "sweep"
    args = ["-m", f"hydra.sweep.dir={sweep}", f"tracking.uri={mlflow_uri}", "optimizer.lr=1e-3,5e-3",
            "peft=lora,none", *TINY]
    proc = run_launch(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_tracked(mlflow_uri, sweep, jobs=4)
    _, parent, _ = _children(mlflow_uri, sweep)
    assert parent.info.status == "FINISHED"
    report = (sweep / "report.md").read_text()
    assert report.count("FINISHED") >= 4 and "★" in report
    assert (sweep / "loss_curves.png").stat().st_size > 5000
    assert "optimizer.lr" in proc.stdout  # the table is printed at the end
    for job in range(4):
        status = json.loads((sweep / str(job) / "job_status.json").read_text())
        assert status["status"] == "FINISHED" and status["step"] == 4

    # Run the same sweep again: every job is already FINISHED, nothing trains twice.
    proc = run_launch(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("already FINISHED: skipped") == 4
    _assert_tracked(mlflow_uri, sweep, jobs=4)


@pytest.mark.slow
def test_failing_job_is_isolated_and_sweep_exits_nonzero(tmp_path, mlflow_uri):
    from mlflow.tracking import MlflowClient

    sweep = tmp_path / "sweep"
    # dataset.max_length=16 makes every record too long: with the pre-flight check off, the job
    # fails inside training (after its MLflow run opened).
    proc = run_launch(["-m", "hydra/launcher=local", f"hydra.sweep.dir={sweep}", f"tracking.uri={mlflow_uri}",
                       "dataset.max_length=16,512", "dataset.preflight_samples=0", "optimizer.lr=1e-3", *TINY])
    assert proc.returncode == 1
    assert "1 of 2 jobs did not finish" in proc.stderr
    failed = [line for line in proc.stderr.splitlines() if line.startswith("  job 0 ")]
    assert len(failed) == 1 and "FAILED: synthetic_receipts/train[" in failed[0], proc.stderr  # the record, by name
    assert "max_length" in failed[0] and str(sweep / "0" / "launch.log") in failed[0]
    ok = json.loads((sweep / "1" / "job_status.json").read_text())
    bad = json.loads((sweep / "0" / "job_status.json").read_text())
    assert ok["status"] == "FINISHED" and bad["status"] == "FAILED" and "max_length" in bad["error"]
    client = MlflowClient(mlflow_uri)
    assert client.get_run(bad["mlflow_run_id"]).info.status == "FAILED"
    assert client.get_run(ok["mlflow_run_id"]).info.status == "FINISHED"
    _, parent, _ = _children(mlflow_uri, sweep)
    assert parent.info.status == "FAILED"
    assert "FAILED" in (sweep / "report.md").read_text()


@pytest.mark.slow
def test_rerun_resumes_unfinished_jobs_from_their_checkpoints(tmp_path):
    sweep = tmp_path / "sweep"
    args = ["-m", f"hydra.sweep.dir={sweep}", "tracking=none", "optimizer.lr=1e-3,5e-3", *TINY]
    assert run_launch(args).returncode == 0
    # Make job 1 look interrupted after its step-2 checkpoint.
    job = sweep / "1"
    status = json.loads((job / "job_status.json").read_text())
    (job / "job_status.json").write_text(json.dumps({**status, "status": "RUNNING"}))
    import shutil

    shutil.rmtree(job / "checkpoints" / "step_4")
    (job / "checkpoints" / "LATEST").write_text("step_2\n")
    proc = run_launch(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("already FINISHED: skipped") == 1
    assert "resumed from" in (job / "launch.log").read_text()
    assert json.loads((job / "job_status.json").read_text())["status"] == "FINISHED"
    steps = [json.loads(line)["step"] for line in (job / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on 127.0.0.1, in its own process group (it spawns workers)."""
    import urllib.request

    port = _free_port()
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--default-artifact-root", str(tmp_path / "server_artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            time.sleep(0.5)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("mlflow server did not answer within 90 s")
    yield url
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.parametrize("store", ["sqlite", "server"])
def test_four_concurrent_jobs_lose_nothing(tmp_path, store, request):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}" if store == "sqlite" else request.getfixturevalue("mlflow_server")
    sweep = tmp_path / "sweep"
    proc = run_launch(["-m", "hydra/launcher=local", f"hydra.sweep.dir={sweep}", f"tracking.uri={uri}",
                       "tracking.flush_every_steps=1", "optimizer.lr=1e-3,2e-3,3e-3,4e-3", *TINY])
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_tracked(uri, sweep, jobs=4)


@pytest.mark.slow
def test_submitit_job_with_two_tasks_trains_ddp(tmp_path):
    """tasks_per_node=2: submitit's tasks become torch.distributed ranks (gloo on CPU)."""
    sweep = tmp_path / "sweep"
    common = ["tracking=none", "eval=none", "dataset.val_split=null", "peft=none", "freeze=none",
              "scheduler=constant", "step_scheduler.max_steps=2", "step_scheduler.global_batch_size=4",
              "step_scheduler.micro_batch_size=2"]
    proc = run_launch(["-m", "hydra/launcher=local", "hydra.launcher.tasks_per_node=2", "parallel=ddp",
                       f"hydra.sweep.dir={sweep}", "optimizer.lr=1e-3", *common])
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = tmp_path / "single"
    assert run_launch([f"hydra.run.dir={single}", "optimizer.lr=1e-3", *common]).returncode == 0
    read = lambda d: [json.loads(x)["loss"] for x in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert read(sweep / "0") == pytest.approx(read(single), rel=1e-4)
    assert json.loads((sweep / "0" / "checkpoints" / "step_2" / "training_state" /
                       "trainer_state.json").read_text())["world_size"] == 2


@pytest.mark.slow
def test_optuna_search_optimises_the_objective_and_resumes_its_study(tmp_path):
    import optuna

    sweep = tmp_path / "sweep"
    args = ["-m", "hparams_search=optuna", f"hydra.sweep.dir={sweep}", "hydra.sweeper.n_trials=2",
            "tracking=none", *TINY]
    proc = run_launch(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Best value" in proc.stdout + proc.stderr
    storage = f"sqlite:///{sweep / 'optuna.db'}"
    study = optuna.load_study(study_name="tiny_gemma3_synthetic_receipts", storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 2
    # Each trial's value is the job's val_loss.
    statuses = [json.loads((d / "job_status.json").read_text()) for d in sorted(sweep.glob("[0-9]*_*"))]
    assert sorted(t.value for t in study.trials) == pytest.approx(sorted(s["val_loss"] for s in statuses))
    assert run_launch(args).returncode == 0  # the same command again continues the study
    study = optuna.load_study(study_name="tiny_gemma3_synthetic_receipts", storage=storage)
    assert len(study.trials) == 4 and len(list(sweep.glob("[0-9]*_*"))) == 4
    assert "★" in (sweep / "report.md").read_text()
