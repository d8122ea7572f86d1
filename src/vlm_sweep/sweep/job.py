"""What a job knows about its place in a sweep, and the status file it leaves behind.

Every job dir gets ``job_status.json`` (written by rank 0): the sweep callback and
the report read it, and re-running a sweep skips jobs whose status is FINISHED.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

STATUS_FILE = "job_status.json"
PARENT_FILE = "mlflow_parent.json"


@dataclass
class JobContext:
    """Where this Hydra job runs and which sweep (if any) it belongs to."""

    run_dir: Path
    is_multirun: bool
    job_num: int
    sweep_dir: Optional[Path]
    override_dirname: str
    overrides: List[str]
    log_path: Path
    slurm_job_id: Optional[str] = None

    @property
    def parent_run(self) -> Optional[Dict[str, str]]:
        """The sweep's MLflow parent run (written by the sweep callback), if any."""
        if self.sweep_dir is None or not (self.sweep_dir / PARENT_FILE).exists():
            return None
        return json.loads((self.sweep_dir / PARENT_FILE).read_text())


def job_context() -> JobContext:
    """Read the job's Hydra runtime (must be called inside a Hydra job)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    return JobContext(
        run_dir=run_dir,
        is_multirun=multirun,
        job_num=int(hc.job.num) if multirun else 0,
        sweep_dir=Path(hc.sweep.dir).resolve() if multirun else None,
        override_dirname=str(hc.job.override_dirname),
        overrides=list(hc.overrides.task),
        log_path=run_dir / f"{hc.job.name}.log",
        slurm_job_id=slurm_job_id(),
    )


def slurm_job_id() -> Optional[str]:
    """``<array id>_<task id>`` for array tasks (what squeue/sacct show), else the job id."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array}_{task}" if array else os.environ.get("SLURM_JOB_ID")


def export_distributed_env() -> None:
    """Under submitit with several tasks, map SLURM tasks to torch.distributed ranks (env://)."""
    try:
        import submitit

        env = submitit.JobEnvironment()
    except (ImportError, RuntimeError):  # not a submitit job
        return
    if env.num_tasks > 1 and "RANK" not in os.environ:
        from submitit.helpers import TorchDistributedEnvironment

        TorchDistributedEnvironment().export(set_cuda_visible_devices=True)


def is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


@dataclass
class JobStatus:
    status: str
    job_num: int
    override_dirname: str
    overrides: List[str]
    log_path: str
    run_dir: str
    error: Optional[str] = None
    step: Optional[int] = None
    final_loss: Optional[float] = None
    val_loss: Optional[float] = None
    metrics: Dict[str, float] = field(default_factory=dict)
    # Throughput, means over the logged steps of metrics.jsonl (see ``throughput_summary``).
    tokens_per_s: Optional[float] = None
    mfu: Optional[float] = None  # fraction of the device's dense bf16 peak (absent: peak unknown)
    tflops: Optional[float] = None  # achieved TFLOP/s per device, vision tower included
    device_hours: Optional[float] = None  # training wall time x processes (GPU-hours on GPUs)
    device_type: Optional[str] = None  # "cuda" or "cpu": whether device_hours are GPU-hours
    objective: Optional[float] = None
    mlflow_run_id: Optional[str] = None
    slurm_job_id: Optional[str] = None


def write_status(run_dir: Path, status: JobStatus) -> None:
    """Replace the job's status file atomically."""
    path = Path(run_dir) / STATUS_FILE
    tmp = path.with_name(f".{STATUS_FILE}.tmp")
    tmp.write_text(json.dumps(asdict(status), indent=2) + "\n")
    os.replace(tmp, path)


def read_status(run_dir: Path) -> Optional[Dict[str, Any]]:
    path = Path(run_dir) / STATUS_FILE
    return json.loads(path.read_text()) if path.exists() else None


def read_metrics(run_dir: Path) -> List[Dict[str, Any]]:
    """Rows of the run's metrics.jsonl; a torn last line (a kill mid-write) is passed over."""
    path = Path(run_dir) / "metrics.jsonl"
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


def mean_tokens_per_s(run_dir: Path) -> Optional[float]:
    """Mean tokens/s (all processes) over the logged steps; None if none logged it."""
    return _mean(read_metrics(run_dir), "tokens_per_s")


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
    """tokens_per_s / mfu / tflops means over the logged steps, and device_hours.

    device_hours = wall time x ``num_processes`` (None if that is unknown); the wall time is
    ``wall_seconds`` if the caller measured it, else the training time of the log.
    """
    seconds = wall_seconds if wall_seconds is not None else training_seconds(rows)
    hours = None if seconds is None or not num_processes else seconds * num_processes / 3600.0
    return {"tokens_per_s": _mean(rows, "tokens_per_s"), "mfu": _mean(rows, "mfu"),
            "tflops": _mean(rows, "tflops"), "device_hours": hours}


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
