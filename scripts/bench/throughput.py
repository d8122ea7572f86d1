"""One training-loop variant in its own process, timed in rounds the parent interleaves.

    python scripts/bench/throughput.py VARIANT SIZE WARMUP STEPS ROUNDS [OVERRIDE ...]

VARIANT: real (vlm_sweep's Trainer over its DataLoader), bare (a plain PyTorch loop over the
same batches, collated up front), hf (transformers.Trainer), trl (trl.SFTTrainer). All four
build the same model, LoRA, optimizer and lr schedule from the same config and seed, and
train on the same sequence of micro-batches.
"""

from __future__ import annotations

import itertools
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import Channel, Pacer, build_parts, loop_config, precollate, step_tokens  # noqa: E402


def run_real(cfg: Any, pacer: Pacer, run_dir: Path) -> None:
    """launch.py's loop: train._build + Trainer.fit, tracking none, nothing due but logging."""
    from vlm_sweep.tracking import NullTracker
    from vlm_sweep.train import _build
    from vlm_sweep.training.trainer import Trainer

    parts = _build(cfg, run_dir)
    trainer = Trainer(cfg=cfg, accelerator=parts.accelerator, model=parts.model, optimizer=parts.optimizer,
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
    batches = precollate(parts.train_loader, total * parts.accum)
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


class _Feed:
    """Collator handing out the pre-collated micro-batches in order (the sampled indices are ignored)."""

    def __init__(self, batches: List[Dict[str, Any]]) -> None:
        drop = ("num_skipped", "record_ids")  # bookkeeping, not model inputs
        self._next = itertools.cycle([{k: v for k, v in b.items() if k not in drop} for b in batches])

    def __call__(self, features: Any) -> Dict[str, Any]:
        return dict(next(self._next))


def _hf_kwargs(cfg: Any, total: int, accum: int, out_dir: Path) -> Dict[str, Any]:
    """TrainingArguments matching the run: same steps, accumulation, clipping, seed, fp32; no saving/eval."""
    return dict(output_dir=str(out_dir), max_steps=total, per_device_train_batch_size=1,
                gradient_accumulation_steps=accum, max_grad_norm=cfg.optimizer.max_grad_norm or 0.0,
                seed=cfg.seed, save_strategy="no", eval_strategy="no", report_to="none", use_cpu=True,
                bf16=False, fp16=False, dataloader_num_workers=0, dataloader_pin_memory=False,
                remove_unused_columns=False, disable_tqdm=True)


def run_hf(cfg: Any, pacer: Pacer, total: int, out_dir: Path, trl: bool) -> None:
    """transformers.Trainer (or TRL's SFTTrainer) with our model/optimizer/schedule and batches."""
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    parts = build_parts(cfg)
    batches = precollate(parts.train_loader, (total + 1) * parts.accum)  # +1: the loader reads ahead
    tokens = [step_tokens(batches[i * parts.accum:(i + 1) * parts.accum]) for i in range(total)]

    class Paced(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            pacer.step_done(tokens[state.global_step - 1])

    kwargs = _hf_kwargs(cfg, total, parts.accum, out_dir)
    common = dict(model=parts.model, data_collator=_Feed(batches), optimizers=(parts.optimizer, parts.scheduler),
                  callbacks=[Paced()])
    if trl:
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer

        args = SFTConfig(**kwargs, gradient_checkpointing=False, dataset_kwargs={"skip_prepare_dataset": True})
        trainer = SFTTrainer(args=args, train_dataset=Dataset.from_dict({"idx": list(range(len(batches)))}),
                             processing_class=parts.processor, **common)
    else:
        feed = torch.utils.data.TensorDataset(torch.arange(len(batches)))
        trainer = Trainer(args=TrainingArguments(**kwargs), train_dataset=feed, **common)
    trainer.train()


def main(argv: List[str]) -> int:
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
