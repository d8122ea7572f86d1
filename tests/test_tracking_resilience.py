"""Tracking under stress, against real stores: a server that dies and comes back mid-run,
credentials in $MLFLOW_TRACKING_URI, eight jobs opening one fresh SQLite store at once."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import compose
from vlm_sweep.tracking import make_tracker

PASSWORD = "pw-s3cret-7788"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A real `mlflow server` on 127.0.0.1 that a test can kill and start again on the same port and store."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port",
             str(self.port), "--backend-store-uri", f"sqlite:///{self.root / 'server.db'}",
             "--default-artifact-root", str(self.root / "server_artifacts")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        self.kill()
        pytest.fail("mlflow server did not answer within 120 s")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None


@pytest.fixture
def server(tmp_path):
    srv = Server(tmp_path)
    srv.start()
    try:
        yield srv
    finally:
        srv.kill()


def _history(url: str, run_id: str, key: str = "loss"):
    from mlflow.tracking import MlflowClient

    return sorted(MlflowClient(url).get_metric_history(run_id, key), key=lambda m: m.step)


def _log(tracker, run_dir: Path, steps) -> list:
    """Log like Trainer._log (tracker, then metrics.jsonl); the seconds each tracker call took."""
    took = []
    for step in steps:
        metrics = {"loss": 1.0 / step, "lr": 1e-3}
        started = time.monotonic()
        tracker.log_metrics(metrics, step)
        took.append(time.monotonic() - started)
        with open(run_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps({"step": step, **metrics}) + "\n")
    return took


@pytest.mark.slow
def test_training_never_waits_for_a_dead_server_and_nothing_is_lost(tmp_path, server, monkeypatch, caplog):
    """The server dies mid-run and comes back: log calls stay instant, one warning line (credentials
    masked), every step arrives once. A server still down at finish: finish returns, and the points
    reach MLflow when the run resumes (backfill from metrics.jsonl)."""
    caplog.set_level(logging.INFO, logger="vlm_sweep")
    # Credentials travel in the environment's URI (allowed); they must never be stored or printed.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://vlmuser:{PASSWORD}@127.0.0.1:{server.port}")
    cfg = compose(["tracking.flush_every_steps=1", "tracking.retry_every_s=1"]).tracking
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    tracker = make_tracker(cfg, str(run_dir), is_main=True)
    assert tracker.uri == f"http://***@127.0.0.1:{server.port}"
    _log(tracker, run_dir, range(1, 6))
    assert tracker.flush(timeout_s=30)

    server.kill()
    took = _log(tracker, run_dir, range(6, 11))
    assert max(took) < 0.5, f"a log call waited on the dead server: {took}"
    deadline = time.monotonic() + 30  # the sender notices the outage on its own
    while "does not answer" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.2)
    server.start()  # same port, same backend store
    _log(tracker, run_dir, range(11, 16))
    tracker.finish("FINISHED")

    assert [m.step for m in _history(server.url, tracker.run_id)] == list(range(1, 16))
    assert len(_history(server.url, tracker.run_id, "lr")) == 15
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert f"MLflow at http://***@127.0.0.1:{server.port} does not answer" in warnings[0]
    assert PASSWORD not in caplog.text

    # Down again, and still down at finish: finish gives up quickly and says so.
    (tmp_path / "second").mkdir()
    second = make_tracker(cfg, str(tmp_path / "second"), is_main=True)
    _log(second, tmp_path / "second", range(1, 4))
    assert second.flush(timeout_s=30)
    server.kill()
    _log(second, tmp_path / "second", range(4, 7))
    started = time.monotonic()
    second.finish("KILLED")
    assert time.monotonic() - started < 20
    assert "reach MLflow when the run resumes" in caplog.text
    server.start()
    assert [m.step for m in _history(server.url, second.run_id)] == [1, 2, 3]
    resumed = make_tracker(cfg, str(tmp_path / "second"), is_main=True, run_id=second.run_id)
    assert resumed.backfill(tmp_path / "second" / "metrics.jsonl", through_step=6) == 6  # loss, lr at 4..6
    resumed.finish("FINISHED")
    assert [m.step for m in _history(server.url, second.run_id)] == list(range(1, 7))
    assert PASSWORD not in caplog.text


@pytest.mark.slow
def test_uri_credentials_never_reach_files_mlflow_or_logs(tmp_path, server, monkeypatch, caplog):
    """$MLFLOW_TRACKING_URI with user:password: connects with them; stores and prints only http://***@..."""
    from mlflow.tracking import MlflowClient

    from vlm_sweep.sweep.callbacks import SweepCallback
    from vlm_sweep.train import resolved_config
    from vlm_sweep.tracking import flatten

    caplog.set_level(logging.INFO)
    env_uri = f"http://vlmuser:{PASSWORD}@127.0.0.1:{server.port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env_uri)
    cfg = compose([f"paths.output_root={tmp_path / 'outputs'}", f"+tracking.tags.server={env_uri}"])
    OmegaConf.set_struct(cfg, False)
    cfg.hydra = {"sweep": {"dir": str(tmp_path / "sweep")}}
    callback = SweepCallback()
    callback.on_multirun_start(cfg)
    parent = json.loads((tmp_path / "sweep" / "mlflow_parent.json").read_text())
    assert parent["uri"] == f"http://***@127.0.0.1:{server.port}"

    tracker = make_tracker(cfg.tracking, cfg.paths.output_root, True, parent_run_id=parent["run_id"])
    tracker.log_params(flatten(resolved_config(cfg)))
    tracker.log_metrics({"loss": 1.0}, 1)
    tracker.finish("FINISHED")
    callback._close_parent(cfg, parent, "FINISHED")  # connects with the real URI, not the masked one

    client = MlflowClient(server.url)
    run = client.get_run(tracker.run_id)
    stored = json.dumps([run.data.params, run.data.tags, client.get_run(parent["run_id"]).data.tags])
    assert run.data.tags["server"] == f"http://***@127.0.0.1:{server.port}"
    assert PASSWORD not in stored and PASSWORD not in caplog.text
    assert client.get_run(parent["run_id"]).info.status == "FINISHED"
    assert tracker.uri == parent["uri"]


CONCURRENT_JOB = """
import sys, time
from pathlib import Path
from omegaconf import OmegaConf
from vlm_sweep.tracking import MlflowTracker
import mlflow.store.tracking.sqlalchemy_store  # imported before the start signal: the race is the store's
uri, ready, go, job = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
ready.touch()
while not go.exists():
    time.sleep(0.01)
cfg = OmegaConf.create({"backend": "mlflow", "uri": uri, "experiment_name": "concurrent", "run_name": None,
                        "flush_every_steps": 1, "tags": {"job": str(job)}})
tracker = MlflowTracker(cfg, str(Path(uri[len("sqlite:///"):]).parent))
for step in range(1, 6):
    tracker.log_metrics({"loss": job + step / 10}, step)
tracker.finish("FINISHED")
print(tracker.run_id)
"""


@pytest.mark.slow
def test_eight_jobs_open_one_fresh_sqlite_store_at_once(tmp_path):
    """A sweep's jobs starting together on a store that does not exist yet: every one runs, nothing lost."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT_JOB, uri, str(tmp_path / f"ready{i}"), str(go),
                               str(i)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(8)]
    try:
        deadline = time.monotonic() + 180
        while not all((tmp_path / f"ready{i}").exists() for i in range(8)):
            assert time.monotonic() < deadline, "jobs did not start"
            assert all(p.poll() is None for p in procs), [p.communicate()[1][-2000:] for p in procs if p.poll()]
            time.sleep(0.1)
        go.touch()
        results = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    failed = [(i, err[-1500:]) for i, (p, (_, err)) in enumerate(zip(procs, results)) if p.returncode != 0]
    assert not failed, failed
    run_ids = [out.strip().splitlines()[-1] for out, _ in results]
    assert len(set(run_ids)) == 8
    client = MlflowClient(uri)
    for job, run_id in enumerate(run_ids):
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED" and run.data.tags["job"] == str(job)
        history = sorted(client.get_metric_history(run_id, "loss"), key=lambda m: m.step)
        assert [(m.step, m.value) for m in history] == [(s, pytest.approx(job + s / 10)) for s in range(1, 6)]
