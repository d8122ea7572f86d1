"""The training loop: one readable place, driven by a ``TrainerSettings`` (no config tree).

Per optimizer step: fetch ``accum`` micro-batches, count their label tokens
across all ranks, and backpropagate ``sum of token losses / global label
tokens`` so that gradient accumulation and data parallelism give the same
gradient as one big batch (not an average of per-micro-batch means).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch

from vlm_sweep.data.loaders import from_handover
from vlm_sweep.data.packing import PackedInputs, processed_tokens, real_tokens
from vlm_sweep.errors import TrainingDivergedError
from vlm_sweep.models.registry import get_family
from vlm_sweep.rundir import RunDir
from vlm_sweep.training.guards import DataHealth, StopSignal, StoppedWhileReading
from vlm_sweep.training.mfu import step_report
from vlm_sweep.training.loss import count_label_tokens, summed_token_loss
from vlm_sweep.training.settings import TrainerSettings
from vlm_sweep.training.distributed import full_tensor, is_fsdp, no_gradient_sync, unsharded

log = logging.getLogger(__name__)

# Under several processes, the stop flag is agreed on (one all-reduce) this often, in steps,
# and at every checkpoint step; a single process checks its own flag every step for free.
STOP_CHECK_EVERY = 5


@dataclass
class StepStats:
    """One optimizer step. Tensors stay on the device until a log step needs them."""

    loss_sum: torch.Tensor  # this rank's summed token loss
    grad_norm: torch.Tensor  # pre-clip global norm (the same on every rank)
    label_tokens: int  # global label tokens (the step's normaliser)
    tokens: int  # this rank's real (non-padding) tokens
    skipped: int
    processed: int = 0  # this rank's positions run through the model (padding included)


@dataclass
class LogWindow:
    """Host-side counts since the last log line (no device sync to keep them)."""

    tokens: int = 0
    label_tokens: int = 0
    skipped: int = 0
    processed: int = 0
    started: float = field(default_factory=time.perf_counter)

    def add(self, stats: StepStats) -> None:
        self.tokens += stats.tokens
        self.label_tokens += stats.label_tokens
        self.skipped += stats.skipped
        self.processed += stats.processed


def to_device(batch: Dict[str, Any], device: torch.device) -> Dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


class Trainer:
    """Owns the loop; the recipe (vlm_sweep.train) builds and hands it the parts."""

    def __init__(self, *, settings: TrainerSettings, accelerator: Any, model: Any, optimizer: Any, scheduler: Any,
                 train_loader: Any, val_loader: Any, tracker: Any, run_dir: Path,
                 save_fn: Callable[["Trainer", Dict[str, float]], None], processor: Any = None,
                 eval_samples: Optional[List[Any]] = None, media_kwargs: Any = None) -> None:
        """``save_fn(trainer, metrics)`` checkpoints at checkpoint steps (``Checkpointer.save``)."""
        self.settings = settings
        self.acc = accelerator
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.tracker = tracker
        self.run_dir = run_dir
        self.save_fn = save_fn
        self.processor = processor
        self.eval_samples = eval_samples or []
        self.media_kwargs = media_kwargs
        self.stop_signal: Optional[int] = None
        self.accum = settings.global_batch_size // (settings.micro_batch_size * accelerator.num_processes)
        self.step = 0
        self.history: Dict[str, Any] = {}
        self._batches: Optional[Iterator[Dict[str, Any]]] = None
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.fsdp = is_fsdp(model)
        self.stopper: Optional[StopSignal] = None
        from vlm_sweep.training.flops import FlopCounter
        from vlm_sweep.training.mfu import peak_tflops

        self.flops = FlopCounter(model, settings.family)
        self.peak_tflops = peak_tflops(accelerator.device, override=settings.peak_tflops)
        # Packed batches get what their family needs per conversation (rope ids, block masks).
        self.packed_inputs = PackedInputs(model, get_family(settings.family))
        self.data_health = DataHealth(len(train_loader.dataset), settings.min_usable_fraction,
                                      settings.dataset_name)

    # -- data ---------------------------------------------------------------------------
    def next_batch(self) -> Dict[str, Any]:
        """The next non-empty micro-batch (batches whose records were all skipped are passed over).

        Stops with a BadRecordError when the data set is (nearly) all bad records, instead of
        skipping forever, and honours a stop signal while it skips.
        """
        if self._batches is None:
            self._batches = iter(self.train_loader)
        skipped = 0
        while True:
            try:
                batch = from_handover(next(self._batches))
            except RuntimeError as err:  # a DataLoader worker ended by the same signal (e.g. SIGTERM to the group)
                if self.stopper is not None and self.stopper.received:
                    raise StoppedWhileReading(f"stopped by signal {self.stopper.received}: {err}") from err
                raise
            skipped += batch["num_skipped"]
            self.data_health.update(len(batch["record_ids"]), batch["num_skipped"])
            if "input_ids" in batch:
                batch["num_skipped"] = skipped
                return batch
            if self.stopper is not None and self.stopper.received:
                raise StoppedWhileReading(f"stopped by signal {self.stopper.received} while reading data")

    # -- one optimizer step -------------------------------------------------------------
    def train_step(self) -> StepStats:
        """Accumulate ``accum`` micro-batches and step; no host sync in a single process.

        Label tokens are counted on the CPU batches; several processes agree on the global
        count with one all-reduce (the step's normaliser must be exact on every rank).
        """
        micro = [self.next_batch() for _ in range(self.accum)]  # kept on CPU until used
        global_tokens = sum(count_label_tokens(b) for b in micro)
        if self.acc.num_processes > 1:
            global_tokens = int(self.acc.reduce(torch.tensor(global_tokens, device=self.acc.device), "sum"))
        scale = self.acc.num_processes / max(global_tokens, 1)
        loss_sum = torch.zeros((), device=self.acc.device)
        for i, batch in enumerate(micro):
            batch = to_device(batch, self.acc.device)
            self.flops.real_tokens_mask = batch["attention_mask"]  # the model may get per-layer masks instead
            batch = self.packed_inputs(batch)
            sync = i == len(micro) - 1
            no_sync = contextlib.nullcontext() if sync else no_gradient_sync(self.model, self.acc)
            with no_sync, self.acc.autocast():
                summed = summed_token_loss(self.model, batch)
                self.acc.backward(summed * scale)
            loss_sum += summed.detach()
        grad_norm = self._clip_gradients()
        if global_tokens > 0:  # a step without labels must not move the weights
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepStats(loss_sum=loss_sum, grad_norm=grad_norm, label_tokens=global_tokens,
                         tokens=sum(real_tokens(b) for b in micro),
                         skipped=sum(b["num_skipped"] for b in micro),
                         processed=sum(processed_tokens(b) for b in micro))

    def _clip_gradients(self) -> torch.Tensor:
        """Clip to optimizer.max_grad_norm (inf: measure only); returns the pre-clip norm, on the device."""
        max_norm = self.settings.max_grad_norm or float("inf")
        if self.fsdp:
            return full_tensor(torch.nn.utils.clip_grad_norm_(self.trainable, max_norm))
        return self.acc.clip_grad_norm_(self.trainable, max_norm)

    def _step_metrics(self, stats: StepStats, window: LogWindow) -> Dict[str, float]:
        """The logged metrics of this step: the one host sync (and all-reduce) of a log step."""
        now = time.perf_counter()
        loss_sum, tokens = self.acc.reduce(
            torch.stack([stats.loss_sum.float(), torch.tensor(float(window.tokens), device=self.acc.device)]),
            "sum").tolist()
        grad_norm = float(stats.grad_norm)
        metrics = {
            "loss": loss_sum / stats.label_tokens if stats.label_tokens else 0.0,
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": grad_norm if math.isfinite(grad_norm) else float("nan"),
            "label_tokens": stats.label_tokens,
            "tokens_per_s": tokens / max(now - window.started, 1e-9),
            "peak_memory_gb": peak_memory_gb(self.acc.device),
        }
        if window.skipped:
            metrics["skipped_records"] = window.skipped
        if window.processed:  # this rank's share: real tokens / positions run (padding costs the rest)
            metrics["packing_efficiency"] = window.tokens / window.processed
        # FLOPs of the window's training forwards/backwards on every rank, vision tower included.
        tally = self.flops.tally().summed(lambda t: self.acc.reduce(t.to(self.acc.device), "sum").cpu())
        metrics.update(step_report(tally.flops, now - window.started, self.acc.num_processes, self.peak_tflops))
        metrics.update(image_tokens=tally.image_tokens, text_tokens=tally.text_tokens)
        self.flops.reset()
        return metrics

    # -- validation ---------------------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> Optional[float]:
        """Token-weighted validation loss over (at most max_val_batches of) the split."""
        if self.val_loader is None:
            return None
        self.model.eval()
        loss_sum = torch.zeros((), device=self.acc.device)
        tokens = torch.zeros((), device=self.acc.device)
        limit = self.settings.max_val_batches
        for i, batch in enumerate(self.val_loader):
            if limit is not None and i >= limit:
                break
            batch = from_handover(batch)
            if "input_ids" not in batch:
                continue
            batch = self.packed_inputs(to_device(batch, self.acc.device))
            with self.acc.autocast():
                loss_sum += summed_token_loss(self.model, batch)
            tokens += count_label_tokens(batch)
        self.model.train()
        total_tokens = float(self.acc.reduce(tokens, "sum"))
        return float(self.acc.reduce(loss_sum, "sum")) / total_tokens if total_tokens else None

    def evaluate_generation(self) -> Dict[str, float]:
        """Generate on the eval records and score them with the task metric (``eval/<name>``)."""
        from vlm_sweep.inference.generate import SamplingConfig
        from vlm_sweep.inference.score import evaluate_samples

        settings = self.settings
        model = self.acc.unwrap_model(self.model)
        model.eval()
        with self.acc.autocast(), unsharded(model):
            metrics, _ = evaluate_samples(
                model, self.processor, self.eval_samples, settings.record_format,
                SamplingConfig(max_new_tokens=settings.eval_max_new_tokens), batch_size=settings.eval_batch_size,
                # Under FSDP every rank must run the same forwards: each generates for all records.
                rank=0 if self.fsdp else self.acc.process_index,
                world_size=1 if self.fsdp else self.acc.num_processes, media_kwargs=self.media_kwargs)
        self.model.train()
        return {f"eval/{k}": v for k, v in metrics.items()}

    # -- the loop -----------------------------------------------------------------------
    def _log(self, metrics: Dict[str, float], step: int) -> None:
        if not self.acc.is_main_process:
            return
        self.tracker.log_metrics(metrics, step)  # a point the tracker already has is dropped there
        with open(RunDir(self.run_dir).metrics, "a") as fh:
            fh.write(json.dumps({"step": step, **metrics}) + "\n")

    def _measure(self, metrics: Dict[str, float], progress: Any, *, val: bool, gen: bool) -> None:
        """Add val_loss / eval metrics when due, saying on the console what the loop is doing."""
        if val:
            with progress.phase("validating"):
                val_loss = self.validate()
            if val_loss is not None:
                metrics["val_loss"] = self.history["val_loss"] = val_loss
        if gen and self.eval_samples:
            with progress.phase("generating"):
                scores = self.evaluate_generation()
            metrics.update(scores)
            self.history.update(scores)

    def fit(self) -> str:
        """Train to max_steps (or until a stop signal). Returns the final MLflow status."""
        from vlm_sweep.console import ProgressReporter

        steps = self.settings
        self.stopper = stopper = StopSignal()
        progress = ProgressReporter(steps.max_steps, self.step, self.acc.is_main_process, steps.log_every_steps)
        window = LogWindow()
        self.flops.reset()
        self.model.train()
        try:
            while self.step < steps.max_steps:
                try:
                    stats = self.train_step()
                except RuntimeError as err:  # a stop signal to the whole job also ends the DataLoader workers
                    if not self._stopping(stopper, err):
                        raise
                    log.warning("signal %s received: exiting; the run resumes from its last checkpoint",
                                stopper.received)
                    self.stop_signal = stopper.received
                    return "KILLED"
                except StoppedWhileReading:
                    log.warning("signal %s received while reading data: exiting; the run resumes from "
                                "its last checkpoint", stopper.received)
                    self.stop_signal = stopper.received
                    return "KILLED"
                self.step += 1
                window.add(stats)
                stop, logged = self._after_step(stats, window, stopper, progress)
                if stop:
                    log.warning("signal %s received: checkpointed at step %d, exiting", stopper.received,
                                self.step)
                    self.stop_signal = stopper.received
                    return "KILLED"
                if logged:  # the next log line measures from here
                    window = LogWindow()
        finally:
            stopper.restore()
            self.stopper = None
            progress.close()
            self.flops.close()
        return "FINISHED"

    @staticmethod
    def _stopping(stopper: StopSignal, err: BaseException, wait_s: float = 3.0) -> bool:
        """Whether ``err`` is a DataLoader worker ended by the stop signal the main process got too."""
        if "DataLoader worker" not in str(err) and not isinstance(err, StoppedWhileReading):
            return stopper.received is not None and isinstance(err, StoppedWhileReading)
        deadline = time.monotonic() + wait_s  # the signal may reach this process a moment later
        while stopper.received is None and time.monotonic() < deadline:
            time.sleep(0.05)
        return stopper.received is not None

    def _after_step(self, stats: StepStats, window: LogWindow, stopper: StopSignal,
                    progress: Any) -> Tuple[bool, bool]:
        """Validate, evaluate, log and checkpoint as due. Returns (a stop signal ends the run here, logged)."""
        steps, step = self.settings, self.step
        last = step == steps.max_steps
        save_due = last or step % steps.ckpt_every_steps == 0
        stop = self._stop_requested(stopper, force_check=save_due)
        save = stop or save_due
        best = steps.best_metric if save else None
        every_eval = steps.eval_every_steps
        val = last or step % steps.val_every_steps == 0 or best == "val_loss"
        gen = bool(every_eval) and (last or step % every_eval == 0) or bool(best and best.startswith("eval/"))
        gen = gen and bool(self.eval_samples)
        if not (val or gen or save or step % steps.log_every_steps == 0 or "first_loss" not in self.history):
            progress.step(step, {})
            return False, False
        metrics = self._step_metrics(stats, window)
        if not math.isfinite(metrics["loss"]):
            self._diverged(metrics, step)
        self.history["loss"] = metrics["loss"]
        self.history.setdefault("first_loss", metrics["loss"])
        progress.step(step, metrics)
        self._measure(metrics, progress, val=val and self.val_loader is not None, gen=gen)
        self._log(metrics, step)
        progress.measured(step, metrics)
        if save:
            self.save_fn(self, metrics)
        return stop, True

    def _diverged(self, metrics: Dict[str, float], step: int) -> None:
        """Record the step, then stop the run (FAILED) without checkpointing it: every later step would
        be NaN too, and the last checkpoint is the one to resume from with other settings."""
        self._log(metrics, step)
        last = self.history.get("loss")
        since = f"; last logged loss {last:.4g}" if last is not None else ""
        raise TrainingDivergedError(
            f"training diverged: loss is {metrics['loss']} at step {step}{since}; not checkpointed. Lower "
            f"optimizer.lr, raise scheduler warmup, or train in bf16/fp32 (model.dtype=fp16 overflows easily)")

    def _stop_requested(self, stopper: StopSignal, force_check: bool) -> bool:
        """Agree across ranks (every STOP_CHECK_EVERY steps and at checkpoint steps), so every
        process checkpoints and exits at the same step; one process needs no agreement."""
        if self.acc.num_processes == 1:
            return stopper.received is not None
        if not force_check and self.step % STOP_CHECK_EVERY != 0:
            return False
        flag = torch.tensor(1 if stopper.received else 0, device=self.acc.device)
        return bool(self.acc.reduce(flag, "sum") > 0)

    def trainer_state(self) -> Dict[str, Any]:
        return {"step": self.step, "history": self.history}

    def load_trainer_state(self, state: Dict[str, Any]) -> None:
        self.step = state["step"]
        self.history = dict(state.get("history", {}))
