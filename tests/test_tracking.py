"""Tracking: secret redaction, the MLflow tracker against a real SQLite store, resume."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import compose
from vlm_sweep.tracking import (REDACTED, MlflowTracker, NullTracker, default_tracking_uri, flatten,
                                make_tracker, redact)

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
    assert out["nested"]["url"] == f"https://user:{REDACTED}@example.org/repo"
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
