"""The run's tracker: MLflow (embedded SQLite store by default) or nothing.

Training never waits on tracking: metrics are buffered, handed to a background sender
every ``tracking.flush_every_steps`` steps and sent with ``log_batch``; an unreachable
store costs one warning, not the run. A resumed run first backfills, from metrics.jsonl,
every point the MLflow run lacks (those a kill or an outage kept from it), so its curve
equals an uninterrupted run's, each step once. Only rank 0 creates a tracker.
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Set

from vlm_sweep.tracking.redaction import redact, redact_uri
from vlm_sweep.tracking.sender import Sender, is_permanent
from vlm_sweep.tracking.store import (RetryingClient, TrackingError, default_tracking_uri, experiment_id,
                                      one_line, sqlite_path)

log = logging.getLogger("vlm_sweep.tracking")

METRICS_PER_REQUEST = 1000  # MLflow's per-request limits
PARAMS_PER_REQUEST = 100


class NullTracker:
    """Tracking turned off (or a non-zero rank): every call is a no-op."""

    run_id: Optional[str] = None
    uri: Optional[str] = None

    def log_params(self, params: Dict[str, Any]) -> None: ...
    def last_logged_step(self) -> int: return 0
    def backfill(self, metrics_jsonl: Path, through_step: int) -> int: return 0
    def log_metrics(self, metrics: Dict[str, float], step: int) -> None: ...
    def log_artifact(self, path: str) -> None: ...
    def flush(self, timeout_s: float = 0.0) -> bool: return True
    def finish(self, status: str) -> None: ...


def _number(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _read_rows(path: Path) -> List[Dict[str, Any]]:
    """metrics.jsonl rows; a half-written last line (a kill mid-write) is passed over."""
    rows = []
    if not Path(path).exists():
        return rows
    for line in Path(path).read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


def _retry_sync(call: Callable[[], Any], attempts: int = 3) -> Any:
    """A call the run cannot start without: a few quick retries while the store does not answer."""
    for attempt in range(attempts):
        try:
            return call()
        except Exception as err:
            if is_permanent(err) or attempt == attempts - 1:
                raise
            time.sleep(1.0 + 2 * attempt)


class MlflowTracker(NullTracker):
    """One MLflow run (a child of the sweep's parent run in a sweep).

    ``uri`` is the store's URI with any credentials masked (safe to print and store);
    the real one is used only to connect.
    """

    def __init__(self, tracking_cfg: Any, output_root: str, run_id: Optional[str] = None,
                 parent_run_id: Optional[str] = None, run_name: Optional[str] = None,
                 tags: Optional[Dict[str, Any]] = None, retry_every_s: Optional[float] = None,
                 finish_timeout_s: Optional[float] = None) -> None:
        connect_uri = tracking_cfg.uri or default_tracking_uri(output_root)
        self.uri = redact_uri(connect_uri)
        self.flush_every = tracking_cfg.flush_every_steps
        self.finish_timeout_s = finish_timeout_s or getattr(tracking_cfg, "finish_timeout_s", None) or (
            30.0 if sqlite_path(connect_uri) else 6.0)  # a local store may be locked a while; a server is down
        self._buffer: List[Any] = []
        self._since_flush = 0
        self._present: Dict[str, Set[int]] = {}  # (key -> steps) the MLflow run already has (read at resume)
        self._finished = False
        try:
            self.client = RetryingClient(connect_uri)
            self.run_id = self._open_run(tracking_cfg, connect_uri, run_id, parent_run_id, run_name, tags)
        except Exception as err:
            action = f"continue MLflow run {run_id}" if run_id else "start an MLflow run"
            raise TrackingError(f"could not {action} in {self.uri}: {one_line(err)}") from None
        self.sender = Sender(self._send, self.uri,
                             retry_every_s=retry_every_s or getattr(tracking_cfg, "retry_every_s", None) or 30.0)

    def _open_run(self, tracking_cfg: Any, uri: str, run_id: Optional[str], parent_run_id: Optional[str],
                  run_name: Optional[str], tags: Optional[Dict[str, Any]]) -> str:
        if run_id is not None:
            _retry_sync(lambda: self.client.update_run(run_id, status="RUNNING"))
            return run_id
        exp_id = _retry_sync(lambda: experiment_id(self.client, tracking_cfg.experiment_name, uri))
        all_tags = {**dict(tracking_cfg.tags), **(tags or {})}
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        all_tags = {str(k): str(v) for k, v in redact(all_tags).items() if v is not None}
        name = tracking_cfg.run_name or run_name
        state = random.getstate()  # MLflow draws unnamed runs' names from the global RNG training seeded
        try:
            run = _retry_sync(lambda: self.client.create_run(exp_id, run_name=redact(name) if name else None,
                                                             tags=all_tags))
        finally:
            random.setstate(state)
        return run.info.run_id

    def _send(self, what: str, payload: Any) -> None:
        """Runs on the sender thread."""
        if what == "metrics":
            self.client.log_batch(self.run_id, metrics=payload)
        elif what == "params":
            self.client.log_batch(self.run_id, params=payload)
        elif what == "artifact":
            self.client.log_artifact(self.run_id, payload)
        elif what == "status":
            self.client.set_terminated(self.run_id, status=payload)

    # -- what the recipe and the trainer call --------------------------------------------
    def log_params(self, params: Dict[str, Any]) -> None:
        from mlflow.entities import Param

        if self._finished:
            return
        items = [Param(k, str(v)[:6000]) for k, v in redact(params).items()]
        for i in range(0, len(items), PARAMS_PER_REQUEST):
            self.sender.put("params", items[i:i + PARAMS_PER_REQUEST])

    def log_artifact(self, path: str) -> None:
        if not self._finished:
            self.sender.put("artifact", str(path))

    def log_metrics(self, metrics: Dict[str, float], step: int) -> None:
        """Buffer one step's metrics (a (key, step) the run already has is not sent twice)."""
        from mlflow.entities import Metric

        if self._finished:
            return
        now = int(time.time() * 1000)
        for key, value in metrics.items():
            number = _number(value)
            if number is not None and step not in self._present.get(key, ()):
                self._buffer.append(Metric(key, number, now, step))
        self._since_flush += 1
        if self._since_flush >= self.flush_every:
            self._hand_over()

    def _hand_over(self) -> None:
        for i in range(0, len(self._buffer), METRICS_PER_REQUEST):
            chunk = self._buffer[i:i + METRICS_PER_REQUEST]
            self.sender.put("metrics", chunk, len(chunk))
        self._buffer, self._since_flush = [], 0

    def flush(self, timeout_s: float = 0.0) -> bool:
        """Hand the buffer to the sender; with ``timeout_s``, wait that long for delivery. True if delivered."""
        self._hand_over()
        return self.sender.wait(timeout_s) if timeout_s > 0 else self.sender.pending() == 0

    def backfill(self, metrics_jsonl: Path, through_step: int) -> int:
        """Send every metrics.jsonl point up to ``through_step`` that the MLflow run lacks.

        Call once when a run resumes, before training continues. It also remembers every
        (key, step) the run has, so log_metrics drops re-logged steps it already holds.
        Returns the number of points queued.
        """
        from mlflow.entities import Metric

        rows = _read_rows(Path(metrics_jsonl))
        keys = sorted({k for row in rows for k in row if k != "step"} | {"loss"})
        try:
            for key in keys:
                history = _retry_sync(lambda: self.client.get_metric_history(self.run_id, key))
                self._present[key] = {m.step for m in history}
        except Exception as err:
            log.warning("could not read MLflow run %s in %s (%s): points from before the restart are not "
                        "backfilled", self.run_id, self.uri, one_line(err))
            return 0
        now = int(time.time() * 1000)
        missing: Dict[tuple, Any] = {}
        for row in rows:
            step = row["step"]
            for key, value in row.items():
                number = _number(value)
                if key != "step" and number is not None and step <= through_step \
                        and step not in self._present[key]:
                    missing[(key, step)] = Metric(key, number, now, step)
        for key, step in missing:
            self._present[key].add(step)
        points = sorted(missing.values(), key=lambda m: (m.step, m.key))
        for i in range(0, len(points), METRICS_PER_REQUEST):
            chunk = points[i:i + METRICS_PER_REQUEST]
            self.sender.put("metrics", chunk, len(chunk))
        if points:
            log.info("MLflow run %s lacked %d metric points of steps %d..%d: sending them from %s", self.run_id,
                     len(points), points[0].step, points[-1].step, metrics_jsonl)
        return len(points)

    def last_logged_step(self) -> int:
        """Highest step with a logged loss (0 when it cannot be read)."""
        if "loss" in self._present:
            return max(self._present["loss"], default=0)
        try:
            history = self.client.get_metric_history(self.run_id, "loss")
        except Exception as err:
            log.warning("could not read MLflow run %s in %s: %s", self.run_id, self.uri, one_line(err))
            return 0
        return max((m.step for m in history), default=0)

    def finish(self, status: str) -> None:
        """Send what is left and close the run as ``status`` (FINISHED, FAILED, KILLED).

        Idempotent; never raises; waits at most ``finish_timeout_s``. Points still
        undelivered are in metrics.jsonl and reach MLflow when the run resumes.
        """
        if self._finished:
            return
        self._finished = True
        try:
            self._hand_over()
            self.sender.put("status", status)
            left = self.sender.close(self.finish_timeout_s)
            if self.sender.pending():
                log.warning("MLflow at %s did not take the end of run %s (%d metric points and its %s "
                            "status not delivered); the points are in metrics.jsonl and reach MLflow when the "
                            "run resumes", self.uri, self.run_id, left, status)
        except Exception as err:  # never let tracking turn a run's ending into a crash
            log.warning("could not close MLflow run %s in %s: %s", self.run_id, self.uri, one_line(err))


def make_tracker(tracking_cfg: Any, output_root: str, is_main: bool, run_id: Optional[str] = None,
                 **run_info: Any) -> NullTracker:
    """The configured tracker on rank 0, a NullTracker elsewhere or when tracking=none.

    ``run_info``: parent_run_id, run_name, tags for a sweep's child run.
    """
    if not is_main or tracking_cfg.backend == "none":
        return NullTracker()
    return MlflowTracker(tracking_cfg, output_root, run_id=run_id, **run_info)
