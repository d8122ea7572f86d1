"""Sweep launchers: vlm_sweep's own are the ones Hydra runs, and a SLURM sweep that cannot be submitted
from here ends in one line (what went wrong, and hydra/launcher=local), not a submitit traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import ROOT, run_launch

PLUGINS = "hydra_plugins.vlm_sweep_plugins"


@pytest.mark.parametrize("launcher,target", [("local", "LocalLauncher"), ("submitit_local", "LocalLauncher"),
                                             ("slurm", "SlurmLauncher"), ("slurm_gpu", "SlurmLauncher"),
                                             ("submitit_slurm", "SlurmLauncher")])
def test_sweeps_run_vlm_sweeps_launchers(launcher, target):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.plugins import Plugins

    from vlm_sweep.config.schema import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"hydra/launcher={launcher}", "hparams_search=optuna"],
                      return_hydra_config=True)
    assert cfg.hydra.launcher._target_ == f"{PLUGINS}.{target}"
    assert cfg.hydra.sweeper._target_ == f"{PLUGINS}.OptunaSweeper"
    # Hydra instantiates plugins only from hydra_plugins.*, and only classes its scan found.
    assert {f"{PLUGINS}.{target}", f"{PLUGINS}.OptunaSweeper"} <= set(Plugins.instance().class_name_to_class)


def _sweep_without_slurm(tmp_path: Path, path_env: str, mlflow_uri: str):
    sweep = tmp_path / "sweep"
    proc = run_launch(["-m", "hydra/launcher=slurm", f"hydra.sweep.dir={sweep}", f"tracking.uri={mlflow_uri}",
                       "optimizer.lr=1e-3,2e-3", "step_scheduler.max_steps=2"], env={"PATH": path_env}, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    from mlflow.tracking import MlflowClient

    parent = json.loads((sweep / "mlflow_parent.json").read_text())
    assert MlflowClient(mlflow_uri).get_run(parent["run_id"]).info.status == "FAILED"  # not left RUNNING
    assert not [p for p in sweep.iterdir() if p.name[0].isdigit()]  # no job started
    return lines[0]


@pytest.mark.slow
def test_slurm_sweep_without_a_slurm_client_says_so_in_one_line(tmp_path, mlflow_uri):
    empty = tmp_path / "bin"
    empty.mkdir()
    line = _sweep_without_slurm(tmp_path, str(empty), mlflow_uri)
    assert line.startswith("error: SLURM is not reachable from here") and "not on PATH" in line
    assert "hydra/launcher=local" in line


@pytest.mark.slow
def test_slurm_sweep_refused_by_sbatch_quotes_its_error_in_one_line(tmp_path, mlflow_uri):
    """A SLURM client whose sbatch fails (controller down, bad partition): sbatch's own words, once."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "sbatch").write_text("#!/bin/sh\necho 'sbatch: error: Batch job submission failed: "
                                    "Unable to contact slurm controller (connect failure)' >&2\nexit 1\n")
    for tool in ("srun", "sbatch"):
        (bin_dir / tool).chmod(0o755)
    line = _sweep_without_slurm(tmp_path, f"{bin_dir}:/usr/bin:/bin", mlflow_uri)
    assert line.startswith("error: SLURM did not take the sweep: sbatch: error: Batch job submission failed: "
                           "Unable to contact slurm controller (connect failure);")
    assert "hydra/launcher=local" in line


def _parent_pid(stat: Path) -> int:
    """The parent pid from /proc/<pid>/stat (-1 if the process is gone)."""
    try:
        return int(stat.read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


@pytest.mark.slow
def test_a_killed_local_job_is_recorded_failed_and_the_sweep_reports_it(tmp_path):
    """hydra/launcher=local: a job killed mid-run (OOM killer, kill -9) is FAILED with its log, and the sweep ends."""
    import os
    import signal
    import subprocess
    import sys
    import time

    sweep = tmp_path / "sweep"
    proc = subprocess.Popen([sys.executable, str(ROOT / "launch.py"), "-m", "hydra/launcher=local",
                             f"hydra.sweep.dir={sweep}", "tracking=none", "eval=none", "step_scheduler.max_steps=100000",
                             "optimizer.lr=1e-3"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 300  # a guard against a hang, not a timing assertion
        while not (sweep / "0" / "metrics.jsonl").exists():  # the job is training
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the job did not start training"
            time.sleep(0.2)
        job_pid = int(next(sweep.glob(".submitit/*/*_0_log.out")).parent.name)  # local job id = its pid
        # The whole job, as the OOM killer or a scheduler would: its controller (the job id) and the
        # training process under it (killing the controller alone would leave that one training on).
        tasks = [int(stat.parent.name) for stat in Path("/proc").glob("[0-9]*/stat")
                 if _parent_pid(stat) == job_pid]
        for pid in [*tasks, job_pid]:
            os.kill(pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=300)
    finally:
        try:  # the sweep and its job: one process group; nothing of it may outlive the test
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    assert proc.returncode == 1
    status = json.loads((sweep / "0" / "job_status.json").read_text())
    assert status["status"] == "FAILED" and status["error"].startswith(f"job {job_pid} died: no result")
    assert status["log_path"].endswith("_0_log.err") and Path(status["log_path"]).exists()
    assert "1 of 1 jobs did not finish" in err and f"job {job_pid} died" in err and "Traceback" not in err
