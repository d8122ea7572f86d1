"""What a person sees during a run: progress on a terminal and in log files, measured metrics, rank 0 only,
one line per user error, and no known third-party noise."""

from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import run_launch
from vlm_sweep import console
from vlm_sweep.console import ProgressReporter

METRICS = {"loss": 1.23456, "lr": 2e-4, "grad_norm": 0.5123, "tokens_per_s": 1234.4, "label_tokens": 10}


@pytest.fixture
def log_file(tmp_path):
    """A root FileHandler at INFO, like Hydra's launch.log handler."""
    root = logging.getLogger()
    handler = logging.FileHandler(tmp_path / "launch.log")
    handler.setFormatter(logging.Formatter("%(message)s"))
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield tmp_path / "launch.log"
    root.removeHandler(handler)
    handler.close()
    root.setLevel(level)


def _drive(reporter: ProgressReporter, steps: int) -> None:
    for step in range(1, steps + 1):
        reporter.step(step, {**METRICS, "loss": 1.0 / step})
        if step == 4:
            with reporter.phase("validating"):
                pass
            reporter.measured(step, {**METRICS, "val_loss": 0.75, "eval/ted_accuracy": 0.5})
    reporter.close()


def test_log_file_mode_writes_plain_step_and_measured_lines(log_file):
    stream = io.StringIO()
    _drive(ProgressReporter(5, 0, True, log_every_steps=2, tty=False, stream=stream), 5)
    lines = log_file.read_text().splitlines()
    assert lines == [
        "step 2/5 loss 0.5000 lr 2.00e-04 grad_norm 0.51 tok/s 1234",
        "step 4/5 loss 0.2500 lr 2.00e-04 grad_norm 0.51 tok/s 1234",
        "step 4/5 validating...",
        "step 4/5 val_loss 0.7500 eval/ted_accuracy 0.5000",
        "step 5/5 loss 0.2000 lr 2.00e-04 grad_norm 0.51 tok/s 1234",  # the last step is always logged
    ]
    assert stream.getvalue() == ""  # no bar, no carriage returns


def test_terminal_mode_shows_a_bar_that_says_when_it_validates(log_file):
    class Stream(io.StringIO):
        def __init__(self) -> None:
            super().__init__()
            self.during_phase = ""

    stream = Stream()
    reporter = ProgressReporter(5, 0, True, log_every_steps=2, tty=True, stream=stream)
    reporter.step(1, METRICS)
    reporter.step(2, {})  # a step whose metrics the loop did not compute: the bar moves, the values stay
    with reporter.phase("validating"):
        stream.during_phase = stream.getvalue().split("\r")[-1]
    reporter.measured(2, {"val_loss": 0.75})
    reporter.close()
    assert "validating..." in stream.during_phase and "loss=1.2346" in stream.during_phase
    assert "2/5" in stream.during_phase and "lr=2.00e-04" in stream.during_phase
    # The log file still gets plain lines: due steps with metrics (none here) and the measurement.
    assert log_file.read_text().splitlines() == ["step 2/5 val_loss 0.7500"]


def test_other_ranks_report_nothing(log_file):
    stream = io.StringIO()
    _drive(ProgressReporter(5, 0, False, log_every_steps=1, tty=True, stream=stream), 5)
    _drive(ProgressReporter(5, 0, False, log_every_steps=1, tty=False, stream=stream), 5)
    assert stream.getvalue() == "" and log_file.read_text() == ""


def test_resumed_run_counts_from_its_step(log_file):
    stream = io.StringIO()
    reporter = ProgressReporter(10, 6, True, log_every_steps=1, tty=True, stream=stream)
    reporter.step(7, METRICS)
    reporter.close()
    assert "7/10" in stream.getvalue()
    assert log_file.read_text().splitlines() == ["step 7/10 loss 1.2346 lr 2.00e-04 grad_norm 0.51 tok/s 1234"]


def test_setup_rank_logging_keeps_warnings_only_on_other_ranks(log_file):
    logger = logging.getLogger("vlm_sweep.some_module")
    root, pkg = logging.getLogger(), logging.getLogger("vlm_sweep")
    levels = root.level, pkg.level
    try:
        console.setup_rank_logging(rank=0)
        logger.info("rank 0 info")
        console.setup_rank_logging(rank=1)
        logger.info("rank 1 info")
        logger.warning("rank 1 warning")
    finally:
        root.setLevel(levels[0])
        pkg.setLevel(levels[1])
    assert log_file.read_text().splitlines() == ["rank 0 info", "rank 1 warning"]


def test_user_error_prints_one_line_and_logs_it_once(log_file, capsys):
    console_handler = logging.StreamHandler()  # Hydra's console handler (stderr here)
    logging.getLogger().addHandler(console_handler)
    try:
        console.user_error("config error: optimizer.lr must be > 0 (got -1.0)")
    finally:
        logging.getLogger().removeHandler(console_handler)
    out, err = capsys.readouterr()
    assert out == "" and err == "config error: optimizer.lr must be > 0 (got -1.0)\n"
    assert log_file.read_text() == "config error: optimizer.lr must be > 0 (got -1.0)\n"


def test_known_noise_is_filtered_and_other_warnings_are_not(monkeypatch):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        monkeypatch.setattr(console, "_silenced", False)
        monkeypatch.delenv("HF_DATASETS_DISABLE_PROGRESS_BARS", raising=False)  # restored after the test
        console.silence_known_noise(tty=True)
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
        warnings.warn("'set_vital' is deprecated, please do not call", UserWarning)
        warnings.warn("`something_else` is deprecated", FutureWarning)
        warnings.warn("a real problem", UserWarning)
    assert [str(w.message) for w in seen] == ["`something_else` is deprecated", "a real problem"]


def test_known_third_party_log_noise_is_dropped_and_the_rest_kept(monkeypatch):
    import torch

    class Collect(logging.Handler):
        def __init__(self):
            super().__init__()
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    monkeypatch.setattr(console, "_silenced", False)
    console.silence_known_noise(tty=True)
    console.silence_known_noise(tty=True)  # idempotent: one filter per logger
    config_log = logging.getLogger("transformers.configuration_utils")
    kernels_log = logging.getLogger("transformers.integrations.hub_kernels")
    assert len(config_log.filters) == len(kernels_log.filters) == 1
    seen = Collect()
    for logger in (config_log, kernels_log):
        logger.addHandler(seen)
    try:
        config_log.warning("`torch_dtype` is deprecated! Use `dtype` instead!")
        config_log.warning("a config problem")
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        kernels_log.warning("`causal_conv1d_fn` is falling back to its reference PyTorch implementation because "
                            "`causal_conv1d` is not installed.")
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # on a GPU the hint is actionable
        kernels_log.warning("`mamba_chunk_scan_combined` is falling back to its reference PyTorch implementation")
    finally:
        for logger in (config_log, kernels_log):
            logger.removeHandler(seen)
    assert seen.messages == ["a config problem",
                             "`mamba_chunk_scan_combined` is falling back to its reference PyTorch implementation"]


def test_summary_lists_eval_metrics():
    result = SimpleNamespace(status="FINISHED", step=3, first_loss=2.0, final_loss=1.0, val_loss=0.9,
                             run_dir="/r", checkpoint=None, mlflow_run_id=None, mlflow_uri=None,
                             metrics={"val_loss": 0.9, "eval/ted_accuracy": 0.25, "eval/field_f1": 0.0})
    summary = console.format_summary(result)
    assert "val_loss 0.9000" in summary
    assert "eval/ted_accuracy 0.2500, eval/field_f1 0.0000" in summary


@pytest.mark.slow
def test_a_run_in_a_log_file_shows_steps_and_measurements_without_noise(tmp_path):
    """Output to files (as under SLURM/submitit): plain progress lines, val_loss/eval in launch.log, no noise."""
    run_dir = tmp_path / "run"
    proc = run_launch([f"hydra.run.dir={run_dir}", "tracking=none", "step_scheduler.max_steps=3",
                       "step_scheduler.val_every_steps=2", "eval.every_steps=3", "eval.num_samples=2",
                       "eval.max_new_tokens=4", "dataset.max_val_samples=4"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    assert "\r" not in output
    for noise in ("is_gradient_checkpointing", "set_vital", "Generating train split", "Loading weights"):
        assert noise not in output
    logged = (run_dir / "launch.log").read_text()
    assert "step 1/3 loss " in logged and "step 3/3 loss " in logged
    assert "step 2/3 val_loss " in logged
    assert "step 3/3 generating..." in logged
    assert "eval/ted_accuracy" in logged.split("run FINISHED")[0]  # measured during training
    summary = logged.split("run FINISHED")[1]
    assert "val_loss" in summary and "eval/ted_accuracy" in summary
    assert output.count("trainable ") == 1
