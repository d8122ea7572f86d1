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

from vlm_sweep.rundir import SWEEP_PARENT, RunDir, atomic_write


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
        if self.sweep_dir is None or not (self.sweep_dir / SWEEP_PARENT).exists():
            return None
        return json.loads((self.sweep_dir / SWEEP_PARENT).read_text())


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
        log_path=RunDir(run_dir).log(hc.job.name),
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
    packing_efficiency: Optional[float] = None  # real tokens / positions run (padding is the rest)
    device_hours: Optional[float] = None  # training wall time x processes (GPU-hours on GPUs)
    device_type: Optional[str] = None  # "cuda" or "cpu": whether device_hours are GPU-hours
    compute_precision: Optional[str] = None  # fp32 | bf16 | fp16 (what parallel.mixed_precision=auto picked)
    objective: Optional[float] = None
    mlflow_run_id: Optional[str] = None
    slurm_job_id: Optional[str] = None


def write_status(run_dir: Path, status: JobStatus) -> None:
    """Replace the job's status file atomically."""
    atomic_write(RunDir(run_dir).job_status, json.dumps(_finite(asdict(status)), indent=2) + "\n")


def _finite(value: Any) -> Any:
    """NaN and infinities as null: the status file stays strict JSON (readable by any tool)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def read_status(run_dir: Path) -> Optional[Dict[str, Any]]:
    path = RunDir(run_dir).job_status
    return json.loads(path.read_text()) if path.exists() else None
