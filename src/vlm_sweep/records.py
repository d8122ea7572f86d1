"""What runs left on disk, read back: metrics rows, throughput, the job dirs of a sweep.

The sweep launcher (job status files) and the report read the same records through these
functions, so neither depends on the other.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional

from vlm_sweep.rundir import RunDir


def read_metrics(run_dir: Path) -> List[Dict[str, Any]]:
    """Rows of the run's metrics.jsonl; a torn last line (a kill mid-write) is passed over."""
    path = RunDir(run_dir).metrics
    rows: List[Dict[str, Any]] = []
    if not path.exists():
        return rows
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _number(value: Any) -> Optional[float]:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def _mean(rows: List[Dict[str, Any]], key: str) -> Optional[float]:
    values = [v for v in (_number(r.get(key)) for r in rows) if v is not None]
    return sum(values) / len(values) if values else None


def training_seconds(rows: List[Dict[str, Any]]) -> Optional[float]:
    """Wall time of the logged training steps, from the metrics log alone.

    Each row's tokens_per_s is the tokens of its log window (every process) over the window's
    seconds, and image_tokens + text_tokens are the same tokens (the FLOP counter's split of
    them), so seconds = tokens / tokens_per_s. Windows cover every optimizer step, not the
    validation, generation or checkpointing between them nor the start-up. A resumed run's
    log holds each step once, so the time of steps redone after a preemption is not counted.
    """
    total, seen = 0.0, False
    for row in rows:
        speed = _number(row.get("tokens_per_s"))
        tokens = [_number(row.get(k)) for k in ("image_tokens", "text_tokens")]
        if speed and speed > 0 and None not in tokens:
            total += sum(tokens) / speed  # type: ignore[arg-type]
            seen = True
    return total if seen else None


def throughput_from_rows(rows: List[Dict[str, Any]], num_processes: Optional[int],
                         wall_seconds: Optional[float] = None) -> Dict[str, Optional[float]]:
    """tokens_per_s / mfu / tflops / packing_efficiency means over the logged steps, and device_hours.

    device_hours = wall time x ``num_processes`` (None if that is unknown); the wall time is
    ``wall_seconds`` if the caller measured it, else the training time of the log.
    """
    seconds = wall_seconds if wall_seconds is not None else training_seconds(rows)
    hours = None if seconds is None or not num_processes else seconds * num_processes / 3600.0
    return {"tokens_per_s": _mean(rows, "tokens_per_s"), "mfu": _mean(rows, "mfu"),
            "tflops": _mean(rows, "tflops"), "packing_efficiency": _mean(rows, "packing_efficiency"),
            "device_hours": hours}


def throughput_summary(run_dir: Path, num_processes: int,
                       wall_seconds: Optional[float] = None) -> Dict[str, Any]:
    """The job's throughput for its status file, from its metrics.jsonl.

    The keys are JobStatus fields: ``JobStatus(..., **throughput_summary(run_dir, world_size()))``
    (``vlm_sweep.config.validate.world_size``: WORLD_SIZE or SLURM_NTASKS).
    ``device_type`` ("cuda"/"cpu") says whether the device-hours are GPU-hours.
    """
    import torch

    summary: Dict[str, Any] = throughput_from_rows(read_metrics(run_dir), max(1, num_processes), wall_seconds)
    summary["device_type"] = "cuda" if torch.cuda.is_available() else "cpu"
    return summary


def job_dirs(sweep_dir: Path) -> List[Path]:
    """Job dirs of a sweep (``<job num>`` or ``<job num>_<suffix>`` subdirs), in job order."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.exists():
        return []
    dirs = [p for p in sweep_dir.iterdir() if p.is_dir() and p.name.split("_")[0].isdigit()]
    return sorted(dirs, key=lambda p: (int(p.name.split("_")[0]), p.name))
