"""Tracking: secret redaction, the MLflow tracker against a real SQLite store, resume."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import compose
from vlm_sweep.tracking import (CREDENTIALS_IN_URI_ERROR, REDACTED, MlflowTracker, NullTracker, TrackingError,
                                check_tracking, check_tracking_store, default_tracking_uri, flatten,
                                make_tracker, redact, redact_uri, uri_has_credentials)

SECRET = "hf_abcdefgh123"


@pytest.fixture
def hf_token(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    return SECRET


def _tracking_cfg(mlflow_uri: str, *overrides: str):
    return compose([f"tracking.uri={mlflow_uri}", *overrides]).tracking


def _client(mlflow_uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(mlflow_uri)


def _spy_log_batch(tracker, calls: list):
    original = tracker.client.log_batch

    def spy(run_id, metrics=(), params=(), tags=(), **kwargs):
        calls.append({"metrics": len(metrics or ()), "params": len(params or ())})
        return original(run_id, metrics=metrics, params=params, tags=tags, **kwargs)

    tracker.client.log_batch = spy


# ---------------------------------------------------------------- redact


def test_redact_masks_secret_keys_and_env_secret_values(hf_token, monkeypatch):
    monkeypatch.setenv("MY_SERVICE_API_KEY", "svc-key-998877")
    data = {
        "hf_token": "anything",
        "api_key": "k-123",
        "api-key": "k-456",
        "MLFLOW_TRACKING_PASSWORD": "pw",
        "db": {"client_secret": "s3cr3t", "private_key": "-----BEGIN"},
        "nested": {
            "url": f"https://user:{SECRET}@example.org/repo",
            "notes": [f"token is {SECRET}", 3, {"deeper": SECRET}],
            "service": "calls with svc-key-998877 attached",
        },
        "optimizer": {"name": "adamw", "lr": 0.0005, "betas": [0.9, 0.95]},
        "prompt": "Describe this image.",
        "flag": "false",        # TOKENIZERS_PARALLELISM-like short values are not secrets
        "hf_token_unset": None,  # nothing to hide
        "count": 7,
    }
    before = copy.deepcopy(data)
    out = redact(data)
    assert data == before, "redact must not modify its input"

    for key in ("hf_token", "api_key", "api-key", "MLFLOW_TRACKING_PASSWORD"):
        assert out[key] == REDACTED
    assert out["db"] == {"client_secret": REDACTED, "private_key": REDACTED}
    assert out["nested"]["url"] == "https://***@example.org/repo"  # URI credentials: user-info masked
    assert out["nested"]["notes"] == [f"token is {REDACTED}", 3, {"deeper": REDACTED}]
    assert out["nested"]["service"] == f"calls with {REDACTED} attached"
    # Ordinary values untouched.
    assert out["optimizer"] == before["optimizer"]
    assert out["prompt"] == "Describe this image."
    assert out["flag"] == "false"
    assert out["hf_token_unset"] is None
    assert out["count"] == 7
    assert SECRET not in repr(out) and "svc-key-998877" not in repr(out)


def test_redact_without_secrets_in_env_is_identity(monkeypatch):
    data = {"model": {"name": "tiny_gemma3", "path": "/models/x"}, "seed": 42, "tags": ["a", "b"]}
    assert redact(data, _secrets=[]) == data


def test_flatten_gives_dotted_string_params():
    flat = flatten({"optimizer": {"lr": 0.0005, "betas": [0.9, 0.95]}, "seed": 42, "peft": {"x": None}})
    assert flat == {"optimizer.lr": "0.0005", "optimizer.betas": "[0.9, 0.95]", "seed": "42", "peft.x": "None"}


# ---------------------------------------------------------------- make_tracker / uri


def test_null_tracker_for_tracking_none_and_non_main_ranks(tmp_path, mlflow_uri):
    db = Path(mlflow_uri.removeprefix("sqlite:///"))
    off = compose(["tracking=none"]).tracking
    assert type(make_tracker(off, str(tmp_path / "out"), is_main=True)) is NullTracker
    on = _tracking_cfg(mlflow_uri)
    assert type(make_tracker(on, str(tmp_path / "out"), is_main=False)) is NullTracker
    assert not db.exists() and not (tmp_path / "out").exists()


def test_default_tracking_uri(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert default_tracking_uri(str(tmp_path / "outputs")) == f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    assert default_tracking_uri(str(tmp_path / "elsewhere")) == "http://mlflow.internal:5000"


# ---------------------------------------------------------------- MlflowTracker


def test_params_are_logged_in_batches(tmp_path, mlflow_uri):
    cfg = _tracking_cfg(mlflow_uri)
    tracker = MlflowTracker(cfg, str(tmp_path / "outputs"))
    calls: list = []
    _spy_log_batch(tracker, calls)
    params = {f"group{i // 10}.key{i}": i * 0.5 for i in range(250)}
    params["dataset.prompt"] = "x" * 10_000  # longer than MLflow's value limit: truncated, not fatal
    tracker.log_params(params)
    tracker.finish("FINISHED")

    assert [c["params"] for c in calls] == [100, 100, 51]
    run = _client(mlflow_uri).get_run(tracker.run_id)
    logged = run.data.params
    assert len(logged) == 251
    assert all(logged[k] == str(v) for k, v in params.items() if k != "dataset.prompt")
    assert logged["dataset.prompt"] == "x" * len(logged["dataset.prompt"]) and len(logged["dataset.prompt"]) >= 500
    experiment = _client(mlflow_uri).get_experiment(run.info.experiment_id)
    assert experiment.name == compose().experiment_name


def test_metrics_are_buffered_and_all_arrive_in_order(tmp_path, mlflow_uri):
    cfg = _tracking_cfg(mlflow_uri, "tracking.flush_every_steps=10")
    tracker = MlflowTracker(cfg, str(tmp_path / "outputs"))
    client = _client(mlflow_uri)
    calls: list = []
    _spy_log_batch(tracker, calls)

    def loss(step):
        return 2.0 / (step + 1)

    for step in range(9):
        tracker.log_metrics({"loss": loss(step), "lr": 1e-4}, step=step)
    assert client.get_metric_history(tracker.run_id, "loss") == []  # still buffered
    tracker.log_metrics({"loss": loss(9), "lr": 1e-4}, step=9)
    assert tracker.sender.wait(timeout_s=30)  # sent by the background sender, without a flush
    assert [m.step for m in client.get_metric_history(tracker.run_id, "loss")] == list(range(10))
    for step in range(10, 25):
        tracker.log_metrics({"loss": loss(step), "lr": 1e-4}, step=step)
    tracker.finish("FINISHED")

    # One request per flush (10, 10, then the 5 left at finish), not one per value.
    assert [c["metrics"] for c in calls] == [20, 20, 10]
    history = client.get_metric_history(tracker.run_id, "loss")
    steps = [m.step for m in sorted(history, key=lambda m: (m.step, m.timestamp))]
    assert steps == list(range(25)), "every step exactly once"
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx([loss(s) for s in range(25)])
    assert len(client.get_metric_history(tracker.run_id, "lr")) == 25
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["loss"] == pytest.approx(loss(24))


def test_failed_run_then_resume_continues_the_same_run(tmp_path, mlflow_uri):
    cfg = _tracking_cfg(mlflow_uri, "tracking.flush_every_steps=100")
    client = _client(mlflow_uri)
    first = MlflowTracker(cfg, str(tmp_path / "outputs"))
    for step in range(5):
        first.log_metrics({"loss": 1.0 - step / 10}, step=step)
    first.finish("FAILED")  # buffered metrics are flushed even on failure
    run = client.get_run(first.run_id)
    assert run.info.status == "FAILED" and run.info.end_time is not None
    assert [m.step for m in client.get_metric_history(first.run_id, "loss")] == list(range(5))

    second = MlflowTracker(cfg, str(tmp_path / "outputs"), run_id=first.run_id)
    assert second.run_id == first.run_id
    assert client.get_run(first.run_id).info.status == "RUNNING"
    for step in range(5, 8):
        second.log_metrics({"loss": 1.0 - step / 10}, step=step)
    second.finish("FINISHED")
    assert client.get_run(first.run_id).info.status == "FINISHED"
    steps = sorted(m.step for m in client.get_metric_history(first.run_id, "loss"))
    assert steps == list(range(8))
    runs = client.search_runs([client.get_run(first.run_id).info.experiment_id])
    assert [r.info.run_id for r in runs] == [first.run_id], "resume must not open a new run"


# ---------------------------------------------------------------- secrets never reach MLflow


SECRET_OVERRIDES = [
    f"+tracking.tags.note=uploaded with {SECRET}",       # literal secret in a value
    "+tracking.tags.auth=${oc.env:HF_TOKEN}",            # env interpolation, innocuous key
    "+tracking.tags.hub_token=not-an-env-secret-42",     # secret-looking key
]


def _logged_like_the_recipe(cfg, tmp_path):
    """What vlm_sweep.train.run does with the composed config on rank 0."""
    from vlm_sweep.train import resolved_config

    tracker = MlflowTracker(cfg.tracking, str(tmp_path / "outputs"))
    config_data = resolved_config(cfg)
    tracker.log_params({**flatten(config_data), "trainable_params": 123})
    tracker.finish("FINISHED")
    return tracker, config_data


def test_env_secret_never_reaches_mlflow_params(tmp_path, mlflow_uri, hf_token):
    cfg = compose([f"tracking.uri={mlflow_uri}", *SECRET_OVERRIDES])
    assert OmegaConf.to_container(cfg.tracking.tags, resolve=True)["auth"] == SECRET  # really there
    tracker, config_data = _logged_like_the_recipe(cfg, tmp_path)

    params = _client(mlflow_uri).get_run(tracker.run_id).data.params
    for key in ("tracking.tags.note", "tracking.tags.auth", "tracking.tags.hub_token"):
        assert key in params  # logged, but masked
    assert not [k for k, v in params.items() if SECRET in v]
    assert params["tracking.tags.note"] == f"uploaded with {REDACTED}"
    assert params["tracking.tags.auth"] == REDACTED
    assert params["tracking.tags.hub_token"] == REDACTED
    assert params["optimizer.lr"] == str(cfg.optimizer.lr)  # ordinary params intact
    # The run's config.yaml artifact is written from the same data.
    assert SECRET not in OmegaConf.to_yaml(OmegaConf.create(config_data))


def test_env_secret_never_reaches_mlflow_run_tags(tmp_path, mlflow_uri, hf_token):
    cfg = compose([f"tracking.uri={mlflow_uri}", *SECRET_OVERRIDES])
    tracker, _ = _logged_like_the_recipe(cfg, tmp_path)
    tags = _client(mlflow_uri).get_run(tracker.run_id).data.tags
    assert {"note", "auth", "hub_token"} <= set(tags)
    leaked = {k: v for k, v in tags.items() if SECRET in v or "not-an-env-secret-42" in v}
    assert not leaked, f"secrets in MLflow run tags: {sorted(leaked)}"


# ---------------------------------------------------------------- credentials inside URIs


@pytest.mark.parametrize("uri,shown", [
    ("http://user:PASSWORD@host:5000", "http://***@host:5000"),
    ("https://user:p@ss:w@rd@mlflow.example.org/path?x=1", "https://***@mlflow.example.org/path?x=1"),
    ("https://tokenonly@host", "https://***@host"),
    ("postgresql+psycopg2://me:pw@db:5432/mlflow", "postgresql+psycopg2://***@db:5432/mlflow"),
])
def test_uri_credentials_are_detected_and_masked(uri, shown):
    assert uri_has_credentials(uri)
    assert redact_uri(uri) == shown
    assert not uri_has_credentials(shown.replace("***@", ""))


@pytest.mark.parametrize("uri", ["http://127.0.0.1:5000", "sqlite:////tmp/x/mlflow.db", "/plain/path",
                                 "http://host/a@b"])  # an "@" in the path is not user-info
def test_uris_without_credentials_are_left_alone(uri):
    assert not uri_has_credentials(uri)
    assert redact_uri(uri) == uri


def test_credentials_error_names_the_key_and_the_env_vars():
    assert CREDENTIALS_IN_URI_ERROR.startswith("config error: tracking.uri contains credentials")
    assert "MLFLOW_TRACKING_USERNAME" in CREDENTIALS_IN_URI_ERROR and "\n" not in CREDENTIALS_IN_URI_ERROR


def test_redact_masks_uri_credentials_in_any_string_value(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://alice:env-pass-5678@tracker:5000")
    data = {"tracking": {"uri": "http://bob:cfg-pass-1234@tracker:5000",
                         "tags": {"note": "see s3://k:v@bucket/x"}},
            "free_text": "copied env-pass-5678 by hand", "list": ["ftp://u:p@files/a"]}
    out = redact(data)
    assert out["tracking"]["uri"] == "http://***@tracker:5000"
    assert out["tracking"]["tags"]["note"] == "see s3://***@bucket/x"
    assert out["list"] == ["ftp://***@files/a"]
    assert "env-pass-5678" not in repr(out) and "cfg-pass-1234" not in repr(out)


# ---------------------------------------------------------------- pre-flight check of the store


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_preflight_waits_out_a_server_that_is_slow_to_answer():
    """A busy server (ten jobs starting on a small node) is alive: a timed-out call is tried again."""
    import http.server
    import threading
    import time

    calls = []

    class SlowThenFast(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            calls.append(self.path)
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if len(calls) == 1:
                time.sleep(1.5)  # longer than the check's timeout: the first try gives up
            body = b'{"experiments": []}'
            try:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the first try gave up waiting: that is the point

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), SlowThenFast)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        check_tracking_store(f"http://127.0.0.1:{server.server_address[1]}", timeout_s=0.5)
    finally:
        server.shutdown()
    assert len(calls) >= 2 and all("experiments/search" in path for path in calls)


def test_preflight_refuses_a_server_that_does_not_answer():
    port = _free_port()  # nothing listens there
    with pytest.raises(TrackingError) as err:
        check_tracking_store(f"http://user:hunter2-secret@127.0.0.1:{port}", timeout_s=3)
    message = str(err.value)
    assert message == (f"tracking.uri=http://***@127.0.0.1:{port} does not answer (connection refused); "
                       "start the server, fix tracking.uri, or tracking=none")
    assert "hunter2" not in message


def test_preflight_refuses_an_unknown_scheme():
    with pytest.raises(TrackingError) as err:
        check_tracking_store("foo://x")
    assert str(err.value).startswith("tracking.uri=foo://x has an unknown scheme 'foo://' (use http(s)://")
    assert str(err.value).endswith("or tracking=none)") and "\n" not in str(err.value)


def test_preflight_refuses_an_unwritable_sqlite_path(tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the store's folder should be")
    with pytest.raises(TrackingError) as err:
        check_tracking_store(f"sqlite:///{blocker / 'mlflow.db'}")
    assert str(err.value).startswith(f"tracking.uri=sqlite:///{blocker / 'mlflow.db'} is not writable (")
    assert "\n" not in str(err.value)


def test_preflight_accepts_a_writable_sqlite_path_without_creating_the_store(tmp_path, mlflow_uri):
    check_tracking_store(mlflow_uri)
    assert list(tmp_path.iterdir()) == []  # checked, not created: tracking=none runs stay clean


def test_preflight_names_the_env_var_when_the_uri_comes_from_it(tmp_path, monkeypatch):
    port = _free_port()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    with pytest.raises(TrackingError, match=rf"^MLFLOW_TRACKING_URI=http://127.0.0.1:{port} does not answer"):
        check_tracking(compose().tracking, str(tmp_path))
    check_tracking(compose(["tracking=none"]).tracking, str(tmp_path))  # nothing to check


# ---------------------------------------------------------------- finish


def test_finish_failed_is_kept_and_finish_is_idempotent(tmp_path, mlflow_uri):
    tracker = make_tracker(_tracking_cfg(mlflow_uri, "tracking.flush_every_steps=100"), str(tmp_path), True)
    tracker.log_metrics({"loss": 0.5}, step=1)
    tracker.finish("FAILED")  # a handled error
    tracker.finish("FINISHED")  # e.g. a finally clause after the handler: no effect, no error
    tracker.log_metrics({"loss": 0.4}, step=2)  # after the end: ignored, not an error
    run = _client(mlflow_uri).get_run(tracker.run_id)
    assert run.info.status == "FAILED"
    assert [m.step for m in _client(mlflow_uri).get_metric_history(tracker.run_id, "loss")] == [1]


# ---------------------------------------------------------------- backfill on resume

KILLED_RUN = """
import json, os, signal, sys
from omegaconf import OmegaConf
from vlm_sweep.tracking import MlflowTracker
uri, run_dir = sys.argv[1], sys.argv[2]
cfg = OmegaConf.create({"backend": "mlflow", "uri": uri, "experiment_name": "resume", "run_name": None,
                        "flush_every_steps": 8, "tags": {}})
tracker = MlflowTracker(cfg, run_dir)
open(os.path.join(run_dir, "tracking.json"), "w").write(json.dumps({"run_id": tracker.run_id}))
for step in range(1, 13):  # like Trainer._log: the tracker, then metrics.jsonl
    metrics = {"loss": 2.0 / (step + 1), "lr": 1e-4 * step}
    if step % 5 == 0:
        metrics["val_loss"] = 3.0 / step
    tracker.log_metrics(metrics, step)
    with open(os.path.join(run_dir, "metrics.jsonl"), "a") as fh:
        fh.write(json.dumps({"step": step, **metrics}) + "\\n")
assert tracker.sender.wait(60)  # steps 1..8 delivered; 9..12 still buffered
os.kill(os.getpid(), signal.SIGKILL)
"""


def _metrics_row(step):
    row = {"loss": 2.0 / (step + 1), "lr": 1e-4 * step}
    if step % 5 == 0:
        row["val_loss"] = 3.0 / step
    return row


@pytest.mark.parametrize("checkpoint_step", [10, 5])
def test_resume_backfills_what_a_killed_run_never_sent(tmp_path, mlflow_uri, checkpoint_step):
    """Killed at step 12 with steps 9..12 unsent; resumed from the checkpoint at step 10 (MLflow lacks
    9, 10) or 5 (MLflow already has 6..8): either way the curve is every step 1..20 exactly once."""
    import json
    import signal
    import subprocess
    import sys

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    proc = subprocess.run([sys.executable, "-c", KILLED_RUN, mlflow_uri, str(run_dir)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    run_id = json.loads((run_dir / "tracking.json").read_text())["run_id"]
    client = _client(mlflow_uri)
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == list(range(1, 9))

    # What the recipe does on resume: metrics.jsonl back to the checkpoint, backfill, train on.
    metrics_file = run_dir / "metrics.jsonl"
    kept = [line for line in metrics_file.read_text().splitlines() if json.loads(line)["step"] <= checkpoint_step]
    metrics_file.write_text("".join(line + "\n" for line in kept))
    cfg = compose([f"tracking.uri={mlflow_uri}", "tracking.experiment_name=resume",
                   "tracking.flush_every_steps=8"]).tracking
    tracker = MlflowTracker(cfg, str(tmp_path), run_id=run_id)
    sent = tracker.backfill(metrics_file, through_step=checkpoint_step)
    assert sent == (2 + 2 + 1 if checkpoint_step == 10 else 0)  # loss, lr at 9, 10 and val_loss at 10
    for step in range(checkpoint_step + 1, 21):  # the trainer logs every step after the checkpoint
        tracker.log_metrics(_metrics_row(step), step)
    tracker.finish("FINISHED")

    for key, steps in (("loss", range(1, 21)), ("lr", range(1, 21)), ("val_loss", range(5, 21, 5))):
        history = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        assert [m.step for m in history] == list(steps), f"{key}: every step once"
        assert [m.value for m in history] == pytest.approx([_metrics_row(s)[key] for s in steps])
    assert client.get_run(run_id).info.status == "FINISHED"


def test_opening_a_run_leaves_the_seeded_python_rng_alone(tmp_path, mlflow_uri):
    """MLflow names an unnamed run from Python's global RNG; a tracked run must train exactly like an
    untracked one with the same seed."""
    import random

    random.seed(1234)
    expected = random.getstate()
    tracker = make_tracker(_tracking_cfg(mlflow_uri), str(tmp_path), is_main=True)
    tracker.log_metrics({"loss": 1.0}, step=1)
    tracker.finish("FINISHED")
    assert random.getstate() == expected
    assert _client(mlflow_uri).get_run(tracker.run_id).info.run_name  # still named by MLflow
