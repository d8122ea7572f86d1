"""Experiment tracking: MLflow (embedded SQLite store by default) or nothing.

- redaction: secrets and URI credentials never reach a saved config, param, tag or log line.
- store: the store's URI, the pre-flight check (``check_tracking``), safe first use of SQLite.
- sender: a background thread, so training never waits on the store.
- tracker: ``make_tracker`` -> MlflowTracker / NullTracker (log, backfill on resume, finish).
"""

from vlm_sweep.tracking.redaction import (CREDENTIALS_IN_URI_ERROR, REDACTED, SECRET_KEY, flatten, redact,
                                          redact_uri, uri_has_credentials)
from vlm_sweep.tracking.store import (RetryingClient, TrackingError, artifact_location, check_tracking,
                                      check_tracking_store, default_tracking_uri, discard_run, experiment_id,
                                      store_lock)
from vlm_sweep.tracking.tracker import MlflowTracker, NullTracker, make_tracker

__all__ = [
    "CREDENTIALS_IN_URI_ERROR", "REDACTED", "SECRET_KEY", "flatten", "redact", "redact_uri",
    "uri_has_credentials", "RetryingClient", "TrackingError", "artifact_location", "check_tracking",
    "check_tracking_store", "default_tracking_uri", "discard_run", "experiment_id", "store_lock",
    "MlflowTracker", "NullTracker", "make_tracker",
]
