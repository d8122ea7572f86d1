"""The training loop: one readable place, driven by the config.

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
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import torch

from vlm_sweep.training.loss import count_label_tokens, summed_token_loss
from vlm_sweep.training.distributed import full_tensor, is_fsdp, no_gradient_sync, unsharded

log = logging.getLogger(__name__)

@dataclass
class StepStats:
    loss: float
    label_tokens: int
    grad_norm: float
    tokens: int
    skipped: int


def to_device(batch: Dict[str, Any], device: torch.device) -> Dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


class StopSignal:
    """SIGTERM/SIGUSR2 (what a cluster sends before preemption) and Ctrl-C request a checkpoint and exit.

    The first signal is honoured at the next step boundary (every rank at the same step); a
    second Ctrl-C stops at once (KeyboardInterrupt), keeping the previous checkpoint.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT)

    def __init__(self) -> None:
        self.received: Optional[int] = None
        self._previous = {}
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt
        if signum == signal.SIGINT:
            log.warning("Ctrl-C: checkpointing at the end of this step (press Ctrl-C again to stop now)")
        self.received = signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class StoppedWhileReading(RuntimeError):
    """A stop signal arrived while the loop was waiting for usable data (no step to finish)."""


class DataHealth:
    """Counts usable vs skipped training records; fails when too few are usable to train on.

    With ``on_bad_record=skip`` a data set of bad records would otherwise be skipped forever.
    Checked once at least one epoch's worth (or 200) of records has been read.
    """

    def __init__(self, num_records: int, min_usable_fraction: float, name: str) -> None:
        self.num_records = num_records
        self.min_fraction = min_usable_fraction
        self.name = name
        self.usable = 0
        self.skipped = 0

    def update(self, usable: int, skipped: int) -> None:
        self.usable += usable
        self.skipped += skipped
        seen = self.usable + self.skipped
        if seen < min(self.num_records, 200) or self.skipped == 0:
            return
        fraction = self.usable / seen
        if self.usable == 0 or fraction < self.min_fraction:
            from vlm_sweep.data.datasets import BadRecordError

            raise BadRecordError(
                f"{self.name}: only {self.usable} of the {seen} training records read so far are usable "
                f"({fraction:.0%} < dataset.min_usable_fraction={self.min_fraction}); the skipped-record "
                f"lines above say why (python -m vlm_sweep.inspect checks the whole data set)")


class Trainer:
    """Owns the loop; the recipe (vlm_sweep.train) builds and hands it the parts."""

    def __init__(self, *, cfg: Any, accelerator: Any, model: Any, optimizer: Any, scheduler: Any,
                 train_loader: Any, val_loader: Any, tracker: Any, run_dir: Path,
                 save_fn: Any, processor: Any = None, eval_samples: Optional[List[Any]] = None,
                 media_kwargs: Any = None) -> None:
        self.cfg = cfg
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
        # Steps already in the tracker (a resumed run does not log them twice).
        self.tracker_logged_through = 0
        self.stop_signal: Optional[int] = None
        steps = cfg.step_scheduler
        self.accum = steps.global_batch_size // (steps.micro_batch_size * accelerator.num_processes)
        self.step = 0
        self.history: Dict[str, Any] = {}
        self._batches: Optional[Iterator[Dict[str, Any]]] = None
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.fsdp = is_fsdp(model)
        self.stopper: Optional[StopSignal] = None
        self.data_health = DataHealth(len(train_loader.dataset), cfg.dataset.min_usable_fraction,
                                      cfg.dataset.name)

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
            batch = next(self._batches)
            skipped += batch["num_skipped"]
            self.data_health.update(len(batch["record_ids"]), batch["num_skipped"])
            if "input_ids" in batch:
                batch["num_skipped"] = skipped
                return batch
            if self.stopper is not None and self.stopper.received:
                raise StoppedWhileReading(f"stopped by signal {self.stopper.received} while reading data")

    # -- one optimizer step -------------------------------------------------------------
    def train_step(self) -> StepStats:
        micro = [self.next_batch() for _ in range(self.accum)]  # kept on CPU until used
        local_tokens = sum(count_label_tokens(b) for b in micro)
        global_tokens = int(self.acc.reduce(torch.tensor(local_tokens, device=self.acc.device), "sum"))
        scale = self.acc.num_processes / max(global_tokens, 1)
        loss_sum = torch.zeros((), device=self.acc.device)
        for i, batch in enumerate(micro):
            batch = to_device(batch, self.acc.device)
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
        tokens = float(sum(int(b["attention_mask"].sum()) for b in micro))
        # One all-reduce for both logged sums.
        total_loss, total_tokens = self.acc.reduce(
            torch.stack([loss_sum, torch.tensor(tokens, device=self.acc.device)]), "sum").tolist()
        return StepStats(
            loss=total_loss / global_tokens if global_tokens else 0.0,
            label_tokens=global_tokens,
            grad_norm=grad_norm,
            tokens=int(total_tokens),
            skipped=sum(b["num_skipped"] for b in micro),
        )

    def _clip_gradients(self) -> float:
        """Clip to optimizer.max_grad_norm (inf: measure only); returns the pre-clip norm."""
        max_norm = self.cfg.optimizer.max_grad_norm or float("inf")
        if self.fsdp:
            norm = full_tensor(torch.nn.utils.clip_grad_norm_(self.trainable, max_norm))
        else:
            norm = self.acc.clip_grad_norm_(self.trainable, max_norm)
        value = float(norm)
        return value if math.isfinite(value) else float("nan")

    # -- validation ---------------------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> Optional[float]:
        """Token-weighted validation loss over (at most max_val_batches of) the split."""
        if self.val_loader is None:
            return None
        self.model.eval()
        loss_sum = torch.zeros((), device=self.acc.device)
        tokens = torch.zeros((), device=self.acc.device)
        limit = self.cfg.step_scheduler.max_val_batches
        for i, batch in enumerate(self.val_loader):
            if limit is not None and i >= limit:
                break
            if "input_ids" not in batch:
                continue
            batch = to_device(batch, self.acc.device)
            with self.acc.autocast():
                loss_sum += summed_token_loss(self.model, batch)
            tokens += count_label_tokens(batch)
        self.model.train()
        total_tokens = float(self.acc.reduce(tokens, "sum"))
        return float(self.acc.reduce(loss_sum, "sum")) / total_tokens if total_tokens else None

    def evaluate_generation(self) -> Dict[str, float]:
        """Generate on the eval records and score them with the task metric (``eval/<name>``)."""
        from vlm_sweep.evaluation import evaluate_samples
        from vlm_sweep.generation import SamplingConfig

        ecfg = self.cfg.eval
        model = self.acc.unwrap_model(self.model)
        model.eval()
        with self.acc.autocast(), unsharded(model):
            metrics, _ = evaluate_samples(
                model, self.processor, self.eval_samples, self.cfg.dataset.format,
                SamplingConfig(max_new_tokens=ecfg.max_new_tokens), batch_size=ecfg.batch_size,
                # Under FSDP every rank must run the same forwards: each generates for all records.
                rank=0 if self.fsdp else self.acc.process_index,
                world_size=1 if self.fsdp else self.acc.num_processes, media_kwargs=self.media_kwargs)
        self.model.train()
        return {f"eval/{k}": v for k, v in metrics.items()}

    # -- the loop -----------------------------------------------------------------------
    def _log(self, metrics: Dict[str, float], step: int) -> None:
        if not self.acc.is_main_process:
            return
        if step > self.tracker_logged_through:
            self.tracker.log_metrics(metrics, step)
        with open(self.run_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps({"step": step, **metrics}) + "\n")

    def _measure(self, metrics: Dict[str, float], *, val: bool, gen: bool) -> bool:
        """Add val_loss / eval metrics when due; True if anything was measured."""
        before = len(metrics)
        if val:
            val_loss = self.validate()
            if val_loss is not None:
                metrics["val_loss"] = self.history["val_loss"] = val_loss
        if gen and self.eval_samples:
            scores = self.evaluate_generation()
            metrics.update(scores)
            self.history.update(scores)
        return len(metrics) > before

    def fit(self) -> str:
        """Train to max_steps (or until a stop signal). Returns the final MLflow status."""
        steps = self.cfg.step_scheduler
        self.stopper = stopper = StopSignal()
        progress = None
        if self.acc.is_main_process:
            from tqdm.auto import tqdm

            progress = tqdm(total=steps.max_steps, initial=self.step, desc="train", dynamic_ncols=True)
        self.model.train()
        status = "FINISHED"
        try:
            while self.step < steps.max_steps:
                started = time.perf_counter()
                try:
                    stats = self.train_step()
                except StoppedWhileReading:
                    log.warning("signal %s received while reading data: exiting; the run resumes from "
                                "its last checkpoint", stopper.received)
                    self.stop_signal = stopper.received
                    return "KILLED"
                self.step += 1
                elapsed = time.perf_counter() - started
                metrics = {
                    "loss": stats.loss,
                    "lr": self.scheduler.get_last_lr()[0],
                    "grad_norm": stats.grad_norm,
                    "label_tokens": stats.label_tokens,
                    "tokens_per_s": stats.tokens / elapsed,
                    "peak_memory_gb": peak_memory_gb(self.acc.device),
                }
                if stats.skipped:
                    metrics["skipped_records"] = stats.skipped
                self.history["loss"] = stats.loss
                self.history.setdefault("first_loss", stats.loss)
                last = self.step == steps.max_steps
                stop = self._stop_requested(stopper)
                save = stop or last or self.step % steps.ckpt_every_steps == 0
                best = self.cfg.checkpoint.best_metric if save else None
                every_eval = self.cfg.eval.every_steps
                measured = self._measure(
                    metrics,
                    val=last or self.step % steps.val_every_steps == 0 or best == "val_loss",
                    gen=bool(every_eval) and (last or self.step % every_eval == 0)
                    or bool(best and best.startswith("eval/")),
                )
                if self.step % steps.log_every_steps == 0 or last or measured:
                    self._log(metrics, self.step)
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(loss=f"{stats.loss:.4f}", lr=f"{metrics['lr']:.2e}")
                if save:
                    self.save_fn(self, metrics)
                if stop:
                    log.warning("signal %s received: checkpointed at step %d, exiting", stopper.received,
                                self.step)
                    status = "KILLED"
                    self.stop_signal = stopper.received
                    break
        finally:
            stopper.restore()
            self.stopper = None
            if progress is not None:
                progress.close()
        return status

    def _stop_requested(self, stopper: StopSignal) -> bool:
        """Agree across ranks, so every process checkpoints and exits at the same step."""
        flag = torch.tensor(1 if stopper.received else 0, device=self.acc.device)
        return bool(self.acc.reduce(flag, "sum") > 0)

    def trainer_state(self) -> Dict[str, Any]:
        return {"step": self.step, "history": self.history}

    def load_trainer_state(self, state: Dict[str, Any]) -> None:
        self.step = state["step"]
        self.history = dict(state.get("history", {}))
