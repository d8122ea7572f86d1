"""Sweep report: a fake 3-job sweep dir (one failed) and the same sweep in a real MLflow store."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

import pytest
import yaml

from vlm_sweep.report import ReportError, load_sweep, render_table, table_rows, write_report
from vlm_sweep.report.model import parse_overrides, split_override_dirname
from vlm_sweep.records import throughput_from_rows, throughput_summary
from vlm_sweep.sweep.job import JobStatus, write_status
from vlm_sweep.tracking import artifact_location, flatten

EXPERIMENT = "tiny_gemma3_synthetic_receipts"
ERROR = "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"
# (overrides, status, steps, final val_loss, eval metrics); job 1 has the lowest val_loss,
# job 0 the highest ted_accuracy; job 2 failed at step 12 before any validation.
JOBS = [
    (["model=tiny_gemma3", "optimizer.lr=0.001", "peft=lora"], "FINISHED", 30, 1.5,
     {"eval/ted_accuracy": 0.40, "eval/field_f1": 0.35}),
    (["model=tiny_gemma3", "optimizer.lr=0.02", "peft=none"], "FINISHED", 30, 1.2,
     {"eval/ted_accuracy": 0.25, "eval/field_f1": 0.30}),
    (["model=tiny_gemma3", "optimizer.lr=0.005", "peft=lora"], "FAILED", 12, None, {}),
]


def _metric_rows(job_num: int, steps: int, with_val: bool, evals: Dict[str, float]) -> List[dict]:
    rows = []
    for step in range(1, steps + 1):
        row = {"step": step, "loss": 7.0 / (1 + 0.2 * step * (job_num + 1)) + 0.8, "lr": 1e-3,
               "grad_norm": 3.0, "label_tokens": 500, "tokens_per_s": 9000.0 + 100 * job_num,
               "peak_memory_gb": 1.2, "tflops": 300.0 + 10 * job_num, "mfu": (300.0 + 10 * job_num) / 989,
               "packing_efficiency": 0.9 + 0.01 * job_num,
               "image_tokens": 2048, "text_tokens": 2452}  # 4500 tokens: 0.5 s a step at 9000 tokens/s
        if with_val and step % 10 == 0:
            row["val_loss"] = row["loss"] + 0.3
        rows.append(row)
    if with_val:
        rows[-1].update(evals)
    return rows


def _make_job(sweep_dir: Path, job_num: int, overrides: List[str], status: str, steps: int,
              val_loss: Optional[float], evals: Dict[str, float], run_id: Optional[str] = None) -> List[dict]:
    job_dir = sweep_dir / str(job_num)
    (job_dir / ".hydra").mkdir(parents=True)
    (job_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    config = {"optimizer": {"lr": float(parse_overrides(overrides).get("optimizer.lr", 1e-3))},
              "peft": {"method": parse_overrides(overrides)["peft"]}, "model": {"name": "tiny_gemma3"}}
    (job_dir / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    (job_dir / "config.yaml").write_text(yaml.safe_dump(config))
    rows = _metric_rows(job_num, steps, val_loss is not None, evals)
    if val_loss is not None:
        rows[-1]["val_loss"] = val_loss
    (job_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    log_path = job_dir / "launch.log"
    log_path.write_text("training...\n" + (ERROR + "\n" if status == "FAILED" else ""))
    # As cli.py writes it: throughput (two processes on GPUs) at the end of a run, none on a failure.
    throughput = ({**throughput_from_rows(rows, 2), "device_type": "cuda", "compute_precision": "bf16"}
                  if status == "FINISHED" else {})
    write_status(job_dir, JobStatus(
        status=status, job_num=job_num, override_dirname=",".join(overrides), overrides=overrides,
        error=ERROR if status == "FAILED" else None, log_path=str(log_path), step=steps,
        final_loss=rows[-1]["loss"], val_loss=val_loss, metrics=evals, mlflow_run_id=run_id,
        run_dir=str(job_dir), **throughput))
    return rows


@pytest.fixture
def sweep_dir(tmp_path: Path) -> Path:
    root = tmp_path / "outputs" / EXPERIMENT / "multirun" / "2026-11-25" / "10-20-30"
    root.mkdir(parents=True)
    (root / "multirun.yaml").write_text("hydra: {mode: MULTIRUN}\n")
    for num, (overrides, status, steps, val, evals) in enumerate(JOBS):
        _make_job(root, num, overrides, status, steps, val, evals)
    return root


@pytest.fixture
def tracked_sweep(sweep_dir: Path, mlflow_uri: str) -> Dict[str, str]:
    """The same sweep as an MLflow parent + 3 children, plus runs that must not be picked."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_uri)
    exp = client.create_experiment(EXPERIMENT, artifact_location=artifact_location(mlflow_uri))
    old_parent = client.create_run(exp, run_name="old sweep").info.run_id
    old_child = client.create_run(exp, tags={"mlflow.parentRunId": old_parent}).info.run_id
    client.set_terminated(old_child)
    parent = client.create_run(exp, run_name="sweep").info.run_id
    for num, (overrides, status, _, _, _) in enumerate(JOBS):
        job_dir = sweep_dir / str(num)
        rows = [json.loads(line) for line in (job_dir / "metrics.jsonl").read_text().splitlines()]
        run = client.create_run(exp, run_name=",".join(overrides), tags={
            "mlflow.parentRunId": parent, "vlm_sweep.job_num": str(num),
            "vlm_sweep.sweep_dir": str(sweep_dir), "vlm_sweep.slurm_job_id": ""}).info.run_id
        config = yaml.safe_load((job_dir / "config.yaml").read_text())
        metrics = [Metric(k, float(v), 1000 + r["step"], r["step"]) for r in rows
                   for k, v in r.items() if k != "step"]
        client.log_batch(run, params=[Param(k, v) for k, v in flatten(config).items()])
        for i in range(0, len(metrics), 500):
            client.log_batch(run, metrics=metrics[i:i + 500])
        client.set_terminated(run, status=status)
    client.set_terminated(parent)
    client.create_run(exp, run_name="a later single run")  # newest, but not a sweep parent
    (sweep_dir / "mlflow_parent.json").write_text(
        json.dumps({"run_id": parent, "uri": mlflow_uri, "experiment_id": exp}))
    return {"uri": mlflow_uri, "parent": parent, "experiment_id": exp}


def _table(report: Path) -> List[List[str]]:
    """The job table of a report.md as cells (header first, separator dropped)."""
    lines = [line for line in report.read_text().splitlines() if line.startswith("|")]
    return [[c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]] for line in lines if "---" not in line]


def _row(table: List[List[str]], job_num: int) -> Dict[str, str]:
    for row in table[1:]:
        if row[0].strip("*★ ") == str(job_num):
            return dict(zip(table[0], row))
    raise AssertionError(f"no row for job {job_num}")


def _best(table: List[List[str]]) -> List[str]:
    return [row[0].strip("*★ ") for row in table[1:] if "★" in row[0]]


# ---------------------------------------------------------------- sweep dir


def test_report_from_sweep_dir(sweep_dir: Path):
    report = write_report(sweep_dir)
    assert report == sweep_dir / "report.md"
    text, table = report.read_text(), _table(report)
    assert table[0][:4] == ["job", "optimizer.lr", "peft", "status"] and table[0][-2:] == ["overrides", "error"]
    assert "model" not in table[0], "a key every job shares is not a column"
    assert {"eval/ted_accuracy", "eval/field_f1", "val_loss", "tokens/s", "error"} <= set(table[0])
    assert len(table) == 1 + 3
    assert _best(table) == ["1"]
    best = _row(table, 1)
    assert all(cell.startswith("**") for cell in best.values() if cell)
    assert best["val_loss"] == "**1.2000**" and best["optimizer.lr"] == "**0.02**"
    failed = _row(table, 2)
    assert failed["status"] == "FAILED" and failed["steps"] == "12" and failed["val_loss"] == "n/a"
    assert "CUDA out of memory" in failed["error"]
    assert "(log: `2/launch.log`)" in failed["error"], "relative to the sweep dir"
    assert f"log: `{sweep_dir / '2' / 'launch.log'}`" in text, "the full path below the table"
    assert _row(table, 0)["error"] == ""
    assert f"# Sweep report: {EXPERIMENT}" in text
    assert "- date: 2026-11-25 10:20:30" in text
    assert "- jobs: 3 (2 finished, 1 failed)" in text
    assert "same in every job: `model=tiny_gemma3`" in text
    assert "![Loss curves](loss_curves.png)" in text and "(metric_vs_hparams.png)" in text
    assert ERROR in text.split("## Jobs that did not finish")[1]


@pytest.mark.parametrize("metric, mode, best", [
    ("val_loss", "min", "1"), ("val_loss", "max", "0"), ("eval/ted_accuracy", "max", "0"),
    ("ted_accuracy", "min", "1"), ("loss", "min", "1"), ("tokens_per_s", "max", "1")])
def test_best_row_follows_metric_and_mode(sweep_dir: Path, metric: str, mode: str, best: str):
    table = _table(write_report(sweep_dir, metric=metric, mode=mode))
    assert _best(table) == [best], "the failed job (2) is never the best"


def test_plots_are_real_images(sweep_dir: Path):
    from PIL import Image

    write_report(sweep_dir)
    for name in ("loss_curves.png", "metric_vs_hparams.png"):
        with Image.open(sweep_dir / name) as image:
            image.verify()
        with Image.open(sweep_dir / name) as image:
            assert image.format == "PNG"
            assert image.width >= 600 and image.height >= 300, image.size
            assert sum(1 for n in image.convert("L").histogram() if n) > 20, "not a blank canvas"


def test_job_without_status_file_still_gets_a_row(sweep_dir: Path):
    (sweep_dir / "2" / "job_status.json").unlink()
    with open(sweep_dir / "2" / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 13, "loss": 1.')  # torn last line of a killed job
    table = _table(write_report(sweep_dir))
    row = _row(table, 2)
    assert row["status"] == "UNKNOWN" and row["steps"] == "12"
    assert row["optimizer.lr"] == "0.005" and row["overrides"].strip("`") == "model=tiny_gemma3,optimizer.lr=0.005,peft=lora"
    assert "no job_status.json" in row["error"] and "launch.log" in row["error"]


def test_failed_job_with_nothing_logged(sweep_dir: Path):
    (sweep_dir / "2" / "metrics.jsonl").unlink()
    status = json.loads((sweep_dir / "2" / "job_status.json").read_text())
    status.update(step=0, final_loss=None, tokens_per_s=None)
    (sweep_dir / "2" / "job_status.json").write_text(json.dumps(status))
    report = write_report(sweep_dir)
    row = _row(_table(report), 2)
    assert row["final loss"] == "n/a" and row["tokens/s"] == "n/a" and "CUDA" in row["error"]
    assert (sweep_dir / "loss_curves.png").exists()


def test_no_val_loss_anywhere_marks_no_best(tmp_path: Path):
    for num, lr in enumerate(["1e-4", "1e-3"]):
        _make_job(tmp_path, num, [f"optimizer.lr={lr}", "peft=lora"], "FINISHED", 8, None, {})
    report = write_report(tmp_path)
    text = report.read_text()
    assert _best(_table(report)) == []
    assert "no finished job reports `val_loss`" in text
    assert not (tmp_path / "metric_vs_hparams.png").exists()
    assert "no finished job reports val_loss" in text
    assert _best(_table(write_report(tmp_path, metric="loss"))) == ["1"]
    assert (tmp_path / "metric_vs_hparams.png").exists()


def test_single_job_sweep(tmp_path: Path):
    _make_job(tmp_path, 0, ["optimizer.lr=0.001", "peft=lora"], "FINISHED", 20, 1.4, {})
    report = write_report(tmp_path)
    table = _table(report)
    assert len(table) == 2 and _best(table) == ["0"]
    assert table[0][:3] == ["job", "optimizer.lr", "peft"], "one job: its overrides are the columns"
    assert "error" not in table[0]
    assert (tmp_path / "metric_vs_hparams.png").exists()


def test_throughput_columns_come_from_job_status(sweep_dir: Path):
    """precision, tokens/s, real tokens (packing efficiency), TFLOP/s, MFU and GPU-hours per job, as the jobs'
    status files give them."""
    table = _table(write_report(sweep_dir))
    assert table[0][table[0].index("val_loss") + 3:table[0].index("overrides")] == [
        "precision", "tokens/s", "real tokens", "TFLOP/s", "MFU", "GPU-hours"]
    first = _row(table, 0)
    assert (first["precision"], _row(table, 2)["precision"]) == ("bf16", "n/a")  # a failed job does not say
    # 30 logged steps of 4500 tokens at 9000 tokens/s on 2 processes: 30 x 0.5 s x 2 = 30 s.
    assert (first["tokens/s"], first["real tokens"], first["TFLOP/s"], first["MFU"], first["GPU-hours"]) == (
        "9,000", "90.0%", "300.0", "30.3%", f"{30 / 3600:.2g}")
    failed = _row(table, 2)  # no throughput in a FAILED status: the means of its metrics log
    assert (failed["tokens/s"], failed["real tokens"], failed["TFLOP/s"], failed["GPU-hours"]) == (
        "9,200", "92.0%", "320.0", "n/a")

    # The status file is the source of truth: its values win over the metrics log.
    path = sweep_dir / "1" / "job_status.json"
    status = json.loads(path.read_text())
    status.update(tokens_per_s=12345.0, tflops=494.5, mfu=0.5, device_hours=3.25)
    path.write_text(json.dumps(status))
    report = write_report(sweep_dir, metric="mfu", mode="max")
    row = _row(_table(report), 1)
    assert (row["tokens/s"], row["TFLOP/s"], row["MFU"], row["GPU-hours"]) == (
        "**12,345**", "**494.5**", "**50.0%**", "**3.25**")
    assert _best(_table(report)) == ["1"]
    assert "GPU-hours = training wall time x processes" in report.read_text()

    status.update(device_type="cpu")  # one CPU job: the column is device-hours, not GPU-hours
    path.write_text(json.dumps(status))
    table = _table(write_report(sweep_dir))
    assert "device-hours" in table[0] and "GPU-hours" not in table[0]
    assert _row(table, 1)["device-hours"] == "**3.25**"  # job 1 is the best by val_loss: bold


def test_throughput_summary_from_metrics_log(tmp_path: Path):
    """What cli.py puts in job_status.json at the end of a run, and the report's row from it."""
    import torch

    job_dir = tmp_path / "0"
    job_dir.mkdir()
    rows = [{"step": 1, "loss": 2.0, "tokens_per_s": 1000.0, "image_tokens": 600, "text_tokens": 400,
             "tflops": 2.0, "mfu": 0.25, "packing_efficiency": 0.75},
            {"step": 2, "loss": 1.5, "tokens_per_s": 3000.0, "image_tokens": 1200, "text_tokens": 300,
             "tflops": 4.0, "packing_efficiency": 0.95},  # a step without mfu (peak unknown): not in its mean
            {"step": 3, "loss": 1.4, "val_loss": 1.6}]
    (job_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "lo')
    summary = throughput_summary(job_dir, num_processes=4)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert summary == pytest.approx({
        "tokens_per_s": 2000.0, "tflops": 3.0, "mfu": 0.25, "packing_efficiency": 0.85,
        "device_hours": (1.0 + 0.5) * 4 / 3600,  # (1000/1000 + 1500/3000) s x 4 processes
        "device_type": device})
    assert throughput_summary(job_dir, 1, wall_seconds=7200.0)["device_hours"] == 2.0
    assert throughput_summary(tmp_path / "nothing", 1) == {
        "tokens_per_s": None, "mfu": None, "tflops": None, "packing_efficiency": None, "device_hours": None,
        "device_type": device}

    write_status(job_dir, JobStatus(status="FINISHED", job_num=0, override_dirname="", overrides=[],
                                    log_path="", run_dir=str(job_dir), **summary))
    table = _table(write_report(tmp_path))
    label = "GPU-hours" if device == "cuda" else "device-hours"
    assert label in table[0]
    row = _row(table, 0)
    assert (row["tokens/s"], row["real tokens"], row["TFLOP/s"], row["MFU"], row[label]) == (
        "**2,000**", "**85.0%**", "**3.0**", "**25.0%**", f"**{1.5 * 4 / 3600:.2g}**")


def test_override_dirname_split_keeps_bracketed_values():
    assert split_override_dirname("a=[1,2],b=x,c='p,q'") == ["a=[1,2]", "b=x", "c='p,q'"]
    assert parse_overrides(["+x.y=1", "~z", "peft=lora"]) == {"x.y": "1", "z": "<deleted>", "peft": "lora"}


# ---------------------------------------------------------------- MLflow


def test_report_logged_to_parent_run(sweep_dir: Path, tracked_sweep: Dict[str, str]):
    from mlflow.tracking import MlflowClient

    write_report(sweep_dir)
    client = MlflowClient(tracked_sweep["uri"])
    logged = {Path(a.path).name for a in client.list_artifacts(tracked_sweep["parent"], "report")}
    assert logged == {"report.md", "loss_curves.png", "metric_vs_hparams.png"}
    assert "MLflow parent run: `%s`" % tracked_sweep["parent"] in (sweep_dir / "report.md").read_text()


def test_mlflow_source_matches_sweep_dir(sweep_dir: Path, tracked_sweep: Dict[str, str], tmp_path: Path,
                                         monkeypatch):
    from_dir = table_rows(load_sweep(sweep_dir))
    sweep = load_sweep(EXPERIMENT, tracking_uri=tracked_sweep["uri"])
    assert sweep.parent_run_id == tracked_sweep["parent"], "the latest run with children"
    assert table_rows(sweep) == from_dir
    assert table_rows(load_sweep(tracked_sweep["experiment_id"], tracking_uri=tracked_sweep["uri"])) == from_dir
    assert [len(job.loss_curve) for job in sweep.jobs] == [30, 30, 12]

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracked_sweep["uri"])
    report = write_report(EXPERIMENT, metric="eval/ted_accuracy", mode="max")
    assert report == Path(f"report_{tracked_sweep['parent']}") / "report.md"
    assert _best(_table(report)) == ["0"]
    assert (report.parent / "loss_curves.png").exists() and (report.parent / "metric_vs_hparams.png").exists()


def test_mlflow_source_without_the_sweep_dir(sweep_dir: Path, tracked_sweep: Dict[str, str], tmp_path: Path):
    """Status files out of reach (another machine): MLflow's run status and metric means stand in."""
    from_dir = {job.job_num: job for job in load_sweep(sweep_dir).jobs}
    sweep_dir.rename(tmp_path / "elsewhere")
    sweep = load_sweep(EXPERIMENT, tracking_uri=tracked_sweep["uri"])
    assert [job.status for job in sweep.jobs] == ["FINISHED", "FINISHED", "FAILED"]
    for job in sweep.jobs:
        assert job.tokens_per_s == from_dir[job.job_num].tokens_per_s
        assert job.mfu == pytest.approx(from_dir[job.job_num].mfu)
        assert job.device_hours is None and job.error is None and job.log_path is None
    assert parse_overrides(JOBS[2][0]) == sweep.jobs[2].overrides, "from the run name"
    table = table_rows(sweep)
    assert "device-hours" in table[0], "no status file says the jobs ran on GPUs"
    assert table[3][table[0].index("error")] == "no log"


def test_unknown_experiment_is_a_clear_error(tracked_sweep: Dict[str, str]):
    with pytest.raises(ReportError, match=f"no sweep dir or MLflow experiment named 'nope'.*{EXPERIMENT}"):
        load_sweep("nope", tracking_uri=tracked_sweep["uri"])
    with pytest.raises(ReportError, match="'outputs/typo' is not a sweep dir, and no MLflow store"):
        load_sweep("outputs/typo", tracking_uri="sqlite:////nonexistent/mlflow.db")
    with pytest.raises(ReportError, match="no MLflow run"):
        load_sweep(None, tracking_uri=tracked_sweep["uri"], parent_run_id="0" * 32)


def test_explicit_parent_run(sweep_dir: Path, tracked_sweep: Dict[str, str], mlflow_uri: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_uri)
    old = [r for r in client.search_runs([tracked_sweep["experiment_id"]]) if r.info.run_name == "old sweep"]
    sweep = load_sweep(None, tracking_uri=mlflow_uri, parent_run_id=old[0].info.run_id)
    assert [job.job_num for job in sweep.jobs] == [0] and sweep.jobs[0].loss_curve == []
    sweep = load_sweep(None, tracking_uri=mlflow_uri, parent_run_id=tracked_sweep["parent"])
    assert table_rows(sweep) == table_rows(load_sweep(sweep_dir))


# ---------------------------------------------------------------- CLI


def _cli(*args: str, cwd: Optional[Path] = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vlm_sweep.report", *args], capture_output=True,
                          text=True, timeout=120, cwd=cwd)


@pytest.mark.slow
def test_cli_prints_the_table(sweep_dir: Path, tracked_sweep: Dict[str, str], tmp_path: Path):
    done = _cli(str(sweep_dir), "--metric", "eval/field_f1", "--mode", "max")
    assert done.returncode == 0, done.stderr
    assert render_table(sweep_dir, "eval/field_f1", "max") in done.stdout
    assert "★ job 0" in done.stdout and f"report: {sweep_dir / 'report.md'}" in done.stdout

    out = tmp_path / "from_mlflow"
    done = _cli(EXPERIMENT, "--tracking-uri", tracked_sweep["uri"], "--output", str(out))
    assert done.returncode == 0, done.stderr
    assert re.search(r"^\| job +\| optimizer\.lr +\| peft ", done.stdout, re.M), done.stdout
    assert (out / "report.md").exists()

    done = _cli("--parent-run-id", tracked_sweep["parent"], "--tracking-uri", tracked_sweep["uri"],
                cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / f"report_{tracked_sweep['parent']}" / "report.md").exists()

    done = _cli("nope", "--tracking-uri", tracked_sweep["uri"])
    assert done.returncode == 2 and "error: no sweep dir or MLflow experiment" in done.stderr
