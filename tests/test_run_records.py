"""A run's records stay true: refused starts change nothing, failures say FAILED everywhere,
a restart from zero starts clean, Ctrl-C checkpoints, and all-bad data stops instead of spinning."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, run_launch

FAST = ["step_scheduler.max_steps=4", "step_scheduler.val_every_steps=2", "step_scheduler.ckpt_every_steps=2",
        "dataset.max_val_samples=4", "eval=none"]


def _mlflow_status(uri: str, run_dir: Path) -> str:
    from mlflow.tracking import MlflowClient

    run_id = json.loads((run_dir / "tracking.json").read_text())["run_id"]
    return MlflowClient(uri).get_run(run_id).info.status


def _bad_custom_data(root: Path, num_rows: int) -> Path:
    """A custom JSONL whose every row names an image that does not exist."""
    root.mkdir(parents=True, exist_ok=True)
    rows = [{"messages": [
        {"role": "user", "content": [{"type": "image", "image": f"missing_{i}.png"},
                                     {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A thing."}]}]} for i in range(num_rows)]
    path = root / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.slow
def test_refused_resume_changes_no_record_and_failures_are_failed_everywhere(tmp_path, mlflow_uri):
    run_dir = tmp_path / "run"
    args = [f"hydra.run.dir={run_dir}", f"tracking.uri={mlflow_uri}", *FAST]
    proc = run_launch(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    before = {name: (run_dir / name).read_text() for name in ("config.yaml", "job_status.json", "tracking.json")}
    assert _mlflow_status(mlflow_uri, run_dir) == "FINISHED"
    # The finished job's status carries its throughput for the sweep report.
    status = json.loads(before["job_status.json"])
    assert status["tokens_per_s"] > 0 and status["tflops"] > 0 and status["device_hours"] > 0
    assert 0.5 < status["packing_efficiency"] <= 1.0  # real tokens / positions run, padded batches too
    assert status["device_type"] == "cpu" and status["mfu"] is None  # no known peak for a CPU
    assert status["compute_precision"] == "fp32"  # what auto picked for the 64-wide tiny model

    # The finished LoRA run's dir re-run with full fine-tuning: refused with one line ...
    proc = run_launch([*args, "peft=none"])
    assert proc.returncode == 2
    assert "does not fit this config" in proc.stderr and "Traceback" not in proc.stderr
    # ... and nothing of the run changed.
    after = {name: (run_dir / name).read_text() for name in before}
    assert after == before
    assert _mlflow_status(mlflow_uri, run_dir) == "FINISHED"


@pytest.mark.slow
def test_handled_error_marks_the_run_failed_in_status_and_mlflow(tmp_path, mlflow_uri):
    """A record that goes bad during training (exit 2) leaves FAILED in job_status and MLflow."""
    from vlm_sweep.data.sets import get_spec

    data = get_spec("custom").write_fixture(tmp_path / "data", num_rows=12, with_video=False)
    run_dir = tmp_path / "run"
    images = sorted(data.parent.rglob("*.png"))
    images[-1].unlink()  # one image disappears: the run fails when it reaches that record
    proc = run_launch([f"hydra.run.dir={run_dir}", f"tracking.uri={mlflow_uri}", "dataset=custom",
                       f"dataset.path={data}", "dataset.carve_val_fraction=null", "dataset.val_split=null",
                       "dataset.preflight_samples=0",
                       "step_scheduler.max_steps=20", "step_scheduler.global_batch_size=2",
                       "step_scheduler.micro_batch_size=2", "eval=none"])
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    # Raised in a DataLoader worker, reported by its own message: the record and its file line.
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "custom/train[" in errors[0] and ".jsonl:" in errors[0], proc.stderr[-2000:]
    assert json.loads((run_dir / "job_status.json").read_text())["status"] == "FAILED"
    assert _mlflow_status(mlflow_uri, run_dir) == "FAILED"


def test_a_diverged_run_fails_in_one_line_and_keeps_no_broken_checkpoint(tmp_path, mlflow_uri):
    """Full fine-tuning in fp16 weights under AdamW goes NaN at step 2 (fp16 cannot hold Adam's update):
    the run stops there, FAILED everywhere, without checkpointing NaN weights; job_status stays strict JSON."""
    run_dir = tmp_path / "run"
    proc = run_launch([f"hydra.run.dir={run_dir}", f"tracking.uri={mlflow_uri}", "model.dtype=fp16", "peft=none",
                       "optimizer.lr=1e-4", "step_scheduler.max_steps=8", "step_scheduler.log_every_steps=4",
                       "step_scheduler.ckpt_every_steps=4", "eval=none"])
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "training diverged: loss is nan at step 4" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (run_dir / "checkpoints" / "step_4").exists()
    status = json.loads((run_dir / "job_status.json").read_text(),
                        parse_constant=lambda c: pytest.fail(f"job_status.json holds {c}"))
    assert status["status"] == "FAILED" and f"error: {status['error']}" == errors[0]  # no exception type
    assert _mlflow_status(mlflow_uri, run_dir) == "FAILED"
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 4]  # the diverged step is on record


@pytest.mark.slow
def test_kill_before_first_checkpoint_then_rerun_starts_clean_records(tmp_path, mlflow_uri):
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "run"
    args = [sys.executable, str(ROOT / "launch.py"), f"hydra.run.dir={run_dir}", f"tracking.uri={mlflow_uri}",
            "step_scheduler.max_steps=12", "step_scheduler.ckpt_every_steps=100", "eval=none",
            "dataset.max_val_samples=4", "step_scheduler.val_every_steps=100", "tracking.flush_every_steps=1"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, "run ended before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first_run = json.loads((run_dir / "tracking.json").read_text())["run_id"]

    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(1, 13)), "a restart from zero must not append to the old records"
    client = MlflowClient(mlflow_uri)
    run_id = json.loads((run_dir / "tracking.json").read_text())["run_id"]
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == list(range(1, 13))
    visible = client.search_runs([client.get_run(run_id).info.experiment_id],
                                 filter_string=f"attributes.run_id = '{first_run}'")
    assert first_run == run_id or not visible, "the killed attempt is still a visible (RUNNING) run"


@pytest.mark.slow
def test_ctrl_c_checkpoints_prints_one_line_and_resumes(tmp_path, mlflow_uri):
    run_dir = tmp_path / "run"
    args = [sys.executable, str(ROOT / "launch.py"), f"hydra.run.dir={run_dir}", f"tracking.uri={mlflow_uri}",
            "step_scheduler.max_steps=400", "step_scheduler.ckpt_every_steps=1000", "eval=none",
            "dataset.max_val_samples=4", "step_scheduler.val_every_steps=1000"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, "run ended before Ctrl-C"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    status = json.loads((run_dir / "job_status.json").read_text())
    assert status["status"] == "KILLED" and f"hydra.run.dir={run_dir}" in status["error"]
    assert _mlflow_status(mlflow_uri, run_dir) == "KILLED"
    latest = (run_dir / "checkpoints" / "LATEST").read_text().strip()
    stopped_at = int(latest.split("_")[1])
    assert stopped_at == status["step"] >= 3

    # The printed resume command continues from the checkpoint.
    proc = subprocess.run([*args[:-4], "step_scheduler.max_steps=" + str(stopped_at + 2), *args[-3:]],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(1, stopped_at + 3))


@pytest.mark.slow
def test_all_bad_records_under_skip_stop_with_an_error_instead_of_spinning(tmp_path):
    data = _bad_custom_data(tmp_path / "data", num_rows=10)
    proc = run_launch([f"hydra.run.dir={tmp_path / 'run'}", "tracking=none", "dataset=custom",
                       f"dataset.path={data}", "dataset.on_bad_record=skip", "dataset.carve_val_fraction=null",
                       "dataset.val_split=null", "dataset.preflight_samples=0",
                       "eval=none", "step_scheduler.max_steps=3"], timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "0 of the 10" in errors[0] and "min_usable_fraction" in errors[0]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("override,needle", [
    ("model=tiny_gemma", "model=tiny_gemma is not an option"),
    ("dataset=custom", "dataset.path must be set"),
    ("objective_metric=eval/foo", "objective_metric"),
    ("tracking.uri=http://alice:s3cr3t-pass@127.0.0.1:5000", "MLFLOW_TRACKING_USERNAME"),
    ("outputs/other_run", "'outputs/other_run' is not a key=value override"),  # a stray path
])
def test_config_mistakes_are_one_line_before_anything_runs(override, needle, tmp_path):
    proc = run_launch([override, f"hydra.run.dir={tmp_path / 'run'}"],
                      env={"VLM_SWEEP_CACHE": str(tmp_path / "cache")}, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and needle in lines[0], proc.stderr[-2000:]
    assert "s3cr3t-pass" not in proc.stderr + proc.stdout
    assert not (tmp_path / "cache").exists(), "a model was built before the error"
    assert not (tmp_path / "run").exists() or "s3cr3t" not in "".join(
        p.read_text() for p in (tmp_path / "run").rglob("*") if p.is_file())
