"""What stops a run early, and cleanly: stop signals and a data set of (nearly) only bad records."""

from __future__ import annotations

import logging
import signal
from typing import Any, Optional

log = logging.getLogger(__name__)


class StopSignal:
    """SIGTERM/SIGUSR2 (what a cluster sends before preemption) and Ctrl-C request a checkpoint and exit.

    The first signal is honoured at the next step boundary (every rank at the same step); a
    second Ctrl-C stops at once (KeyboardInterrupt), keeping the previous checkpoint.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT)

    def __init__(self) -> None:
        self.received: Optional[int] = None
        self._previous = {}
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt
        if signum == signal.SIGINT:
            log.warning("Ctrl-C: checkpointing at the end of this step (press Ctrl-C again to stop now)")
        self.received = signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class StoppedWhileReading(RuntimeError):
    """A stop signal arrived while the loop was waiting for usable data (no step to finish)."""


class DataHealth:
    """Counts usable vs skipped training records; fails when too few are usable to train on.

    With ``on_bad_record=skip`` a data set of bad records would otherwise be skipped forever.
    Checked once at least one epoch's worth (or 200) of records has been read.
    """

    def __init__(self, num_records: int, min_usable_fraction: float, name: str) -> None:
        self.num_records = num_records
        self.min_fraction = min_usable_fraction
        self.name = name
        self.usable = 0
        self.skipped = 0

    def update(self, usable: int, skipped: int) -> None:
        self.usable += usable
        self.skipped += skipped
        seen = self.usable + self.skipped
        if seen < min(self.num_records, 200) or self.skipped == 0:
            return
        fraction = self.usable / seen
        if self.usable == 0 or fraction < self.min_fraction:
            from vlm_sweep.data.datasets import BadRecordError

            raise BadRecordError(
                f"{self.name}: only {self.usable} of the {seen} training records read so far are usable "
                f"({fraction:.0%} < dataset.min_usable_fraction={self.min_fraction}); the skipped-record "
                f"lines above say why (python -m vlm_sweep.inspect checks the whole data set)")
