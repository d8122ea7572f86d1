"""Reading a sweep into a ``Sweep``: from its Hydra multirun dir or from MLflow.

The sweep dir is the primary source (it exists even with tracking off); MLflow is for
sweeps whose files are elsewhere (another machine, a cluster's scratch space). Either
way each job's ``job_status.json`` (status, error, log path, overrides, throughput) is
the source of truth wherever it can be read; MLflow gives the curves and metrics, and
its run status stands in only when the job's status file is out of reach.
"""

from __future__ import annotations

import json
import logging
import os
import re
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

from vlm_sweep.rundir import SWEEP_PARENT, RunDir
from vlm_sweep.records import job_dirs as list_job_dirs
from vlm_sweep.records import read_metrics, throughput_from_rows
from vlm_sweep.report.model import (Curve, Job, Sweep, mean, parse_overrides,
                                    split_override_dirname)

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///outputs/mlflow.db"
PARENT_TAG = "mlflow.parentRunId"
MISSING_STATUS = "no job_status.json: crashed or cancelled before the end (or still running)"


class ReportError(Exception):
    """The source cannot be read as a sweep; the message says what to pass instead."""


# ------------------------------------------------------------------ sweep dir


def _read_json(path: Path) -> Optional[Dict[str, Any]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _read_yaml(path: Path) -> Any:
    import yaml

    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None


def _curve(rows: Iterable[Dict[str, Any]], key: str) -> Curve:
    """(step, value) pairs, one per step (the last logged wins), in step order."""
    points = {int(r["step"]): float(r[key]) for r in rows if isinstance(r.get(key), (int, float))}
    return sorted(points.items())


def _job_overrides(job_dir: Path, status: Dict[str, Any]) -> Dict[str, str]:
    lines = status.get("overrides")
    if not isinstance(lines, list):
        lines = _read_yaml(job_dir / ".hydra" / "overrides.yaml")
    if not isinstance(lines, list):
        lines = split_override_dirname(status.get("override_dirname") or "")
    return parse_overrides(lines)


def _override_dirname(job_dir: Path, status: Dict[str, Any], overrides: Dict[str, str]) -> str:
    if status.get("override_dirname") is not None:
        return str(status["override_dirname"])
    hydra_cfg = _read_yaml(job_dir / ".hydra" / "hydra.yaml") or {}
    dirname = ((hydra_cfg.get("hydra") or {}).get("job") or {}).get("override_dirname")
    if isinstance(dirname, str):
        return dirname
    return ",".join(sorted(f"{k}={v}" for k, v in overrides.items()))


def _find_log(job_dir: Path) -> Optional[str]:
    """The job's Hydra log (``<job name>.log``) when job_status.json does not name one."""
    logs = sorted(job_dir.glob("*.log"))
    return str(logs[0]) if logs else None


def _float(value: Any) -> Optional[float]:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


THROUGHPUT = ("tokens_per_s", "mfu", "tflops", "packing_efficiency", "device_hours")


def _throughput(status: Dict[str, Any], measured: Dict[str, Optional[float]]) -> Dict[str, Any]:
    """Each throughput value from the status file, else as measured from the job's metrics."""
    out: Dict[str, Any] = {k: _float(status.get(k)) for k in THROUGHPUT}
    out.update({k: measured.get(k) for k in THROUGHPUT if out[k] is None})
    for key in ("device_type", "compute_precision"):
        value = status.get(key)
        out[key] = value if isinstance(value, str) else None
    return out


def load_job_dir(job_dir: Path) -> Job:
    """One job from its dir: job_status.json first, metrics.jsonl and .hydra/ for the rest."""
    status = _read_json(RunDir(job_dir).job_status)
    has_status = status is not None
    status = status or {}
    rows = [r for r in read_metrics(job_dir) if isinstance(r.get("step"), (int, float))]
    overrides = _job_overrides(job_dir, status)
    evals = {k: float(v) for row in rows for k, v in row.items()
             if k.startswith("eval/") and _float(v) is not None}
    evals.update({k: float(v) for k, v in (status.get("metrics") or {}).items()
                  if k.startswith("eval/") and _float(v) is not None})
    loss_curve, val_curve = _curve(rows, "loss"), _curve(rows, "val_loss")
    tracking = _read_json(RunDir(job_dir).tracking) or {}
    # Without a status file the number of processes is unknown: no device-hours are guessed.
    measured = throughput_from_rows(rows, num_processes=None)
    job = Job(
        job_num=status["job_num"] if isinstance(status.get("job_num"), int) else int(job_dir.name.split("_")[0]),
        override_dirname=_override_dirname(job_dir, status, overrides),
        overrides=overrides,
        status=str(status.get("status") or "UNKNOWN"),
        step=status.get("step") if isinstance(status.get("step"), int) else (
            max(int(r["step"]) for r in rows) if rows else None),
        final_loss=_float(status.get("final_loss")),
        val_loss=_float(status.get("val_loss")),
        metrics=evals,
        error=status.get("error") if has_status else MISSING_STATUS,
        log_path=status.get("log_path") or _find_log(job_dir),
        loss_curve=loss_curve, val_curve=val_curve,
        mlflow_run_id=status.get("mlflow_run_id") or tracking.get("run_id"),
        **_throughput(status, measured),
    )
    if job.final_loss is None and loss_curve:
        job.final_loss = loss_curve[-1][1]
    if job.val_loss is None and val_curve:
        job.val_loss = val_curve[-1][1]
    return job


def _sweep_date(sweep_dir: Path) -> str:
    """``<date>/<time>`` from Hydra's sweep path, else when multirun.yaml was written (sweep start)."""
    day, clock = sweep_dir.parent.name, sweep_dir.name
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", day) and re.fullmatch(r"\d{2}-\d{2}-\d{2}", clock):
        return f"{day} {clock.replace('-', ':')}"
    started = sweep_dir / "multirun.yaml"
    mtime = (started if started.exists() else sweep_dir).stat().st_mtime
    return datetime.fromtimestamp(mtime).strftime("%Y-%m-%d %H:%M:%S")


def _display_path(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def load_sweep_dir(sweep_dir: Path, tracking_uri: Optional[str] = None) -> Sweep:
    """A Hydra multirun dir: one numbered subdir per job, mlflow_parent.json if tracked."""
    sweep_dir = Path(sweep_dir)
    job_dirs = list_job_dirs(sweep_dir)
    if not job_dirs:
        raise ReportError(f"{sweep_dir} has no job dirs (0/, 1/, ...): is it a Hydra multirun dir?")
    parent = _read_json(sweep_dir / SWEEP_PARENT) or {}
    parts = sweep_dir.resolve().parts
    title = parts[-4] if len(parts) >= 4 and parts[-3] == "multirun" else sweep_dir.resolve().name
    return Sweep(title=title, source=f"sweep dir `{_display_path(sweep_dir)}`",
                 date=_sweep_date(sweep_dir), jobs=[load_job_dir(d) for d in job_dirs],
                 sweep_dir=str(sweep_dir), parent_run_id=parent.get("run_id"),
                 tracking_uri=tracking_uri or parent.get("uri"))


# ------------------------------------------------------------------ MLflow


def resolve_tracking_uri(tracking_uri: Optional[str]) -> str:
    """--tracking-uri, else $MLFLOW_TRACKING_URI, else the project's default SQLite store."""
    return tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def mlflow_client(uri: str) -> Any:
    """A client for an existing store (a missing SQLite file is an error, not a new empty store)."""
    from mlflow.tracking import MlflowClient

    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():
        # MlflowClient would silently create an empty store here.
        raise ReportError(f"no MLflow store at {uri}: pass --tracking-uri or set MLFLOW_TRACKING_URI")
    return MlflowClient(uri)


def _experiment(client: Any, name_or_id: str) -> Any:
    experiment = client.get_experiment_by_name(name_or_id)
    if experiment is None and name_or_id.isdigit():
        try:
            experiment = client.get_experiment(name_or_id)
        except Exception:  # MlflowException: no such id
            experiment = None
    if experiment is None:
        known = ", ".join(sorted(e.name for e in client.search_experiments())) or "none"
        raise ReportError(f"no sweep dir or MLflow experiment named {name_or_id!r} (experiments: {known})")
    return experiment


def _all_runs(client: Any, experiment_id: str, filter_string: str = "") -> List[Any]:
    runs: List[Any] = []
    token = None
    while True:
        page = client.search_runs([experiment_id], filter_string=filter_string, max_results=1000,
                                  order_by=["attributes.start_time DESC"], page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


def _history(client: Any, run_id: str, key: str) -> Curve:
    points = sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
    return sorted({int(m.step): float(m.value) for m in points}.items())


def _status_of_run(tags: Dict[str, str], job_num: int, run_id: str) -> Dict[str, Any]:
    """The job's job_status.json, found through the sweep dir the job tagged its run with; {} if out of reach."""
    sweep_dir = tags.get("vlm_sweep.sweep_dir")
    if not sweep_dir:
        return {}
    statuses = [_read_json(RunDir(d).job_status) for d in list_job_dirs(Path(sweep_dir))
                if d.name.split("_")[0] == str(job_num)]
    statuses = [s for s in statuses if s]
    # Several dirs with this number (``<num>_<suffix>``): the one that names this run.
    return next((s for s in statuses if s.get("mlflow_run_id") == run_id), statuses[0] if statuses else {})


def _job_from_run(client: Any, run: Any, index: int) -> Job:
    """One child run as a Job: curves and metrics from MLflow; status, error, log path, overrides and
    throughput from the job's status file when it can be read (run status and metric means if not)."""
    tags, data, run_id = run.data.tags, run.data.metrics, run.info.run_id
    job_num = int(tags["vlm_sweep.job_num"]) if str(tags.get("vlm_sweep.job_num", "")).isdigit() else index
    name = run.info.run_name or tags.get("mlflow.runName") or ""
    status = _status_of_run(tags, job_num, run_id)
    lines = status.get("overrides")
    if not isinstance(lines, list):
        lines = split_override_dirname(name)
    loss, val = _history(client, run_id, "loss"), _history(client, run_id, "val_loss")
    measured = {k: mean([v for _, v in _history(client, run_id, k)])
                for k in ("tokens_per_s", "mfu", "tflops", "packing_efficiency")}
    throughput = _throughput(status, measured)
    throughput["compute_precision"] = throughput["compute_precision"] or run.data.params.get("compute_precision")
    return Job(job_num=job_num, override_dirname=name, overrides=parse_overrides(lines),
               status=str(status.get("status") or run.info.status),
               step=loss[-1][0] if loss else None, final_loss=loss[-1][1] if loss else None,
               val_loss=val[-1][1] if val else None,
               metrics={k: float(v) for k, v in data.items() if k.startswith("eval/")},
               error=status.get("error"), log_path=status.get("log_path"),
               loss_curve=loss, val_curve=val, mlflow_run_id=run_id, **throughput)


def load_mlflow(experiment: Optional[str], tracking_uri: Optional[str] = None,
                parent_run_id: Optional[str] = None) -> Sweep:
    """The given parent run, or the most recent run of ``experiment`` that has child runs."""
    uri = resolve_tracking_uri(tracking_uri)
    try:
        client = mlflow_client(uri)
    except ReportError as err:
        raise ReportError(f"{experiment!r} is not a sweep dir, and {err}") if experiment else err
    if parent_run_id:
        try:
            parent = client.get_run(parent_run_id)
        except Exception as err:  # MlflowException: unknown run id
            raise ReportError(f"no MLflow run {parent_run_id} at {uri}: {err}") from err
        exp = client.get_experiment(parent.info.experiment_id)
        children = _all_runs(client, exp.experiment_id, f"tags.`{PARENT_TAG}` = '{parent_run_id}'")
    else:
        if not experiment:
            raise ReportError("give a sweep dir, an MLflow experiment name/id, or a parent run id")
        exp = _experiment(client, experiment)
        runs = _all_runs(client, exp.experiment_id)
        by_parent: Dict[str, List[Any]] = {}
        for run in runs:
            if PARENT_TAG in run.data.tags:
                by_parent.setdefault(run.data.tags[PARENT_TAG], []).append(run)
        parents = [r for r in runs if PARENT_TAG not in r.data.tags and r.info.run_id in by_parent]
        if not parents:
            raise ReportError(f"experiment {exp.name!r} has no sweep: no run with child runs")
        parent = parents[0]  # runs come newest first
        children = by_parent[parent.info.run_id]
    children = sorted(children, key=lambda r: r.info.start_time or 0)
    jobs = sorted((_job_from_run(client, run, i) for i, run in enumerate(children)),
                  key=lambda j: j.job_num)
    sweep_dirs = [r.data.tags.get("vlm_sweep.sweep_dir") for r in children]
    started = parent.info.start_time
    return Sweep(title=exp.name,
                 source=f"MLflow experiment `{exp.name}` (id {exp.experiment_id}), "
                        f"parent run `{parent.info.run_id}` at `{uri}`",
                 date=datetime.fromtimestamp(started / 1000).strftime("%Y-%m-%d %H:%M:%S") if started else "n/a",
                 jobs=jobs, from_mlflow=True, sweep_dir=next((d for d in sweep_dirs if d), None),
                 parent_run_id=parent.info.run_id, tracking_uri=uri)


def load_sweep(source: "str | Path", tracking_uri: Optional[str] = None,
               parent_run_id: Optional[str] = None) -> Sweep:
    """A sweep dir if ``source`` is a directory, else an MLflow experiment name or id."""
    if source and Path(source).is_dir():
        return load_sweep_dir(Path(source), tracking_uri)
    return load_mlflow(str(source) if source else None, tracking_uri, parent_run_id)
