"""A killed-and-resumed run equals an uninterrupted one; checkpoints survive crashes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, compose, run_launch

# LoRA dropout makes the result depend on the restored RNG state, not just on the weights.
COMMON = ["step_scheduler.max_steps=40", "step_scheduler.ckpt_every_steps=10", "step_scheduler.val_every_steps=10",
          "peft.dropout=0.1", "eval=none", "dataset.max_val_samples=4", "checkpoint.keep_last=5"]


def _launch_args(run_dir: Path, mlflow_uri: str, extra: tuple = ()) -> list:
    return [str(ROOT / "launch.py"), f"hydra.run.dir={run_dir}", f"tracking.uri={mlflow_uri}", *COMMON, *extra]


def _metrics(run_dir: Path) -> list:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _final_weights(run_dir: Path) -> dict:
    from vlm_sweep.training.checkpoint import trained_weights

    return trained_weights(run_dir / "checkpoints" / "step_40")


def _processes_naming(path: Path) -> list:
    """PIDs whose command line names ``path`` (a run's own processes and their workers)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and str(path) in (entry / "cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def _wait_for(predicate, timeout: float = 120.0, proc=None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended early: {proc.stderr.read()[-2000:]}")
        time.sleep(0.02)
    raise AssertionError("timed out")


@pytest.mark.slow
@pytest.mark.parametrize("extra", [(), ("dataset.packing=true",)], ids=["padded", "packed"])
def test_sigkill_then_rerun_equals_uninterrupted_run(tmp_path, mlflow_uri, extra):
    from mlflow.tracking import MlflowClient

    straight = tmp_path / "straight"
    proc = run_launch(_launch_args(straight, mlflow_uri, extra)[1:])
    assert proc.returncode == 0, proc.stderr[-3000:]

    resumed = tmp_path / "resumed"
    args = [sys.executable, *_launch_args(resumed, mlflow_uri, extra)]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    latest = resumed / "checkpoints" / "LATEST"
    _wait_for(lambda: latest.exists(), proc=proc)
    proc.send_signal(signal.SIGKILL)  # no chance to clean up, like a node failure
    proc.wait()
    # Its data-loading workers end with it (none is left waiting on a pipe nobody reads).
    _wait_for(lambda: not _processes_naming(resumed), timeout=60)
    killed_at = int(latest.read_text().strip().split("_")[1])
    assert killed_at < 40 and not (resumed / "checkpoints" / "step_40").exists()

    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)  # the same command
    assert proc.returncode == 0, proc.stderr[-3000:]

    a, b = _final_weights(straight), _final_weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "weights differ bitwise"
    rows_a, rows_b = _metrics(straight), _metrics(resumed)
    assert [r["step"] for r in rows_b] == list(range(1, 41))
    assert [r["loss"] for r in rows_a] == [r["loss"] for r in rows_b]
    assert [r.get("val_loss") for r in rows_a] == [r.get("val_loss") for r in rows_b]
    if extra:  # really packed: one row per micro-batch, no padding
        assert all(r["packing_efficiency"] == 1.0 for r in rows_b)

    # One MLflow run, one continuous curve, no step twice.
    run_id = json.loads((resumed / "tracking.json").read_text())["run_id"]
    client = MlflowClient(mlflow_uri)
    steps = [m.step for m in client.get_metric_history(run_id, "loss")]
    assert sorted(steps) == list(range(1, 41))
    assert client.get_run(run_id).info.status == "FINISHED"


DRIVER = textwrap.dedent('''
    import os, runpy, signal, sys
    from pathlib import Path
    import vlm_sweep.training.checkpoint as ckpt
    original = ckpt.save_model_dir
    def crashing(model, processor, out, *args, **kwargs):
        if "step_20" in str(out):
            Path(out).mkdir(parents=True, exist_ok=True)
            (Path(out) / "partial.bin").write_bytes(b"half written")
            os.kill(os.getpid(), signal.SIGKILL)
        return original(model, processor, out, *args, **kwargs)
    ckpt.save_model_dir = crashing
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
''')


@pytest.mark.slow
def test_kill_during_checkpoint_write_leaves_previous_valid(tmp_path, mlflow_uri):
    run_dir = tmp_path / "run"
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    proc = subprocess.run([sys.executable, str(driver), *_launch_args(run_dir, mlflow_uri)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL
    root = run_dir / "checkpoints"
    assert (root / "LATEST").read_text().strip() == "step_10"
    assert (root / ".tmp_step_20").exists() and not (root / "step_20").exists()
    assert (root / "step_10" / "training_state" / "trainer_state.json").exists()

    proc = run_launch(_launch_args(run_dir, mlflow_uri)[1:])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout + proc.stderr
    assert (root / "LATEST").read_text().strip() == "step_40"
    assert not (root / ".tmp_step_20").exists()


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR2])
def test_preemption_signal_checkpoints_before_exit(tmp_path, mlflow_uri, sig):
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "run"
    args = [sys.executable, *_launch_args(run_dir, mlflow_uri), "step_scheduler.max_steps=400",
            "step_scheduler.ckpt_every_steps=1000"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = run_dir / "metrics.jsonl"
    _wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3, proc=proc)
    proc.send_signal(sig)
    assert proc.wait(timeout=120) == -sig  # ends as if killed by the signal, after checkpointing
    last_step = _metrics(run_dir)[-1]["step"]
    assert (run_dir / "checkpoints" / "LATEST").read_text().strip() == f"step_{last_step}"
    run_id = json.loads((run_dir / "tracking.json").read_text())["run_id"]
    assert MlflowClient(mlflow_uri).get_run(run_id).info.status == "KILLED"


def test_incompatible_checkpoint_gives_clear_error(tmp_path):
    base = [f"hydra.run.dir={tmp_path}", "tracking=none", "eval=none", "step_scheduler.max_steps=2",
            "dataset.val_split=null"]
    assert run_launch(base).returncode == 0
    # Other trainable names (peft=none), the same names with other shapes (LoRA rank, another model family).
    for change in (["peft=none"], ["peft.dim=16"], ["model=tiny_qwen2_5_vl"]):
        proc = run_launch(base + [*change, "step_scheduler.max_steps=4"])
        assert proc.returncode == 2, (change, proc.stderr[-2000:])
        errors = [line for line in proc.stderr.splitlines() if "does not fit this config" in line]
        assert len(errors) == 1 and "Traceback" not in proc.stderr, (change, proc.stderr[-2000:])


def test_explicit_resume_path_continues_from_that_checkpoint(tmp_path):
    first = tmp_path / "first"
    base = ["tracking=none", "eval=none", "dataset.val_split=null", "step_scheduler.ckpt_every_steps=2"]
    assert run_launch([f"hydra.run.dir={first}", "step_scheduler.max_steps=4", *base]).returncode == 0
    second = tmp_path / "second"
    proc = run_launch([f"hydra.run.dir={second}", "step_scheduler.max_steps=6", *base,
                       f"checkpoint.resume={first / 'checkpoints' / 'step_2'}"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [r["step"] for r in _metrics(second)] == [3, 4, 5, 6]
    assert os.path.exists(second / "checkpoints" / "step_6")


def test_resume_none_over_an_earlier_run_is_refused_and_changes_nothing(tmp_path):
    """A fresh start in a run dir with complete checkpoints would cut the earlier run's metrics and let
    keep_last delete the new checkpoints first: refused in one line, the earlier run left as it was."""
    base = [f"hydra.run.dir={tmp_path}", "tracking=none", "eval=none", "dataset.val_split=null",
            "step_scheduler.max_steps=4", "step_scheduler.ckpt_every_steps=2"]
    assert run_launch(base).returncode == 0
    records = lambda: {p: p.read_bytes() for p in tmp_path.rglob("*")  # noqa: E731 (Hydra's own .hydra/ aside)
                       if p.is_file() and p.suffix != ".log" and ".hydra" not in p.parts}
    before = records()
    proc = run_launch(base + ["checkpoint.resume=none"])
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "checkpoint.resume=none" in errors[0] and "step_4" in errors[0], proc.stderr[-2000:]
    assert records() == before


def test_a_missing_resume_path_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    import vlm_sweep.models.load as load
    from vlm_sweep.errors import CheckpointError
    from vlm_sweep.train import run

    def too_late(*args, **kwargs):
        raise AssertionError("the model was loaded before checkpoint.resume was checked")

    monkeypatch.setattr(load, "load_model", too_late)
    cfg = compose(["tracking=none", f"checkpoint.resume={tmp_path / 'nowhere' / 'step_2'}"])
    with pytest.raises(CheckpointError, match=r"^checkpoint\.resume=.*nowhere.* is not a usable checkpoint dir"):
        run(cfg, tmp_path / "run")
