"""Checkpoints: written atomically, loaded without unpickling arbitrary objects.

Layout under the run dir::

    checkpoints/
      LATEST                     # name of the newest complete checkpoint
      step_<N>/
        model/                   # PEFT adapter (PeftModel.from_pretrained) or full HF model,
                                 # plus the processor, so the dir loads on its own
        consolidated/            # save_consolidated with LoRA: the merged full HF model
        training_state/          # optimizer, scheduler, trainer state, per-rank RNG + data position
        config.yaml              # the composed config (secrets redacted)

A checkpoint is assembled in ``.tmp_step_<N>``, fsynced, renamed into place, and
only then does LATEST move (itself replaced atomically). A crash at any point
leaves the previous checkpoint and LATEST valid.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch

from vlm_sweep.training.distributed import (full_model_state, full_optimizer_state, full_trainable_state,
                                            is_fsdp, load_full_states)

LATEST = "LATEST"
BEST = "BEST"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not fit the config."""


def _fsync_tree(path: Path) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            with open(Path(root) / name, "rb") as fh:
                os.fsync(fh.fileno())
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def rng_state() -> Dict[str, Any]:
    """Every RNG this process draws from, as plain tensors/lists (weights_only-loadable)."""
    np_state = np.random.get_state()
    state = {
        "python": list(random.getstate()[1]) + [random.getstate()[2]],
        "python_version": random.getstate()[0],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    internal = tuple(int(x) for x in state["python"][:-1])
    random.setstate((state["python_version"], internal, state["python"][-1]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def latest_checkpoint(checkpoint_root: Path) -> Optional[Path]:
    """The checkpoint LATEST names, or None when there is none yet."""
    pointer = checkpoint_root / LATEST
    if not pointer.exists():
        return None
    path = checkpoint_root / pointer.read_text().strip()
    if not (path / "training_state" / "trainer_state.json").exists():
        raise CheckpointError(f"{pointer} names {path}, which is not a complete checkpoint")
    return path


def resolve_resume(checkpoint_cfg: Any, checkpoint_root: Path) -> Optional[Path]:
    """auto -> LATEST if any; none -> fresh start; anything else -> that checkpoint dir."""
    if checkpoint_cfg.resume == "none":
        return None
    if checkpoint_cfg.resume == "auto":
        return latest_checkpoint(checkpoint_root)
    path = Path(checkpoint_cfg.resume)
    if (path / LATEST).exists():
        return latest_checkpoint(path)
    if not (path / "training_state" / "trainer_state.json").exists():
        raise CheckpointError(f"checkpoint.resume={path} is not a checkpoint dir (no training_state/)")
    return path


def save_model_dir(model: Any, processor: Any, out: Path, save_format: str,
                   state_dict: Optional[Dict[str, torch.Tensor]] = None) -> None:
    """Adapter or full model in Hugging Face form, plus the processor.

    ``state_dict``: the full (gathered) weights when the model is sharded.
    """
    out.mkdir(parents=True, exist_ok=True)
    extra = {} if state_dict is None else {"state_dict": state_dict}
    if hasattr(model, "peft_config"):
        model.save_pretrained(out, safe_serialization=save_format == "safetensors", **extra)
    elif save_format == "safetensors":
        model.save_pretrained(out, **extra)
    else:
        model.config.save_pretrained(out)
        torch.save(state_dict if state_dict is not None else model.state_dict(), out / "pytorch_model.bin")
    processor.save_pretrained(out)


def trainable_state_dict(model: Any) -> Dict[str, torch.Tensor]:
    """Only the parameters that train (adapter weights under LoRA)."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(
    root: Path,
    step: int,
    *,
    accelerator: Any,
    model: Any,
    processor: Any,
    optimizer: Any,
    scheduler: Any,
    dataloader: Any,
    trainer_state: Dict[str, Any],
    config_yaml: str,
    checkpoint_cfg: Any,
    is_best: bool = False,
) -> Path:
    """Write step_<N> atomically on all ranks; rank 0 moves LATEST (and BEST) and prunes old ones."""
    name = f"step_{step}"
    final, tmp = root / name, root / f".tmp_{name}"
    rank = accelerator.process_index
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / "training_state").mkdir(parents=True)
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    state_dir = tmp / "training_state"
    # Per-rank: RNG and data position differ between processes.
    torch.save({"rng": rng_state(), "dataloader": dataloader.state_dict()}, state_dir / f"rank_{rank}.pt")
    sharded = is_fsdp(unwrapped)
    if sharded:  # gathering full tensors is a collective: every rank takes part
        full_model, weights = full_model_state(unwrapped), full_trainable_state(unwrapped)
        optimizer_state = full_optimizer_state(unwrapped, optimizer)
    if accelerator.is_main_process:
        if not sharded:
            full_model, optimizer_state = None, optimizer.state_dict()
            weights = {k: v.detach().cpu() for k, v in trainable_state_dict(unwrapped).items()}
        save_model_dir(unwrapped, processor, tmp / "model", checkpoint_cfg.model_save_format, full_model)
        torch.save(weights, state_dir / "trainable.pt")
        torch.save(optimizer_state, state_dir / "optimizer.pt")
        torch.save(scheduler.state_dict(), state_dir / "scheduler.pt")
        (tmp / "config.yaml").write_text(config_yaml)
        if checkpoint_cfg.save_consolidated and hasattr(unwrapped, "peft_config"):
            from vlm_sweep.export import export_checkpoint

            export_checkpoint(str(tmp), str(tmp / "consolidated"), merge_lora=True)
        (state_dir / "trainer_state.json").write_text(
            json.dumps({**trainer_state, "world_size": accelerator.num_processes, "fsdp": sharded}, indent=2))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _fsync_tree(tmp)
        if final.exists():  # a stale one from a previous attempt at this step
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_atomic_text(root / LATEST, name + "\n")
        if is_best:
            mark_best(root, name)
        prune_checkpoints(root, checkpoint_cfg.keep_last, keep=name)
    accelerator.wait_for_everyone()
    return final


def mark_best(root: Path, name: str) -> None:
    """Point BEST at checkpoint ``name`` (atomically)."""
    _write_atomic_text(root / BEST, name + "\n")


def is_better(value: float, best: Optional[float], mode: str) -> bool:
    return best is None or (value > best if mode == "max" else value < best)


def prune_checkpoints(root: Path, keep_last: int, keep: str) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints (never BEST's; stale temp dirs too)."""
    for stale in root.glob(".tmp_step_*"):
        shutil.rmtree(stale, ignore_errors=True)
    protected = {keep}
    if (root / BEST).exists():
        protected.add((root / BEST).read_text().strip())
    steps = sorted((int(p.name.split("_")[1]), p) for p in root.glob("step_*") if p.name not in protected)
    survivors = keep_last - 1
    for _, path in steps[:max(len(steps) - survivors, 0)]:
        shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(
    path: Path,
    *,
    accelerator: Any,
    model: Any,
    optimizer: Any,
    scheduler: Any,
    dataloader: Any,
) -> Dict[str, Any]:
    """Restore weights, optimizer, scheduler, RNG and data position; returns trainer state."""
    state_dir = path / "training_state"
    trainer_state = json.loads((state_dir / "trainer_state.json").read_text())
    if trainer_state["world_size"] != accelerator.num_processes:
        raise CheckpointError(
            f"{path} was written by {trainer_state['world_size']} processes, this run has "
            f"{accelerator.num_processes}; resume with the same number of processes")
    unwrapped = accelerator.unwrap_model(model)
    sharded = is_fsdp(unwrapped)
    if trainer_state.get("fsdp", False) != sharded:
        raise CheckpointError(f"{path} was written {'with' if trainer_state.get('fsdp') else 'without'} "
                              f"parallel.strategy=fsdp; resume it with the same strategy")
    weights = torch.load(state_dir / "trainable.pt", weights_only=True, map_location="cpu")
    expected = set(trainable_state_dict(unwrapped))
    if set(weights) != expected:
        missing, extra = sorted(expected - set(weights))[:3], sorted(set(weights) - expected)[:3]
        raise CheckpointError(
            f"{path} does not fit this config (peft/freeze/model differ): trainable parameters "
            f"missing from it {missing}, unexpected in it {extra}")
    optimizer_state = torch.load(state_dir / "optimizer.pt", weights_only=True)
    if sharded:
        load_full_states(unwrapped, optimizer, weights, optimizer_state)
    else:
        params = dict(unwrapped.named_parameters())
        with torch.no_grad():
            for name, tensor in weights.items():
                params[name].copy_(tensor)
        optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(torch.load(state_dir / "scheduler.pt", weights_only=True))
    per_rank = torch.load(state_dir / f"rank_{accelerator.process_index}.pt", weights_only=True)
    dataloader.load_state_dict(per_rank["dataloader"])
    set_rng_state(per_rank["rng"])
    return trainer_state
