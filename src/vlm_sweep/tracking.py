"""Experiment tracking: MLflow (embedded SQLite store by default) or nothing.

Metrics are buffered and sent with ``log_batch`` (one call per flush, not one per
value). Params are the flattened composed config with secrets redacted. Only
rank 0 creates a tracker; the others get ``NullTracker``.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Optional

log = logging.getLogger(__name__)

# A key is secret if one of its _/./- separated parts is one of these (max_new_tokens is not).
SECRET_KEY = re.compile(
    r"(^|[_.-])(token|secret|password|passwd|api[_-]?key|access[_-]?key|credentials?|private[_-]?key|auth)"
    r"($|[_.-])", re.I)
SECRET_ENV_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY", "MLFLOW_TRACKING_PASSWORD",
                   "MLFLOW_TRACKING_TOKEN", "AWS_SECRET_ACCESS_KEY", "AZURE_STORAGE_ACCESS_KEY")
REDACTED = "***REDACTED***"


def _secret_values() -> List[str]:
    values = [os.environ.get(v, "") for v in SECRET_ENV_VARS]
    values += [v for k, v in os.environ.items() if SECRET_KEY.search(k)]
    return [v for v in values if len(v) >= 6]


def redact(obj: Any, _secrets: Optional[List[str]] = None) -> Any:
    """Copy of a nested dict/list with secret-looking keys and known secret values masked."""
    secrets = _secret_values() if _secrets is None else _secrets
    if isinstance(obj, dict):
        return {k: (REDACTED if SECRET_KEY.search(str(k)) and v not in (None, "") else redact(v, secrets))
                for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v, secrets) for v in obj]
    if isinstance(obj, str):
        for secret in secrets:
            obj = obj.replace(secret, REDACTED)
    return obj


def flatten(obj: Any, prefix: str = "") -> Dict[str, str]:
    """{"optimizer.lr": "0.0005", ...} from a nested dict."""
    out: Dict[str, str] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
    else:
        out[prefix[:-1]] = str(obj)
    return out


def default_tracking_uri(output_root: str) -> str:
    """$MLFLOW_TRACKING_URI, else an SQLite store under outputs/ (MLflow 3 refuses new ./mlruns)."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    path = Path(output_root).resolve() / "mlflow.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def artifact_location(uri: str) -> Optional[str]:
    """Artifacts next to an SQLite store (MLflow would default to ./mlruns in the cwd); a server decides its own."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
    return None


class NullTracker:
    """Tracking turned off (or a non-zero rank): every call is a no-op."""

    run_id: Optional[str] = None
    uri: Optional[str] = None

    def log_params(self, params: Dict[str, Any]) -> None: ...
    def last_logged_step(self) -> int: return 0
    def log_metrics(self, metrics: Dict[str, float], step: int) -> None: ...
    def log_artifact(self, path: str) -> None: ...
    def flush(self) -> None: ...
    def finish(self, status: str) -> None: ...


class RetryingClient:
    """MlflowClient whose calls retry with backoff while an SQLite store is locked.

    Concurrent sweep jobs writing one SQLite file hit "database is locked"; a
    retry loses nothing. (On a cluster prefer ``mlflow server``: tracking.uri=http://...)
    """

    def __init__(self, uri: str, attempts: int = 12) -> None:
        from mlflow.tracking import MlflowClient

        self._client = MlflowClient(uri)
        self._attempts = attempts

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._client, name)
        if not callable(method):
            return method

        def call(*args: Any, **kwargs: Any) -> Any:
            import random
            import time

            for attempt in range(self._attempts):
                try:
                    return method(*args, **kwargs)
                except Exception as err:
                    transient = "locked" in str(err) or "busy" in str(err).lower()
                    if not transient or attempt == self._attempts - 1:
                        raise
                    time.sleep(min(0.2 * 2 ** attempt, 5.0) * (0.5 + random.random()))
        return call


def experiment_id(client: Any, name: str, uri: str) -> str:
    """Get or create an experiment; safe when several jobs create it at once."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location(uri))
    except Exception:  # created concurrently by another job
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


class MlflowTracker(NullTracker):
    """One MLflow run (a child of the sweep's parent run in a sweep); metrics sent in batches."""

    def __init__(self, tracking_cfg: Any, output_root: str, run_id: Optional[str] = None,
                 parent_run_id: Optional[str] = None, run_name: Optional[str] = None,
                 tags: Optional[Dict[str, Any]] = None) -> None:
        self.uri = tracking_cfg.uri or default_tracking_uri(output_root)
        self.client = RetryingClient(self.uri)
        self.flush_every = tracking_cfg.flush_every_steps
        self._buffer: List[Any] = []
        self._since_flush = 0
        if run_id is None:
            exp_id = experiment_id(self.client, tracking_cfg.experiment_name, self.uri)
            all_tags = {**dict(tracking_cfg.tags), **(tags or {})}
            if parent_run_id:
                all_tags["mlflow.parentRunId"] = parent_run_id
            all_tags = {str(k): str(v) for k, v in redact(all_tags).items() if v is not None}
            name = tracking_cfg.run_name or run_name
            run = self.client.create_run(exp_id, run_name=redact(name) if name else None, tags=all_tags)
            run_id = run.info.run_id
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.run_id = run_id

    def log_params(self, params: Dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in redact(params).items()]
        for i in range(0, len(items), 100):  # MLflow's per-request limit
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def last_logged_step(self) -> int:
        """Highest step with a logged loss (a resumed run skips steps up to it: no duplicates)."""
        history = self.client.get_metric_history(self.run_id, "loss")
        return max((m.step for m in history), default=0)

    def log_metrics(self, metrics: Dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._buffer += [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self._since_flush += 1
        if self._since_flush >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        for i in range(0, len(self._buffer), 1000):
            self.client.log_batch(self.run_id, metrics=self._buffer[i:i + 1000])
        self._buffer, self._since_flush = [], 0

    def log_artifact(self, path: str) -> None:
        self.client.log_artifact(self.run_id, path)

    def finish(self, status: str) -> None:
        self.flush()
        self.client.set_terminated(self.run_id, status=status)


def make_tracker(tracking_cfg: Any, output_root: str, is_main: bool, run_id: Optional[str] = None,
                 **run_info: Any) -> NullTracker:
    """The configured tracker on rank 0, a NullTracker elsewhere or when tracking=none.

    ``run_info``: parent_run_id, run_name, tags for a sweep's child run.
    """
    if not is_main or tracking_cfg.backend == "none":
        return NullTracker()
    return MlflowTracker(tracking_cfg, output_root, run_id=run_id, **run_info)
