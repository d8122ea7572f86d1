"""What a job knows about its place in a sweep, and the status file it leaves behind.

Every job dir gets ``job_status.json`` (written by rank 0): the sweep callback and
the report read it, and re-running a sweep skips jobs whose status is FINISHED.
"""

from __future__ import annotations

import json
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
    tokens_per_s: Optional[float] = None
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


def mean_tokens_per_s(run_dir: Path) -> Optional[float]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return None
    values = [json.loads(line).get("tokens_per_s") for line in path.read_text().splitlines()]
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def job_dirs(sweep_dir: Path) -> List[Path]:
    """Job dirs of a sweep (``<job num>`` or ``<job num>_<suffix>`` subdirs), in job order."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.exists():
        return []
    dirs = [p for p in sweep_dir.iterdir() if p.is_dir() and p.name.split("_")[0].isdigit()]
    return sorted(dirs, key=lambda p: (int(p.name.split("_")[0]), p.name))
