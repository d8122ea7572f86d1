"""The printed tables and the pass/fail checks of ``make bench``."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from bench.rounds import Outcome


@dataclass
class Check:
    name: str
    value: Optional[float]  # None: could not be measured (then it fails)
    target: float
    unit: str = "x"
    note: str = ""
    at_most: bool = False  # the value must be <= target (else >=)

    @property
    def ok(self) -> bool:
        if self.value is None or math.isnan(self.value):
            return False
        return self.value <= self.target if self.at_most else self.value >= self.target

    def line(self, enforced: bool) -> str:
        value = "n/a" if self.value is None else f"{self.value:.3g}" if self.at_most else f"{self.value:.3f}{self.unit}"
        verdict = "ok" if self.ok else ("MISSED" if enforced else "missed (not enforced)")
        note = f"  ({self.note})" if self.note else ""
        target = f"{'<=' if self.at_most else '>='} {self.target:g}{self.unit}"
        return f"  {self.name:<58}{value:>9}  target {target:<10}{verdict}{note}"


def paired_ratio(a: Outcome, b: Outcome) -> float:
    """Median over rounds of a's tokens/s divided by b's in the same round."""
    pairs = [x / y for x, y in zip(a.rates, b.rates) if y > 0]
    return statistics.median(pairs) if pairs else float("nan")


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def throughput_table(size: str, outcomes: Sequence[Outcome]) -> List[str]:
    """One row per loop; '(a)/this' is the median over rounds of the same-round ratio."""
    real = outcomes[0]
    lines = []
    for o in outcomes:
        if o.error:
            lines.append(f"{size:<6}{o.spec.label:<40}failed: {o.error.splitlines()[0]}")
            continue
        rates = o.rates
        cpu_all = _median([1e6 * r["cpu_seconds"] / r["tokens"] for r in o.rounds])
        cpu_main = _median([1e6 * r["main_cpu_seconds"] / r["tokens"] for r in o.rounds])
        ratio = "" if o is real else f"{paired_ratio(real, o):.3f}x"
        span = f"{min(rates):.0f}-{max(rates):.0f}"
        lines.append(f"{size:<6}{o.spec.label:<40}{o.median:>8.0f}{span:>13}{ratio:>10}{cpu_all:>9.0f}{cpu_main:>8.0f}")
    tokens = {o.spec.label: [r["tokens"] for r in o.rounds] for o in outcomes if not o.error}
    if len({tuple(t) for t in tokens.values()}) > 1:
        lines.append(f"{'':<6}WARNING: the loops trained on different tokens per round: {tokens}")
    losses = [f"{o.spec.label.split(')')[0]}) {o.first_loss:.6f}" for o in outcomes if o.first_loss is not None]
    if losses:
        lines.append(f"{'':<6}first-step loss (same model, LoRA and batches): {', '.join(losses)}")
    return lines


def throughput_header(rounds: Dict[str, Tuple[int, int]]) -> List[str]:
    shape = "; ".join(f"{size}: {n} rounds x {steps} optimizer steps" for size, (n, steps) in rounds.items())
    return ["Training throughput (real tokens/s, higher is better), interleaved rounds " + f"({shape})",
            f"{'size':<6}{'loop':<40}{'median':>8}{'range':>13}{'(a)/this':>10}{'CPU us/token':>17}",
            f"{'':<6}{'':<40}{'tok/s':>8}{'':>13}{'':>10}{'all':>9}{'main':>8}"]


def memory_table(title: str, rows: Dict[str, Dict[str, object]]) -> List[str]:
    lines = [title, f"{'':<4}{'variant':<52}{'before':>9}{'peak':>9}{'step':>9}{'time s':>8}"]
    for name, m in rows.items():
        if "error" in m:
            lines.append(f"{'':<4}{name:<52}failed: {m['error']}")
        else:
            lines.append(f"{'':<4}{name:<52}{m['baseline_mib']:>9.0f}{m['peak_mib']:>9.0f}{m['step_mib']:>9.0f}"
                         f"{m['seconds']:>8.1f}")
    return lines
