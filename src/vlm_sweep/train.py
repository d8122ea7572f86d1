"""The fine-tuning recipe: wires YAML-free components into a run.

config -> model/processor -> data + collate -> peft/freeze -> trainer ->
checkpoint/tracking. Each step is a call into a module that knows nothing
about Hydra; this file is the only place that knows the whole order.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

from omegaconf import DictConfig, OmegaConf

from vlm_sweep.rundir import RunDir, atomic_write
from vlm_sweep.training.precision import precision_name

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    status: str
    step: int
    final_loss: Optional[float]
    first_loss: Optional[float]
    val_loss: Optional[float]
    checkpoint: Optional[str]
    mlflow_run_id: Optional[str]
    mlflow_uri: Optional[str]
    run_dir: str
    stop_signal: Optional[int] = None
    compute_precision: Optional[str] = None  # fp32 | bf16 | fp16: what parallel.mixed_precision resolved to
    # The last value of every validation/eval metric (val_loss, eval/ted_accuracy, ...).
    metrics: Dict[str, float] = field(default_factory=dict)


def resolved_config(cfg: DictConfig) -> Dict[str, Any]:
    """The composed config as plain, resolved, secret-free data."""
    from vlm_sweep.tracking import redact

    return redact(OmegaConf.to_container(cfg, resolve=True))


def run_precision(parallel_cfg: Any, source: str, model_cfg: Any, resume_from: Optional[Path] = None
                  ) -> Tuple[str, str]:
    """(Accelerate's mixed_precision, why): ``auto`` decided for this device, this model's width and the
    precision a resumed checkpoint was trained in (training.precision)."""
    from vlm_sweep.models.load import language_width
    from vlm_sweep.training.checkpoint import trained_precision
    from vlm_sweep.training.precision import resolve_precision

    if parallel_cfg.mixed_precision != "auto":
        return resolve_precision(parallel_cfg.mixed_precision, None)
    return resolve_precision("auto", language_width(source, model_cfg),
                             started_in=trained_precision(resume_from) if resume_from else None)


def _make_accelerator(parallel_cfg: Any, precision: str, why: str) -> Any:
    import torch
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    from accelerate.state import AcceleratorState, GradientState

    # Each run makes its Accelerator afresh: jobs of one sweep in one process (Hydra's basic launcher,
    # tests) may differ in precision, which Accelerate's shared state would refuse. The process group
    # (PartialState) is kept.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    log.info("mixed precision: %s (parallel.mixed_precision=%s; %s)", precision_name(precision),
             parallel_cfg.mixed_precision, why)
    # Under FSDP2 the sharding policy casts parameters; Accelerate's autocast stays off.
    if parallel_cfg.strategy == "fsdp":
        precision = "no"
    from accelerate.utils import DistributedDataParallelKwargs

    # A rank whose batch has no image leaves the vision tower without gradients: DDP must know, or the
    # gradient all-reduce mismatches across ranks (gloo error, NCCL hang). Decided once the trainable
    # parameters are known (distributed.find_unused_parameters), before the model is wrapped.
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=bool(parallel_cfg.find_unused_parameters))]
    if parallel_cfg.backend:
        handlers.append(InitProcessGroupKwargs(backend=parallel_cfg.backend))
    return Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available(),
                       kwargs_handlers=handlers)


def enable_activation_checkpointing(model: Any) -> None:
    """Non-reentrant checkpointing of every block (correct with LoRA, DDP and FSDP2)."""
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    log.info("activation checkpointing on")


def _eval_samples(cfg: DictConfig, datasets: Dict[str, Any]) -> list:
    """The first eval.num_samples good validation records, if generation eval is on."""
    best = cfg.checkpoint.best_metric or ""
    if not (cfg.eval.every_steps or best.startswith("eval/")) or "validation" not in datasets:
        return []
    val = datasets["validation"]
    samples = (val.read(i) for i in range(len(val)))
    return [s for s in samples if s is not None][:cfg.eval.num_samples]


def _truncate_metrics_log(path: Path, step: int) -> None:
    """Drop lines a killed run wrote after its last checkpoint: they are logged again."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
    atomic_write(path, "".join(line + "\n" for line in keep))  # a kill here loses no line


@dataclass
class RunParts:
    """What the recipe builds before any record of the run is touched."""

    accelerator: Any
    model: Any
    processor: Any
    optimizer: Any
    scheduler: Any
    train_loader: Any
    val_loader: Any
    datasets: Dict[str, Any]
    collator: Any
    counts: Dict[str, int]
    precision: str = "no"  # what parallel.mixed_precision resolved to (Accelerate's name: no | bf16 | fp16)


def _build(cfg: DictConfig, run_dir: Path, resume_from: Optional[Path] = None) -> RunParts:
    """Model, data, optimizer: everything heavy, before the run's records change (``resume_from``: the
    checkpoint the run continues from, whose precision auto keeps)."""
    from accelerate.utils import set_seed

    from vlm_sweep.data.collate import VLMCollator
    from vlm_sweep.data.datasets import build_datasets
    from vlm_sweep.data.loaders import build_loaders
    from vlm_sweep.models.load import checked_source, load_model_and_processor
    from vlm_sweep.models.registry import get_family
    from vlm_sweep.training.freeze import apply_freeze, trainable_by_component
    from vlm_sweep.training.peft_methods import apply_peft, check_peft
    from vlm_sweep.training.optim import build_optimizer, build_scheduler

    # Cheap checks first: a model that cannot load (and its width, which auto precision needs), a dead or
    # wrong tracking store, PEFT targets that do not exist on the model, then the data (a missing or
    # unreadable data set is one line in seconds, not after minutes of loading a 12B model).
    source = checked_source(cfg.model)
    precision, why = run_precision(cfg.parallel, source, cfg.model, resume_from)
    accelerator = _make_accelerator(cfg.parallel, precision, why)
    set_seed(cfg.seed)
    family = get_family(cfg.model.family)
    if accelerator.is_main_process:
        from vlm_sweep.tracking import check_tracking

        check_tracking(cfg.tracking, cfg.paths.output_root)
    check_peft(source, cfg.model, family, cfg.peft, cfg.freeze)
    datasets = build_datasets(cfg.dataset)
    model, processor = load_model_and_processor(cfg.model, source)
    if cfg.parallel.activation_checkpointing:
        enable_activation_checkpointing(model)
    model = apply_peft(model, family, cfg.peft, cfg.freeze)
    counts = apply_freeze(model, family, cfg.freeze)
    if counts["trainable_params"] == 0:
        raise ValueError("config error: freeze/peft leave no trainable parameter")
    log.info("peft=%s: trainable %s / total %s parameters (%.2f%%), weights in %s (model.dtype=%s); by "
             "component: %s", cfg.peft.method, f"{counts['trainable_params']:,}", f"{counts['total_params']:,}",
             100 * counts["trainable_params"] / counts["total_params"],
             str(next(model.parameters()).dtype).replace("torch.", ""), cfg.model.dtype,
             trainable_by_component(model, family))

    collator = VLMCollator.for_dataset(processor, cfg.dataset)
    if cfg.dataset.preflight_samples:
        # Every rank checks (same result everywhere), so a refusal stops all before any collective.
        from vlm_sweep.data.preflight import run_preflight
        from vlm_sweep.data.preflight_report import format_report

        report = run_preflight(cfg, processor, family, datasets, collator,
                               sample_size=cfg.dataset.preflight_samples)
        if accelerator.is_main_process:
            log.info("pre-flight check of %d records per split:\n%s", cfg.dataset.preflight_samples,
                     format_report(report))
    train_loader, val_loader = build_loaders(
        cfg.dataset, cfg.step_scheduler, datasets, collator, seed=cfg.seed, rank=accelerator.process_index,
        world_size=accelerator.num_processes, shard_validation=cfg.parallel.strategy != "fsdp",
        pin_memory=accelerator.device.type == "cuda")
    if cfg.parallel.strategy == "fsdp":
        from vlm_sweep.training.distributed import shard_with_fsdp2, sharding_summary

        model = shard_with_fsdp2(model, precision)
        optimizer = build_optimizer(model, cfg.optimizer)  # over the sharded (DTensor) parameters
        summary = sharding_summary(model)
        log.info("FSDP2 rank %d holds %s of %s parameter elements", accelerator.process_index,
                 f"{summary['local_numel']:,}", f"{summary['full_numel']:,}")
        RunDir(run_dir).sharding(accelerator.process_index).write_text(json.dumps(summary))
    else:
        from vlm_sweep.training.distributed import find_unused_parameters

        optimizer = build_optimizer(model, cfg.optimizer)
        if accelerator.ddp_handler is not None and accelerator.num_processes > 1:
            search = find_unused_parameters(model, family, cfg.parallel.find_unused_parameters)
            accelerator.ddp_handler.find_unused_parameters = search
            if accelerator.is_main_process:
                log.info("DDP find_unused_parameters=%s (parallel.find_unused_parameters=%s)", search,
                         "null: on when a vision or audio part trains"
                         if cfg.parallel.find_unused_parameters is None else cfg.parallel.find_unused_parameters)
        model, optimizer = accelerator.prepare(model, optimizer)
    scheduler = build_scheduler(optimizer, cfg.scheduler, cfg.step_scheduler.max_steps, cfg.optimizer.lr)
    return RunParts(accelerator, model, processor, optimizer, scheduler, train_loader, val_loader,
                    datasets, collator, counts, precision)


def _open_tracker(cfg: DictConfig, run_dir: Path, parts: RunParts, resumed_at: Optional[int],
                  config_data: Dict[str, Any], run_info: Optional[Dict[str, Any]]) -> Any:
    """The run's tracker and records: continued on resume, started clean otherwise.

    A fresh start in a dir that already has records (a run killed before its first
    checkpoint) drops them: its metrics.jsonl and its MLflow run, so the run dir holds
    exactly one run whose curve equals an uninterrupted one.
    """
    from vlm_sweep.tracking import discard_run, flatten, make_tracker

    main = parts.accelerator.is_main_process
    tracking_file, metrics_file = RunDir(run_dir).tracking, RunDir(run_dir).metrics
    previous_run = json.loads(tracking_file.read_text())["run_id"] if tracking_file.exists() else None
    if main and resumed_at is None:
        metrics_file.unlink(missing_ok=True)
        if previous_run and cfg.tracking.backend == "mlflow":
            discard_run(cfg.tracking, cfg.paths.output_root, previous_run)
        tracking_file.unlink(missing_ok=True)
    if main and resumed_at is not None:
        _truncate_metrics_log(metrics_file, resumed_at)
    tracker = make_tracker(cfg.tracking, cfg.paths.output_root, main,
                           run_id=previous_run if resumed_at is not None else None, **(run_info or {}))
    if main and tracker.run_id:
        atomic_write(tracking_file, json.dumps({"run_id": tracker.run_id, "uri": tracker.uri}))
        if resumed_at is None or previous_run is None:
            # What auto resolved to on this machine, next to the config's own "auto".
            tracker.log_params({**flatten(config_data), **parts.counts,
                                "compute_precision": precision_name(parts.precision)})
            tracker.log_artifact(str(RunDir(run_dir).config))
        else:
            tracker.backfill(metrics_file, through_step=resumed_at)
    return tracker


class FinetuneRecipe:
    """One fine-tuning run, torchtune-style: ``setup()`` builds the parts and resumes,
    ``train()`` runs the loop, ``cleanup()`` closes the run's records.

    ``run_info`` (parent_run_id, run_name, tags) places the MLflow run inside a sweep.
    ``on_start`` is called once the start is accepted (a resume the checkpoint refuses
    raises in ``setup`` before any record of the run changes).
    """

    def __init__(self, cfg: DictConfig, run_dir: Path, run_info: Optional[Dict[str, Any]] = None,
                 on_start: Optional[Callable[[], None]] = None) -> None:
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.run_info, self.on_start = run_info, on_start
        self.status = "FAILED"
        self.tracker: Any = None

    def setup(self) -> None:
        """Model, data, optimizer, loop and checkpointer; resume from the run's checkpoints if present."""
        from vlm_sweep.tracking import NullTracker
        from vlm_sweep.training.checkpointer import Checkpointer, resume_point
        from vlm_sweep.training.settings import TrainerSettings
        from vlm_sweep.training.trainer import Trainer

        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        resume_from = resume_point(cfg.checkpoint, self.run_dir)  # a wrong checkpoint.resume: one line, now
        self.parts = parts = _build(cfg, self.run_dir, resume_from)
        self.config_data = resolved_config(cfg)
        self.config_yaml = OmegaConf.to_yaml(OmegaConf.create(self.config_data))
        self.checkpointer = Checkpointer(cfg.checkpoint, self.run_dir, accelerator=parts.accelerator,
                                         processor=parts.processor, optimizer=parts.optimizer,
                                         scheduler=parts.scheduler, dataloader=parts.train_loader,
                                         config_yaml=self.config_yaml, resume_from=resume_from,
                                         precision=parts.precision)
        self.trainer = Trainer(settings=TrainerSettings.from_config(cfg), accelerator=parts.accelerator,
                               model=parts.model, optimizer=parts.optimizer, scheduler=parts.scheduler,
                               train_loader=parts.train_loader, val_loader=parts.val_loader, tracker=NullTracker(),
                               run_dir=self.run_dir, save_fn=self.checkpointer.save, processor=parts.processor,
                               eval_samples=_eval_samples(cfg, parts.datasets),
                               media_kwargs=parts.collator.media_kwargs)
        self.checkpointer.resume(self.trainer)  # refuses (CheckpointError) a checkpoint that does not fit

    def train(self) -> RunResult:
        """The start is accepted: write the run's records and train to max_steps (or a stop signal)."""
        if self.on_start is not None:
            self.on_start()
        if self.parts.accelerator.is_main_process:
            atomic_write(RunDir(self.run_dir).config, self.config_yaml)
        self.trainer.tracker = self.tracker = _open_tracker(
            self.cfg, self.run_dir, self.parts, self.checkpointer.resumed_at, self.config_data, self.run_info)
        try:
            self.status = self.trainer.fit()
        except KeyboardInterrupt:
            self.status = "KILLED"
            raise
        return self.result()

    def cleanup(self) -> None:
        """Close the tracked run with its final status (also after an error or Ctrl-C)."""
        if self.tracker is not None:
            self.tracker.finish(self.status)

    def result(self) -> RunResult:
        trainer, saved, history = self.trainer, self.checkpointer.last_saved, self.trainer.history
        return RunResult(
            status=self.status, step=trainer.step, final_loss=history.get("loss"),
            first_loss=history.get("first_loss"), val_loss=history.get("val_loss"),
            checkpoint=str(saved) if saved else None, mlflow_run_id=self.tracker.run_id,
            mlflow_uri=self.tracker.uri, run_dir=str(self.run_dir), stop_signal=trainer.stop_signal,
            metrics={k: v for k, v in history.items() if k == "val_loss" or k.startswith("eval/")},
            compute_precision=precision_name(self.parts.precision))


def run(cfg: DictConfig, run_dir: Path, run_info: Optional[Dict[str, Any]] = None,
        on_start: Optional[Callable[[], None]] = None) -> RunResult:
    """Train the configured run inside ``run_dir``; resumes from its checkpoints if present."""
    recipe = FinetuneRecipe(cfg, run_dir, run_info, on_start)
    recipe.setup()
    try:
        return recipe.train()
    finally:
        recipe.cleanup()
