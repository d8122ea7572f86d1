"""Delivers tracking calls from a background thread, so training never waits on the store.

Calls are queued in order and sent one at a time. When the store stops answering, an
outage starts: one warning line, then one attempt every ``retry_every_s`` until it
answers again, when everything queued goes out (re-sending a metric MLflow already has
is harmless: an identical point is stored once). The queue is bounded; points dropped
from it are still in metrics.jsonl and reach MLflow when the run resumes (backfill).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any, Callable, Deque, Optional, Tuple

from vlm_sweep.tracking.store import HTTP_TIMEOUT_S, one_line, unreachable_reason

log = logging.getLogger("vlm_sweep.tracking")

# HTTP statuses that do not mean "this request can never succeed".
_RETRYABLE_HTTP = (401, 403, 408, 429)

Item = Tuple[str, Any, int]  # (what, payload, number of metric points)


def is_permanent(err: BaseException) -> bool:
    """The store answered and refused this request (a 4xx): re-sending it would fail the same way."""
    from mlflow.exceptions import MlflowException

    if not isinstance(err, MlflowException):
        return False
    code = err.get_http_status_code()
    return 400 <= code < 500 and code not in _RETRYABLE_HTTP


class Sender:
    """One background thread sending queued items with ``send(what, payload)``."""

    def __init__(self, send: Callable[[str, Any], None], shown_uri: str, retry_every_s: float = 30.0,
                 max_points: int = 200_000) -> None:
        self._send = send
        self.shown_uri = shown_uri
        self.retry_every_s = retry_every_s
        self.max_points = max_points
        self._queue: Deque[Item] = deque()
        self._points = 0
        self._cond = threading.Condition()
        self._in_flight = False
        self._next_try = 0.0
        self._attempts = 0
        self._stop = False
        self.outage_since: Optional[float] = None
        self.dropped_points = 0
        self._warned_full = False
        self._thread = threading.Thread(target=self._run, name="vlm_sweep-tracking-sender", daemon=True)
        self._thread.start()

    # -- producer side (the training thread): never blocks -----------------------------
    def put(self, what: str, payload: Any, points: int = 0) -> None:
        with self._cond:
            self._queue.append((what, payload, points))
            self._points += points
            self._drop_oldest_metrics()
            self._cond.notify_all()

    def _drop_oldest_metrics(self) -> None:
        if self._points <= self.max_points:
            return
        kept: Deque[Item] = deque()
        for item in self._queue:
            if self._points > self.max_points and item[0] == "metrics":
                self._points -= item[2]
                self.dropped_points += item[2]
            else:
                kept.append(item)
        self._queue = kept
        if not self._warned_full:
            self._warned_full = True
            log.warning("MLflow at %s: more than %d metric points waiting; the oldest are dropped from memory "
                        "(they are in metrics.jsonl and reach MLflow when the run resumes)",
                        self.shown_uri, self.max_points)

    @property
    def pending_points(self) -> int:
        """Metric points queued or in flight (not yet delivered)."""
        with self._cond:
            return self._points

    def pending(self) -> int:
        with self._cond:
            return len(self._queue) + (1 if self._in_flight else 0)

    def wait(self, timeout_s: float, try_now: bool = False) -> bool:
        """Wait up to ``timeout_s`` until the queue is delivered; True if it is.

        ``try_now``: attempt at once even during an outage, and give up after one failure.
        """
        deadline = time.monotonic() + timeout_s
        with self._cond:
            attempts = self._attempts
            if try_now:
                self._next_try = 0.0
                self._cond.notify_all()
            while self._queue or self._in_flight:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (try_now and self.outage_since is not None and self._attempts > attempts):
                    return False
                self._cond.wait(remaining)
            return True

    def close(self, timeout_s: float) -> int:
        """Try to deliver what is queued (once more now, even during an outage), then stop.

        Returns the number of metric points left undelivered. Never waits longer than ``timeout_s``.
        """
        self.wait(timeout_s, try_now=True)
        with self._cond:
            self._stop = True
            self._cond.notify_all()
            return self._points

    # -- the thread --------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not (self._queue and time.monotonic() >= self._next_try):
                    wait = None if not self._queue else max(self._next_try - time.monotonic(), 0.01)
                    self._cond.wait(wait)
                if self._stop:
                    return
                item = self._queue.popleft()
                self._in_flight = True
            delivered = self._deliver(item)
            with self._cond:
                self._in_flight = False
                self._attempts += 1
                if delivered:
                    self._points -= item[2]
                else:
                    self._queue.appendleft(item)
                    self._next_try = time.monotonic() + self.retry_every_s
                self._cond.notify_all()

    def _deliver(self, item: Item) -> bool:
        """Send one item; False (keep it, retry later) when the store does not answer."""
        what, payload, points = item
        try:
            self._send(what, payload)
        except Exception as err:
            if is_permanent(err):
                log.warning("MLflow at %s refused a %s request (%s); it is not sent again",
                            self.shown_uri, what, one_line(err))
                return True
            if self.outage_since is None:
                self.outage_since = time.monotonic()
                log.warning("MLflow at %s does not answer (%s): training continues; metrics are kept and "
                            "sent when it answers (retrying every %g s)", self.shown_uri,
                            unreachable_reason(err, HTTP_TIMEOUT_S), self.retry_every_s)
            return False
        if self.outage_since is not None:
            log.info("MLflow at %s answers again after %.0f s; sending the kept metrics", self.shown_uri,
                     time.monotonic() - self.outage_since)
            self.outage_since = None
        return True
