"""The printed tables and the pass/fail checks of ``make bench``."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

from bench.rounds import Outcome


@dataclass
class Check:
    name: str
    value: Optional[float]  # None: could not be measured (then it fails)
    target: float
    unit: str = "x"
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.value is not None and not math.isnan(self.value) and self.value >= self.target

    def line(self, enforced: bool) -> str:
        value = "n/a" if self.value is None else f"{self.value:.3f}{self.unit}"
        verdict = "ok" if self.ok else ("MISSED" if enforced else "missed (not enforced: --quick)")
        note = f"  ({self.note})" if self.note else ""
        return f"  {self.name:<52}{value:>10}   target >= {self.target:g}{self.unit}   {verdict}{note}"


def paired_ratio(a: Outcome, b: Outcome) -> float:
    """Median over rounds of a's tokens/s divided by b's in the same round."""
    pairs = [x / y for x, y in zip(a.rates, b.rates) if y > 0]
    return statistics.median(pairs) if pairs else float("nan")


def throughput_table(size: str, outcomes: Sequence[Outcome], steps: int) -> List[str]:
    real = outcomes[0]
    lines = []
    for o in outcomes:
        if o.error:
            lines.append(f"{size:<6}{o.spec.label:<36}{'failed: ' + o.error.splitlines()[0]}")
            continue
        rates = o.rates
        cpu = statistics.median(1000 * r["cpu_seconds"] / r["tokens"] for r in o.rounds)
        ratio = "" if o is real else f"{paired_ratio(real, o):.3f}x"
        lines.append(f"{size:<6}{o.spec.label:<36}{o.median:>9.0f}{min(rates):>8.0f}-{max(rates):<8.0f}"
                     f"{ratio:>9}{cpu:>12.3f}")
    tokens = {o.spec.label: [r["tokens"] for r in o.rounds] for o in outcomes if not o.error}
    if len({tuple(t) for t in tokens.values()}) > 1:
        lines.append(f"{'':<6}WARNING: the variants trained on different tokens per round: {tokens}")
    losses = {o.spec.label: o.first_loss for o in outcomes if o.first_loss is not None}
    if losses:
        shown = ", ".join(f"{k.split(')')[0]}) {v:.6f}" for k, v in losses.items())
        lines.append(f"{'':<6}first-step loss (same model, LoRA and batches): {shown}")
    return lines


def throughput_header(rounds: int, steps: int) -> List[str]:
    return [f"Training throughput: real tokens/s, median of {rounds} interleaved rounds of {steps} optimizer "
            f"steps (higher is better)",
            f"{'size':<6}{'loop':<36}{'tok/s':>9}{'range':>9}{'':8}{'(a)/this':>9}{'CPU-ms/tok':>12}"]


def memory_table(rows: Dict[str, Dict[str, float]]) -> List[str]:
    lines = ["Peak host memory (MiB; one fresh process per row; 'step' = high-water mark during the step "
             "minus RSS before it)",
             f"{'measurement':<58}{'before':>9}{'peak':>9}{'step':>9}{'time s':>8}"]
    for name, m in rows.items():
        if "error" in m:
            lines.append(f"{name:<58}failed: {m['error']}")
        else:
            lines.append(f"{name:<58}{m['baseline_mib']:>9.0f}{m['peak_mib']:>9.0f}{m['step_mib']:>9.0f}"
                         f"{m['seconds']:>8.1f}")
    return lines
