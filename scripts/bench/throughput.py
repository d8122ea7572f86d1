"""One training-loop variant in its own process, timed in rounds the parent interleaves.

    python scripts/bench/throughput.py VARIANT SIZE WARMUP STEPS ROUNDS [OVERRIDE ...]

VARIANT: real (vlm_sweep's Trainer over its DataLoader), bare (a plain PyTorch loop over the
same batches, collated up front), hf (transformers.Trainer), trl (trl.SFTTrainer; both read the
same records in the same order through vlm_sweep's collator, with the same DataLoader worker
settings). All four build the same model, LoRA, optimizer and lr schedule from the same config
and seed, and train on the same sequence of micro-batches.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import Channel, Pacer, build_parts, loop_config, step_tokens  # noqa: E402


def run_real(cfg: Any, pacer: Pacer, run_dir: Path) -> None:
    """launch.py's loop: train._build + Trainer.fit, tracking none, nothing due but logging."""
    from vlm_sweep.tracking import NullTracker
    from vlm_sweep.train import _build
    from vlm_sweep.training.settings import TrainerSettings
    from vlm_sweep.training.trainer import Trainer

    parts = _build(cfg, run_dir)
    trainer = Trainer(settings=TrainerSettings.from_config(cfg), accelerator=parts.accelerator, model=parts.model, optimizer=parts.optimizer,
                      scheduler=parts.scheduler, train_loader=parts.train_loader, val_loader=None,
                      tracker=NullTracker(), run_dir=run_dir, save_fn=lambda trainer, metrics: None,
                      processor=parts.processor, eval_samples=[], media_kwargs=parts.collator.media_kwargs)
    step = trainer.train_step

    def paced_step() -> Any:  # instrumentation only: the step itself is the Trainer's
        stats = step()
        pacer.step_done(stats.tokens, lambda: float(stats.loss_sum) / max(stats.label_tokens, 1))
        return stats

    trainer.train_step = paced_step
    trainer.fit()
    trainer._batches = None  # shut the loader's workers down before the interpreter exits


def run_bare(cfg: Any, pacer: Pacer, total: int) -> None:
    """The floor: the same loss, backward, clipping and AdamW step, nothing else."""
    import torch

    from vlm_sweep.training.loss import count_label_tokens, summed_token_loss

    parts = build_parts(cfg)
    batches = parts.collate_in_order(total * parts.accum)
    model, optimizer, scheduler = parts.model, parts.optimizer, parts.scheduler
    trainable = [p for p in model.parameters() if p.requires_grad]
    max_norm = cfg.optimizer.max_grad_norm or float("inf")
    model.train()
    for i in range(total):
        micro = batches[i * parts.accum:(i + 1) * parts.accum]
        label_tokens = sum(count_label_tokens(b) for b in micro)
        loss_sum = torch.zeros(())
        for batch in micro:
            summed = summed_token_loss(model, batch)
            (summed / max(label_tokens, 1)).backward()
            loss_sum += summed.detach()
        torch.nn.utils.clip_grad_norm_(trainable, max_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        pacer.step_done(step_tokens(micro), lambda: float(loss_sum) / max(label_tokens, 1))


class RecordCollator:
    """HF/TRL side: a feature is {"idx": record index}; the batch is vlm_sweep's collator on those records."""

    def __init__(self, dataset: Any, collator: Any) -> None:
        self.dataset, self.collator = dataset, collator

    def __call__(self, features: List[Dict[str, int]]) -> Dict[str, Any]:
        batch = self.collator([self.dataset[f["idx"]] for f in features])
        return {k: v for k, v in batch.items() if k not in ("num_skipped", "record_ids")}  # not model inputs


def _hf_kwargs(cfg: Any, parts: Any, total: int, out_dir: Path) -> Dict[str, Any]:
    """TrainingArguments matching the run: same steps, batch, accumulation, clipping, seed, fp32, and the
    same DataLoader workers/prefetch; records in the run's order; no saving or eval."""
    from vlm_sweep.data.loaders import loader_options, resolve_num_workers

    workers = loader_options(resolve_num_workers(cfg.dataset.num_workers), pin_memory=False)
    return dict(output_dir=str(out_dir), max_steps=total, per_device_train_batch_size=parts.micro,
                gradient_accumulation_steps=parts.accum, max_grad_norm=cfg.optimizer.max_grad_norm or 0.0,
                seed=cfg.seed, save_strategy="no", eval_strategy="no", report_to="none", use_cpu=True,
                bf16=False, fp16=False, remove_unused_columns=False, disable_tqdm=True,
                train_sampling_strategy="sequential", dataloader_num_workers=workers["num_workers"],
                dataloader_persistent_workers=workers.get("persistent_workers", False),
                dataloader_prefetch_factor=workers.get("prefetch_factor"), dataloader_pin_memory=False)


def run_hf(cfg: Any, pacer: Pacer, total: int, out_dir: Path, trl: bool) -> None:
    """transformers.Trainer (or TRL's SFTTrainer): our model/LoRA/optimizer/schedule, collator and records."""
    from datasets import Dataset
    from transformers import Trainer, TrainerCallback, TrainingArguments

    parts = build_parts(cfg)
    micro_batches = (total + 1) * parts.accum  # +1 step: the loader reads ahead
    batches = parts.collate_in_order(total * parts.accum)  # only to count each step's tokens
    tokens = [step_tokens(batches[i * parts.accum:(i + 1) * parts.accum]) for i in range(total)]
    del batches
    records = Dataset.from_dict({"idx": parts.record_order(micro_batches)})

    class Paced(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            pacer.step_done(tokens[state.global_step - 1])

    kwargs = _hf_kwargs(cfg, parts, total, out_dir)
    common = dict(model=parts.model, train_dataset=records, data_collator=RecordCollator(parts.dataset, parts.collator),
                  optimizers=(parts.optimizer, parts.scheduler), callbacks=[Paced()])
    if trl:
        from trl import SFTConfig, SFTTrainer

        args = SFTConfig(**kwargs, activation_checkpointing=False, dataset_kwargs={"skip_prepare_dataset": True})
        trainer = SFTTrainer(args=args, processing_class=parts.processor, **common)
    else:
        trainer = Trainer(args=TrainingArguments(**kwargs), **common)
    trainer.train()


def main(argv: List[str]) -> int:
    import logging

    # As launch.py's Hydra job logging: INFO records (the Trainer's per-step progress line) are written.
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    variant, size = argv[0], argv[1]
    warmup, steps, rounds = (int(a) for a in argv[2:5])
    channel = Channel()
    total = warmup + steps * rounds
    cfg = loop_config(size, total, argv[5:])
    pacer = Pacer(channel, warmup, steps, rounds)
    with tempfile.TemporaryDirectory(prefix=f"bench-{variant}-") as tmp:
        if variant == "real":
            run_real(cfg, pacer, Path(tmp))
        elif variant == "bare":
            run_bare(cfg, pacer, total)
        elif variant in ("hf", "trl"):
            run_hf(cfg, pacer, total, Path(tmp), trl=variant == "trl")
        else:
            raise SystemExit(f"unknown variant {variant!r}")
    channel.send(event="done")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
