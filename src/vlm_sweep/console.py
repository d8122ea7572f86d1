"""What a person watching a run sees: progress, measured metrics and the summary, once, without noise.

* Interactive terminal: a tqdm bar with loss/lr; its description says ``validating...`` or
  ``generating...`` while the loop is busy with those, and measured metrics (val_loss,
  eval/*) are printed above the bar.
* Anything else (SLURM/submitit output files, pipes, CI): plain log lines, no carriage-return
  soup: ``step 20/200 loss 1.2345 lr 2.00e-04 grad_norm 0.51 tok/s 1234``.
* Every line also lands in the job's log file (Hydra's ``launch.log``); only rank 0 reports.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import warnings
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, TextIO

log = logging.getLogger("vlm_sweep.progress")

# (category, message regex): third-party warnings that say nothing actionable to a user of this
# package. Matched by message, so every other warning of the same category still shows.
KNOWN_NOISY_WARNINGS = (
    # transformers/peft call their own deprecated property while wrapping a model.
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
    # torchdata's StatefulDataLoader calls a deprecated torch API on every iterator.
    (UserWarning, r"'set_vital' is deprecated"),
)
# (logger, message regex, when): third-party log records that say nothing actionable ("always", or
# "without_cuda": a CUDA kernel package suggested on a machine that cannot run it).
KNOWN_NOISY_LOG_RECORDS = (
    # transformers' own model code (Nemotron-H Omni) reads its deprecated config property.
    ("transformers.configuration_utils", r"`torch_dtype` is deprecated", "always"),
    # "install mamba_ssm / causal_conv1d": CUDA-only packages; said once per kernel.
    ("transformers.integrations.hub_kernels", r"falling back to its reference PyTorch implementation", "without_cuda"),
)
# Loggers that announce routine work at INFO (e.g. "Creating initial MLflow database tables...").
KNOWN_CHATTY_LOGGERS = ("mlflow.store.db.utils", "alembic.runtime.migration")

_silenced = False


def is_tty(stream: Optional[TextIO] = None) -> bool:
    """Whether progress goes to an interactive terminal (not a SLURM/submitit output file)."""
    stream = stream if stream is not None else sys.stderr
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or stream-like objects
        return False


def _disable_bars(module: str, env_var: str, disable: Callable[[Any], None]) -> None:
    """Turn a library's progress bars off: now if it is imported, else through the variable it reads on import."""
    if module in sys.modules:
        disable(sys.modules[module])
    else:
        os.environ.setdefault(env_var, "1")


def quiet_chatty_loggers() -> None:
    """Routine INFO chatter of third-party loggers off (light: imports nothing; safe before Hydra)."""
    for name in KNOWN_CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def silence_known_noise(tty: Optional[bool] = None) -> None:
    """Filter the known third-party warnings, INFO chatter and progress bars at their source (idempotent).

    datasets' "Generating ... split" bars are always off; off a terminal, the hub and transformers bars
    ("Loading weights", downloads) are too, since a log file only gets their carriage returns. Cheap:
    imports nothing heavy, so launch.py can call it before Hydra starts.
    """
    global _silenced
    if _silenced:
        return
    _silenced = True
    for category, message in KNOWN_NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for logger_name, message, when in KNOWN_NOISY_LOG_RECORDS:
        logger = logging.getLogger(logger_name)
        if not any(isinstance(f, _DropRecords) and f.pattern.pattern == message for f in logger.filters):
            logger.addFilter(_DropRecords(message, when))
    quiet_chatty_loggers()
    _disable_bars("datasets", "HF_DATASETS_DISABLE_PROGRESS_BARS", lambda m: m.disable_progress_bars())
    if not (is_tty() if tty is None else tty):
        # transformers reads the hub's setting when it is imported.
        _disable_bars("huggingface_hub", "HF_HUB_DISABLE_PROGRESS_BARS", lambda m: m.utils.disable_progress_bars())
        if "transformers" in sys.modules:
            sys.modules["transformers"].utils.logging.disable_progress_bar()


class _DropRecords(logging.Filter):
    """Drops a logger's records whose message matches (set on the logger that emits them)."""

    def __init__(self, message: str, when: str) -> None:
        super().__init__()
        self.pattern = re.compile(message)
        self.when = when

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.pattern.search(record.getMessage()):
            return True
        if self.when == "without_cuda":
            torch = sys.modules.get("torch")
            return bool(torch is not None and torch.cuda.is_available())
        return False


def process_rank() -> int:
    """This process's global rank (torchrun / submitit export RANK; 0 for a single process)."""
    value = os.environ.get("RANK", "0")
    return int(value) if value.isdigit() else 0


def setup_rank_logging(rank: Optional[int] = None) -> None:
    """Ranks other than 0 log warnings and errors only, and show no third-party progress bars.

    Call inside the Hydra job (after Hydra configured logging) and after RANK is known.
    """
    rank = process_rank() if rank is None else rank
    if rank == 0:
        return
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("vlm_sweep").setLevel(logging.WARNING)
    import datasets
    import huggingface_hub.utils
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()


def log_to_files(level: int, message: str, logger: logging.Logger = log) -> None:
    """Write a record to the root logger's log files only (the console already shows it)."""
    if not logger.isEnabledFor(level):
        return
    record = logger.makeRecord(logger.name, level, __file__, 0, message, (), None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and record.levelno >= handler.level:
            handler.handle(record)


def user_error(message: str) -> None:
    """A user error: one plain line on stderr, and the same line (once) in the job's log file."""
    print(message, file=sys.stderr, flush=True)
    log_to_files(logging.ERROR, message, logging.getLogger("vlm_sweep"))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if 1e-3 <= abs(value) < 1e4 or value == 0 else f"{value:.2e}"
    return str(value)


def format_step_line(step: int, total: int, metrics: Mapping[str, Any]) -> str:
    """``step 20/200 loss 1.2345 lr 2.00e-04 grad_norm 0.51 tok/s 1234`` (keys that are present)."""
    parts = [f"step {step}/{total}"]
    if "loss" in metrics:
        parts.append(f"loss {metrics['loss']:.4f}")
    if "lr" in metrics:
        parts.append(f"lr {metrics['lr']:.2e}")
    if "grad_norm" in metrics:
        parts.append(f"grad_norm {metrics['grad_norm']:.2f}")
    if "tokens_per_s" in metrics:
        parts.append(f"tok/s {metrics['tokens_per_s']:.0f}")
    if metrics.get("skipped_records"):
        parts.append(f"skipped {metrics['skipped_records']}")
    return " ".join(parts)


def measured_metrics(metrics: Mapping[str, Any]) -> Dict[str, Any]:
    """The metrics that are measured now and then, not every step: val_loss and eval/*."""
    return {k: v for k, v in metrics.items() if k == "val_loss" or k.startswith("eval/")}


def format_measured_line(step: int, total: int, metrics: Mapping[str, Any]) -> str:
    """``step 100/300 val_loss 1.2345 eval/ted_accuracy 0.5123``."""
    return " ".join([f"step {step}/{total}"] + [f"{k} {_fmt(v)}" for k, v in measured_metrics(metrics).items()])


class ProgressReporter:
    """Training progress for a person: a bar on a terminal, plain lines in a log file.

    ``tty`` and ``stream`` default to "is stderr a terminal" and stderr; tests pass them.
    On ranks other than 0 (``is_main=False``) every method does nothing.
    """

    def __init__(self, total_steps: int, initial_step: int = 0, is_main: bool = True,
                 log_every_steps: int = 1, *, tty: Optional[bool] = None,
                 stream: Optional[TextIO] = None) -> None:
        self.enabled = is_main
        self.total = int(total_steps)
        self.step_now = int(initial_step)
        self.every = max(1, int(log_every_steps or 1))
        self.stream = stream if stream is not None else sys.stderr
        self.tty = is_tty(self.stream) if tty is None else tty
        self._bar: Any = None
        self._exit = contextlib.ExitStack()
        if self.enabled and self.tty:
            from tqdm.auto import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self._bar = tqdm(total=self.total, initial=self.step_now, desc="train", dynamic_ncols=True,
                             file=self.stream)
            # Log lines (measured metrics, warnings) print above the bar instead of through it.
            self._exit.enter_context(logging_redirect_tqdm(tqdm_class=tqdm))

    def step(self, step: int, metrics: Mapping[str, Any]) -> None:
        """One optimizer step done: advance the bar, or log a line every log_every_steps.

        ``metrics`` may be empty for a step whose metrics were not computed (not due for logging).
        """
        if not self.enabled:
            return
        self.step_now = step
        # A step the loop did not measure (empty metrics) only moves the bar.
        due = bool(metrics) and (step % self.every == 0 or step == self.total)
        if self._bar is not None:
            postfix = {k: f"{metrics[k]:.4f}" if k == "loss" else f"{metrics[k]:.2e}"
                       for k in ("loss", "lr") if k in metrics}
            if postfix:  # else the last values stay on show
                self._bar.set_postfix(postfix, refresh=False)
            self._bar.update(step - self._bar.n)
            if due:  # the log file still gets the plain line
                log_to_files(logging.INFO, format_step_line(step, self.total, metrics))
        elif due:
            log.info(format_step_line(step, self.total, metrics))

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Say what the loop is busy with (``validating``, ``generating``) while it is."""
        if not self.enabled:
            yield
            return
        if self._bar is None:
            log.info("step %d/%d %s...", self.step_now, self.total, name)
            yield
            return
        self._bar.set_description(f"train ({name}...)")
        try:
            yield
        finally:
            self._bar.set_description("train")

    def measured(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Report val_loss / eval/* as soon as they are measured (console and log file)."""
        if not self.enabled or not measured_metrics(metrics):
            return
        log.info(format_measured_line(step, self.total, metrics))

    def close(self) -> None:
        """Close the bar and restore the console log handlers (idempotent)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._exit.close()

    def __enter__(self) -> "ProgressReporter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def format_summary(result: Any) -> str:
    """The closing summary of a run (``train.RunResult``), measured metrics included."""
    def fmt(v: Optional[float]) -> str:
        return "n/a" if v is None else f"{v:.4f}"

    lines = [
        f"run {result.status} at step {result.step}: loss {fmt(result.first_loss)} -> "
        f"{fmt(result.final_loss)}, val_loss {fmt(result.val_loss)}",
    ]
    evals = {k: v for k, v in (getattr(result, "metrics", None) or {}).items() if k.startswith("eval/")}
    if evals:
        lines.append("  eval:       " + ", ".join(f"{k} {_fmt(v)}" for k, v in evals.items()))
    lines += [f"  run dir:    {result.run_dir}", f"  checkpoint: {result.checkpoint or 'none'}"]
    if getattr(result, "mlflow_run_id", None):
        lines.append(f"  mlflow:     run {result.mlflow_run_id} in {result.mlflow_uri}")
    return "\n".join(lines)
