"""The tracking store: its URI, a pre-flight check, safe first use, a client that rides out SQLite locks.

A store that cannot be used is found before any model loads (``check_tracking_store``),
with one line naming the URI (credentials masked) and the fix.
"""

from __future__ import annotations

import logging
import os
import random
import re
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional
from urllib.parse import urlsplit

from vlm_sweep.errors import UserError
from vlm_sweep.tracking.redaction import redact_uri

log = logging.getLogger("vlm_sweep.tracking")

# Schemes MLflow resolves to a tracking store ("" is a plain local path: a file store).
KNOWN_SCHEMES = ("http", "https", "sqlite", "postgresql", "mysql", "mssql", "file", "databricks",
                 "databricks-uc", "uc", "")
DB_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}
# One HTTP request to the server: short, and not retried by MLflow (it would retry a dead server
# for minutes); the tracker's sender retries on its own schedule instead.
HTTP_TIMEOUT_S = 5
SEARCH_ENDPOINT = "/api/2.0/mlflow/experiments/search"
_JITTER = random.Random()  # not the global RNG: retries must not change a seeded training run


class TrackingError(UserError, RuntimeError):
    """The tracking store cannot be used; the message is one line naming the URI and the fix."""


def default_tracking_uri(output_root: str) -> str:
    """$MLFLOW_TRACKING_URI, else an SQLite store under outputs/ (MLflow 3 refuses new ./mlruns)."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{Path(output_root).resolve() / 'mlflow.db'}"


def artifact_location(uri: str) -> Optional[str]:
    """Artifacts next to an SQLite store (MLflow would default to ./mlruns in the cwd).

    A server decides its own.
    """
    path = sqlite_path(uri)
    return (path.parent / "mlartifacts").resolve().as_uri() if path is not None else None


def uri_scheme(uri: str) -> str:
    """``postgresql+psycopg2://...`` -> ``postgresql``; a plain path -> ``""``."""
    match = re.match(r"([A-Za-z][A-Za-z0-9+.\-]*)://", uri)
    return match.group(1).lower().split("+")[0] if match else ""


def is_http(uri: str) -> bool:
    return uri_scheme(uri) in ("http", "https")


def sqlite_path(uri: str) -> Optional[Path]:
    """The database file of an ``sqlite:///`` URI (None for other stores and in-memory SQLite)."""
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") and len(uri) > 10 else None


def quick_http_defaults() -> None:
    """Short, unretried MLflow HTTP requests, unless the user set these variables themselves.

    MLflow's own "View run at http://user:password@host/..." line is turned off: it prints the
    URI with its credentials; the run summary prints the masked URI instead.
    """
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(HTTP_TIMEOUT_S))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")


@contextmanager
def store_lock(uri: str, wait_s: float = 300.0) -> Iterator[None]:
    """Serialise first use of an SQLite store across processes (``flock`` on ``<db>.lock``).

    MLflow creates the schema on the first connection; jobs of a sweep starting at once
    on a fresh file race in it and most die. Other stores: no lock. Not re-entrant.
    """
    import fcntl

    path = sqlite_path(uri)
    if path is None:
        yield
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path.with_name(path.name + ".lock"), "a")
    except OSError:  # the pre-flight check reports an unwritable store
        yield
        return
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    log.warning("%s stayed locked for %.0f s; continuing without the lock", path, wait_s)
                    break
                time.sleep(0.05)
            except OSError:  # a file system without locks
                break
        yield
    finally:
        handle.close()  # releases the lock


def one_line(err: BaseException) -> str:
    """An exception as one short line, credentials masked."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return redact_uri(text)[:300]


class RetryingClient:
    """MlflowClient whose calls retry with backoff while an SQLite store is locked.

    Concurrent sweep jobs writing one SQLite file hit "database is locked"; a
    retry loses nothing. (On a cluster prefer ``mlflow server``: tracking.uri=http://...)
    """

    def __init__(self, uri: str, attempts: int = 12) -> None:
        from mlflow.tracking import MlflowClient

        if is_http(uri):
            quick_http_defaults()
        with store_lock(uri):  # MlflowClient opens the store (creating its schema) right here
            self._client = MlflowClient(uri)
        self._attempts = attempts

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._client, name)
        if not callable(method):
            return method

        def call(*args: Any, **kwargs: Any) -> Any:
            for attempt in range(self._attempts):
                try:
                    return method(*args, **kwargs)
                except Exception as err:
                    transient = "locked" in str(err) or "busy" in str(err).lower()
                    if not transient or attempt == self._attempts - 1:
                        raise
                    time.sleep(min(0.2 * 2 ** attempt, 5.0) * (0.5 + _JITTER.random()))
        return call


def experiment_id(client: Any, name: str, uri: str) -> str:
    """Get or create an experiment; safe when several jobs create it at once."""
    with store_lock(uri):
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


# ---------------------------------------------------------------- pre-flight


# A server that accepts the connection but is slow (a busy 2-core node, ten jobs starting at once)
# is alive: a timed-out call is tried this many times; a refused connection fails at once.
HTTP_ATTEMPTS_ON_TIMEOUT = 3


def check_tracking_store(uri: str, timeout_s: float = 10.0, label: str = "tracking.uri") -> None:
    """Raise TrackingError (one line) unless ``uri`` is a store this run can write to.

    An http(s) server must answer an API call within ``timeout_s`` (a call that times out is
    tried HTTP_ATTEMPTS_ON_TIMEOUT times, so a busy server is not mistaken for a dead one);
    an SQLite file must be creatable/writable; a database server must accept a connection.
    """
    shown = f"{label}={redact_uri(uri)}"
    scheme = uri_scheme(uri)
    if scheme not in KNOWN_SCHEMES:
        raise TrackingError(
            f"{shown} has an unknown scheme '{scheme}://' (use http(s)://host:port, sqlite:////path/to/mlflow.db, "
            f"postgresql://host/db, or tracking=none)")
    if scheme in ("http", "https"):
        _check_http(uri, shown, label, timeout_s)
    elif scheme == "sqlite":
        _check_sqlite(uri, shown, label)
    elif scheme in DB_PORTS:
        _check_tcp(uri, shown, label, DB_PORTS[scheme], timeout_s)


def check_tracking(tracking_cfg: Any, output_root: str, timeout_s: float = 10.0) -> None:
    """The pre-flight check for a run's config: nothing for tracking=none, else check_tracking_store."""
    if tracking_cfg.backend == "none":
        return
    label = "tracking.uri" if tracking_cfg.uri or not os.environ.get("MLFLOW_TRACKING_URI") \
        else "MLFLOW_TRACKING_URI"
    check_tracking_store(tracking_cfg.uri or default_tracking_uri(output_root), timeout_s, label)


def unreachable_reason(err: BaseException, timeout_s: float) -> str:
    """Why a request got no answer, in a few words."""
    text = f"{err} {err.__cause__ or ''}".lower()
    for needles, reason in ((("refused",), "connection refused"),
                            (("timed out", "timeout"), f"no answer within {timeout_s:g} s"),
                            (("name or service not known", "failed to resolve", "nodename nor servname",
                              "getaddrinfo", "name resolution"), "host not found"),
                            (("no route to host",), "no route to host"),
                            (("network is unreachable",), "network unreachable"),
                            (("ssl", "certificate"), "TLS error")):
        if any(n in text for n in needles):
            return reason
    return one_line(err)[:150]


def _check_http(uri: str, shown: str, label: str, timeout_s: float) -> None:
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    for attempt in range(1, HTTP_ATTEMPTS_ON_TIMEOUT + 1):
        try:
            response = http_request(get_default_host_creds(uri), SEARCH_ENDPOINT, "POST", max_retries=0,
                                    backoff_factor=0, timeout=timeout_s, raise_on_status=False,
                                    json={"max_results": 1})
            break
        except Exception as err:
            reason = unreachable_reason(err, timeout_s)
            if reason.startswith("no answer within") and attempt < HTTP_ATTEMPTS_ON_TIMEOUT:
                log.warning("%s: no answer within %g s (try %d of %d); trying again", shown, timeout_s, attempt,
                            HTTP_ATTEMPTS_ON_TIMEOUT)
                continue
            if reason.startswith("no answer within"):
                reason = f"no answer within {timeout_s:g} s, {HTTP_ATTEMPTS_ON_TIMEOUT} tries"
            raise TrackingError(f"{shown} does not answer ({reason}); start the server, "
                                f"fix {label}, or tracking=none") from None
    if response.status_code in (401, 403):
        raise TrackingError(f"{shown} refused the credentials (HTTP {response.status_code}); set "
                            "MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)")
    if response.status_code != 200:
        raise TrackingError(f"{shown} is not a working MLflow server (HTTP {response.status_code} on "
                            f"{SEARCH_ENDPOINT}); fix {label} or tracking=none")


def _check_sqlite(uri: str, shown: str, label: str) -> None:
    path = sqlite_path(uri)
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            raise IsADirectoryError(21, "Is a directory", str(path))
        if path.exists():
            with open(path, "r+b"):
                pass
        else:
            fd, probe = tempfile.mkstemp(dir=path.parent, prefix=".mlflow_write_probe")
            os.close(fd)
            os.unlink(probe)
    except OSError as err:
        raise TrackingError(f"{shown} is not writable ({err.strerror or err}: {err.filename or path}); "
                            f"fix {label} or tracking=none") from None


def _check_tcp(uri: str, shown: str, label: str, default_port: int, timeout_s: float) -> None:
    parts = urlsplit(uri)
    try:
        with socket.create_connection((parts.hostname or "localhost", parts.port or default_port),
                                      timeout=timeout_s):
            pass
    except OSError as err:
        raise TrackingError(f"{shown} does not answer ({unreachable_reason(err, timeout_s)}); start the "
                            f"database, fix {label}, or tracking=none") from None


def discard_run(tracking_cfg: Any, output_root: str, run_id: str) -> None:
    """Delete a run that a fresh start replaces (it was killed before its first checkpoint).

    Best effort: a store that cannot do it leaves the old run, with a warning.
    """
    uri = tracking_cfg.uri or default_tracking_uri(output_root)
    try:
        RetryingClient(uri).delete_run(run_id)
    except Exception as err:
        log.warning("could not delete the replaced MLflow run %s in %s: %s", run_id, redact_uri(uri),
                    one_line(err))
