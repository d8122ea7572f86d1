"""What a sweep report is made of, independent of where it was read from.

Both sources (a Hydra sweep dir, an MLflow parent run) are turned into a ``Sweep``
so the table, the plots and the best-job choice are computed once, the same way.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

Curve = List[Tuple[int, float]]

# Metrics that have their own table column; everything else named eval/... gets one each.
BASE_METRICS = {"loss": "final_loss", "final_loss": "final_loss", "val_loss": "val_loss",
                "tokens_per_s": "tokens_per_s", "mfu": "mfu", "tflops": "tflops",
                "packing_efficiency": "packing_efficiency",
                "device_hours": "device_hours", "step": "step", "steps": "step"}


@dataclass
class Job:
    """One job of the sweep, with whatever is known about it (a crashed job may know little)."""

    job_num: int
    override_dirname: str = ""
    overrides: Dict[str, str] = field(default_factory=dict)  # key -> value as typed
    status: str = "UNKNOWN"
    step: Optional[int] = None
    final_loss: Optional[float] = None
    val_loss: Optional[float] = None
    metrics: Dict[str, float] = field(default_factory=dict)  # eval/... -> last value
    # Throughput (job_status.json; means over the logged steps of metrics.jsonl).
    tokens_per_s: Optional[float] = None  # all processes together
    mfu: Optional[float] = None  # fraction of the device peak, vision tower included
    tflops: Optional[float] = None  # achieved TFLOP/s per device
    packing_efficiency: Optional[float] = None  # real tokens / positions run (dataset.packing raises it)
    device_hours: Optional[float] = None  # wall time x processes
    device_type: Optional[str] = None  # "cuda": the device-hours are GPU-hours
    compute_precision: Optional[str] = None  # fp32 | bf16 | fp16, as the job ran (auto resolved)
    error: Optional[str] = None
    log_path: Optional[str] = None
    loss_curve: Curve = field(default_factory=list)
    val_curve: Curve = field(default_factory=list)
    mlflow_run_id: Optional[str] = None

    @property
    def label(self) -> str:
        return self.override_dirname or f"job {self.job_num}"

    def value(self, metric: str) -> Optional[float]:
        """The job's value of a ranking metric: a base column or an eval metric (``eval/`` optional)."""
        attr = BASE_METRICS.get(metric)
        if attr is not None:
            raw = getattr(self, attr)
        else:
            raw = self.metrics.get(metric, self.metrics.get(f"eval/{metric}"))
        if raw is None or not math.isfinite(float(raw)):
            return None
        return float(raw)


@dataclass
class Sweep:
    """All jobs of one sweep plus where they came from."""

    title: str                      # experiment name (or the sweep dir's name)
    source: str                     # human description: the dir, or experiment + parent run
    date: str
    jobs: List[Job]
    from_mlflow: bool = False       # read from MLflow (the report then goes to ./report_<parent>)
    sweep_dir: Optional[str] = None
    parent_run_id: Optional[str] = None
    tracking_uri: Optional[str] = None

    def varying_keys(self) -> List[str]:
        """Override keys whose value differs between jobs (all of them for a single job)."""
        keys: List[str] = []
        for job in self.jobs:
            keys += [k for k in job.overrides if k not in keys]
        if len(self.jobs) <= 1:
            return keys
        return [k for k in keys if len({job.overrides.get(k) for job in self.jobs}) > 1]

    def fixed_overrides(self) -> Dict[str, str]:
        """Overrides every job shares: worth a header line, not a column.

        Keys Hydra leaves out of ``override_dirname`` (tracking.uri, ...) are left out here too.
        """
        if len(self.jobs) <= 1:
            return {}
        varying = set(self.varying_keys())
        first = self.jobs[0]
        named = {_key(p) for p in split_override_dirname(first.override_dirname)}
        return {k: v for k, v in first.overrides.items()
                if k not in varying and (k in named or not first.override_dirname)}

    def short_label(self, job: Job) -> str:
        """The job's override dirname without the overrides every job shares."""
        fixed = self.fixed_overrides()
        pieces = [p for p in split_override_dirname(job.override_dirname) if _key(p) not in fixed]
        return ",".join(pieces) or job.label

    def eval_metrics(self) -> List[str]:
        """Every eval metric any job reports, sorted for a stable column order."""
        return sorted({k for job in self.jobs for k in job.metrics})

    def hours_label(self) -> str:
        """"GPU-hours" when every job that reports device-hours ran on GPUs, else "device-hours"."""
        types = {job.device_type for job in self.jobs if job.device_hours is not None}
        return "GPU-hours" if types == {"cuda"} else "device-hours"

    def status_counts(self) -> Dict[str, int]:
        return dict(Counter(job.status for job in self.jobs))


def best_job(jobs: Sequence[Job], metric: str, mode: str) -> Optional[Job]:
    """The finished job with the best ``metric`` (ties: lowest job number), None if none has it."""
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
    scored = [(job.value(metric), job.job_num, job) for job in jobs
              if job.status == "FINISHED" and job.value(metric) is not None]
    if not scored:
        return None
    sign = 1.0 if mode == "min" else -1.0
    return min(scored, key=lambda t: (sign * t[0], t[1]))[2]


def split_override_dirname(dirname: str) -> List[str]:
    """Hydra's ``override_dirname`` back into override strings.

    Hydra joins the sorted override lines with ','; a value may itself hold commas inside
    brackets or quotes (``a=[1,2]``), and a piece without '=' continues the previous value.
    """
    pieces, depth, quote, current = [], 0, "", ""
    for ch in dirname:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth = max(0, depth - 1)
        elif ch == "," and depth == 0:
            pieces.append(current)
            current = ""
            continue
        current += ch
    pieces.append(current)
    out: List[str] = []
    for piece in pieces:
        if "=" not in piece and out:
            out[-1] += "," + piece
        elif piece:
            out.append(piece)
    return out


def _key(override: str) -> str:
    return override.partition("=")[0].strip().lstrip("+~")


def parse_overrides(lines: Sequence[str]) -> Dict[str, str]:
    """{"optimizer.lr": "1e-3", "peft": "lora"} from Hydra override strings.

    ``+``/``++``/``~`` are kept off the key; Hydra's escapes (``sqlite\\:///``) off the value.
    """
    out: Dict[str, str] = {}
    for line in lines:
        _, sep, value = str(line).strip().partition("=")
        key = _key(str(line))
        if key:
            out[key] = re.sub(r"\\(.)", r"\1", value) if sep else "<deleted>"
    return out


def mean(values: Sequence[float]) -> Optional[float]:
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return sum(finite) / len(finite) if finite else None
