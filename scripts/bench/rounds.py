"""Parent side of the throughput comparison: start one process per variant, interleave timed rounds.

Every variant warms up in its own process; then round r runs N optimizer steps of A, then of B,
C, D, and so on for every round. Only one variant computes at a time (the others wait on a pipe),
and a slow patch of machine time hits one round of every variant instead of all rounds of one,
so per-round ratios and medians are comparable on a noisy shared machine.
"""

from __future__ import annotations

import json
import os
import select
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from bench.common import PREFIX

WORKER = Path(__file__).resolve().with_name("throughput.py")
SETUP_TIMEOUT_S = 600
ROUND_TIMEOUT_S = 300


class WorkerError(RuntimeError):
    """A variant's process failed; the message carries the tail of its log."""


@dataclass
class Spec:
    label: str  # as printed in the table
    variant: str  # real | bare | hf | trl
    overrides: Sequence[str] = ()
    tag: str = ""  # tells apart the logs of specs of one variant (e.g. packed / unpacked)


@dataclass
class Outcome:
    spec: Spec
    rounds: List[Dict[str, float]] = field(default_factory=list)  # seconds, tokens per round
    first_loss: Optional[float] = None
    error: Optional[str] = None

    @property
    def rates(self) -> List[float]:
        return [r["tokens"] / r["seconds"] for r in self.rounds]

    @property
    def median(self) -> float:
        return statistics.median(self.rates) if self.rounds else float("nan")


class Worker:
    def __init__(self, spec: Spec, size: str, warmup: int, steps: int, rounds: int, log_path: Path,
                 profile: Optional[Path] = None) -> None:
        self.spec, self.log_path = spec, log_path
        self._log = open(log_path, "w")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **({"BENCH_PROFILE": str(profile)} if profile else {})}
        cmd = [sys.executable, str(WORKER), spec.variant, size, str(warmup), str(steps), str(rounds), *spec.overrides]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                     text=True, bufsize=1, env=env)

    def recv(self, timeout: float) -> Dict[str, object]:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                raise WorkerError(f"{self.spec.label}: no answer in {timeout:.0f} s{self._tail()}")
            line = self.proc.stdout.readline()
            if not line:
                self.proc.wait()
                raise WorkerError(f"{self.spec.label}: exited with {self.proc.returncode}{self._tail()}")
            if line.startswith(PREFIX):
                return json.loads(line[len(PREFIX):])

    def send(self, command: str) -> None:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def _tail(self) -> str:
        self._log.flush()
        lines = [ln for ln in self.log_path.read_text(errors="replace").splitlines() if ln.strip()]
        return (":\n    " + "\n    ".join(lines[-6:])) if lines else ""


def interleave(specs: Sequence[Spec], size: str, *, warmup: int, steps: int, rounds: int,
               log_dir: Path, required: Sequence[str] = ("real", "bare"), profile: bool = False,
               progress: Callable[[int], None] = lambda done: None) -> List[Outcome]:
    """Run every spec for ``rounds`` rounds of ``steps`` optimizer steps, A B C D, A B C D, ...

    A variant that fails is reported with its error (and left out of later rounds), unless it is
    one of ``required``, which stops the comparison. ``profile``: cProfile the real loop's rounds.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    outcomes = [Outcome(s) for s in specs]
    workers = [Worker(s, size, warmup, steps, rounds, log_dir / f"{size}-{s.variant}{s.tag}.log",
                      log_dir / f"{size}-{s.variant}{s.tag}.prof" if profile and s.variant == "real" else None)
               for s in specs]
    live: Dict[int, Worker] = {}
    try:
        for i, (worker, outcome) in enumerate(zip(workers, outcomes)):
            try:
                outcome.first_loss = worker.recv(SETUP_TIMEOUT_S).get("first_loss")
                live[i] = worker
            except WorkerError as err:
                _failed(outcome, err, required)
        for done in range(1, rounds + 1):
            for i, worker in list(live.items()):
                try:
                    worker.send("run")
                    outcomes[i].rounds.append(worker.recv(ROUND_TIMEOUT_S))
                except WorkerError as err:
                    del live[i]
                    _failed(outcomes[i], err, required)
            progress(done)
        for worker in live.values():
            worker.recv(ROUND_TIMEOUT_S)  # "done": the loop ended cleanly
    finally:
        for worker in workers:
            worker.close()
    return outcomes


def _failed(outcome: Outcome, err: WorkerError, required: Sequence[str]) -> None:
    if outcome.spec.variant in required:
        raise err
    outcome.error = str(err)
