"""Checkpoints: written atomically, verified before use, loaded without unpickling arbitrary objects.

Layout under the run dir::

    checkpoints/
      LATEST                     # name of the newest complete checkpoint
      BEST                       # name of the best one (checkpoint.best_metric), if set
      step_<N>/
        model/                   # PEFT adapter (PeftModel.from_pretrained) or full HF model,
                                 # plus the processor, so the dir loads on its own
        consolidated/            # save_consolidated with LoRA: the merged full HF model
        training_state/          # optimizer, scheduler, trainer state, per-rank RNG + data position,
                                 # trained weights (trainable.pt and/or weights_in_model.json)
        config.yaml              # the composed config (secrets redacted)
        manifest.json            # every file's size and CRC32, written last

A checkpoint is assembled in ``.tmp_step_<N>``, its file modes set from the umask, its
manifest written, fsynced, renamed into place, and only then does LATEST move (itself
replaced atomically). A crash at any point leaves the previous checkpoint and LATEST valid;
a failed write (a full disk) removes the temporary dir and says which checkpoint a rerun
resumes from. Resuming verifies the checkpoint against its manifest and falls back to the
newest older one that verifies.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from vlm_sweep.rundir import LATEST, CheckpointDir, step_name, tmp_name, write_pointer
from vlm_sweep.training.checkpoint_manifest import (CheckpointError, apply_umask_modes, checkpoint_bytes,
                                                    verify_checkpoint, write_manifest)
from vlm_sweep.training.checkpoint_select import (best_checkpoint, is_better, latest_checkpoint,
                                                  mark_best, previous_checkpoint, prune_checkpoints,
                                                  resolve_resume, step_dirs)
from vlm_sweep.training.checkpoint_weights import map_to_model_dir, trained_weights
from vlm_sweep.training.distributed import (full_model_state, full_optimizer_state, full_trainable_state,
                                            is_fsdp, load_full_states)

__all__ = ["CheckpointError", "best_checkpoint", "is_better", "latest_checkpoint",
           "load_checkpoint", "mark_best", "prune_checkpoints", "resolve_resume", "save_checkpoint",
           "step_dirs", "trained_precision", "trained_weights", "verify_checkpoint"]

log = logging.getLogger(__name__)

# The trainer-state key holding the compute precision a checkpoint was trained in (Accelerate's name).
PRECISION_KEY = "compute_precision"


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


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _tensor_bytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def estimate_checkpoint_bytes(root: Path, model: Any, optimizer: Any) -> int:
    """About how much the next checkpoint takes: the previous one's size, else its tensors' size."""
    previous = previous_checkpoint(root)
    if previous is not None:
        return checkpoint_bytes(previous)
    trainable = _tensor_bytes(p for p in model.parameters() if p.requires_grad)
    peft = hasattr(model, "peft_config")
    model_dir = trainable if peft else _tensor_bytes(model.state_dict().values())
    optimizer_bytes = _tensor_bytes(t for state in optimizer.state.values() for t in state.values())
    if not optimizer_bytes:  # before the first step: Adam keeps two fp32 moments per trained element
        optimizer_bytes = 2 * 4 * sum(p.numel() for p in model.parameters() if p.requires_grad)
    stored_twice = trainable if (peft or is_fsdp(model)) else 0
    return model_dir + stored_twice + optimizer_bytes


def _free_bytes(path: Path) -> int:
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def _check_space(root: Path, name: str, model: Any, optimizer: Any) -> Tuple[int, int]:
    """(bytes needed, bytes free); a warning when it will not fit."""
    needed, free = estimate_checkpoint_bytes(root, model, optimizer), _free_bytes(root)
    if free < needed:
        log.warning("checkpoint %s needs about %s, but only %s is free on %s; it will likely fail "
                    "(the previous checkpoint stays intact)", name, _gb(needed), _gb(free), root)
    return needed, free


def _is_write_error(err: BaseException) -> bool:
    """An I/O failure while writing (torch and safetensors do not raise OSError for a full disk)."""
    text = str(err)
    return isinstance(err, OSError) or type(err).__name__ == "SafetensorError" or any(
        marker in text for marker in ("No space left", "inline_container", "PytorchStreamWriter", "os error"))


def _write_failed(err: BaseException, root: Path, name: str, space: Tuple[int, int], free_now: int) -> CheckpointError:
    """One line: what failed, the space needed/free, and the checkpoint a rerun resumes from."""
    full = getattr(err, "errno", None) == errno.ENOSPC or "No space left" in str(err) or free_now < (16 << 20)
    reason = "no space left on device" if full else (str(err).splitlines() or [type(err).__name__])[0]
    previous = previous_checkpoint(root)
    after = (f"the previous checkpoint {previous} is intact and a rerun of the same command resumes from it"
             if previous else "there is no earlier checkpoint, so a rerun starts from step 0")
    return CheckpointError(
        f"could not write checkpoint {root / name}: {reason} (needs about {_gb(space[0])}, {_gb(space[1])} was "
        f"free, {_gb(free_now)} when it failed); removed the partial {tmp_name(name)}; {after}")


def _write_main_files(tmp: Path, unwrapped: Any, processor: Any, optimizer_state: Any, scheduler: Any,
                      weights: Dict[str, torch.Tensor], full_model: Any, config_yaml: str,
                      checkpoint_cfg: Any, trainer_state: Dict[str, Any]) -> None:
    """Everything rank 0 writes; each trained weight once (see checkpoint_weights)."""
    ck = CheckpointDir(tmp)
    save_format = checkpoint_cfg.model_save_format
    save_model_dir(unwrapped, processor, ck.model, save_format, full_model)
    in_model: Dict[str, List[str]] = {}
    if full_model is None and not hasattr(unwrapped, "peft_config"):
        in_model = map_to_model_dir(unwrapped, ck.model, save_format, list(weights))
        if in_model:
            ck.weights_map.write_text(json.dumps(in_model, indent=1))
    rest = {k: v.detach().cpu() for k, v in weights.items() if k not in in_model}
    if rest or not in_model:
        torch.save(rest, ck.trainable)
    torch.save(optimizer_state, ck.optimizer)
    torch.save(scheduler.state_dict(), ck.scheduler)
    ck.config.write_text(config_yaml)
    if checkpoint_cfg.save_consolidated and hasattr(unwrapped, "peft_config"):
        from vlm_sweep.inference.export import export_checkpoint

        export_checkpoint(str(tmp), str(ck.consolidated), merge_lora=True)
    ck.trainer_state.write_text(json.dumps(trainer_state, indent=2))


def _seal(tmp: Path, final: Path) -> None:
    """Modes from the umask, the manifest (last), fsync, then the rename that publishes it."""
    apply_umask_modes(tmp)
    write_manifest(tmp)
    _fsync_tree(tmp)
    if final.exists():  # a stale one from a previous attempt at this step
        shutil.rmtree(final)
    os.replace(tmp, final)


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
    """Write step_<N> atomically on all ranks; rank 0 moves LATEST (and BEST) and prunes old ones.

    A write that fails (a full disk) removes the partial dir and raises CheckpointError.
    """
    root = Path(root)
    name = step_name(step)
    final, tmp = root / name, root / tmp_name(name)
    rank, main = accelerator.process_index, accelerator.is_main_process
    unwrapped = accelerator.unwrap_model(model)
    space = (0, 0)
    if main:
        space = _check_space(root, name, unwrapped, optimizer)
        if tmp.exists():
            shutil.rmtree(tmp)
        CheckpointDir(tmp).state.mkdir(parents=True)
    accelerator.wait_for_everyone()
    try:
        # Per-rank: RNG and data position differ between processes.
        torch.save({"rng": rng_state(), "dataloader": dataloader.state_dict()},
                   CheckpointDir(tmp).rank_state(rank))
        sharded = is_fsdp(unwrapped)
        if sharded:  # gathering full tensors is a collective: every rank takes part
            full_model, weights = full_model_state(unwrapped), full_trainable_state(unwrapped)
            optimizer_state = full_optimizer_state(unwrapped, optimizer)
        else:
            full_model, weights = None, trainable_state_dict(unwrapped)
            optimizer_state = optimizer.state_dict() if main else None
        if main:
            _write_main_files(tmp, unwrapped, processor, optimizer_state, scheduler, weights, full_model,
                              config_yaml, checkpoint_cfg,
                              {**trainer_state, "world_size": accelerator.num_processes, "fsdp": sharded})
        accelerator.wait_for_everyone()
        if main:
            _seal(tmp, final)
    except Exception as err:
        if not _is_write_error(err):
            if main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        free_now = _free_bytes(root)
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise _write_failed(err, root, name, space, free_now) from err
    if main:
        try:
            write_pointer(root, LATEST, name)
            if is_best:
                mark_best(root, name)
        except OSError as err:
            raise CheckpointError(f"wrote {final} but could not update {root / LATEST}: {err.strerror or err}; "
                                  f"a rerun resumes from the checkpoint LATEST still names") from err
        prune_checkpoints(root, checkpoint_cfg.keep_last, keep=name)
    accelerator.wait_for_everyone()
    return final


def trained_precision(path: Path) -> Optional[str]:
    """The compute precision a checkpoint was trained in (Accelerate's name), None if it does not say
    (written before it was recorded) or cannot be read (load_checkpoint reports that)."""
    try:
        return json.loads(CheckpointDir(path).trainer_state.read_text()).get(PRECISION_KEY)
    except (OSError, ValueError):
        return None


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
    ck = CheckpointDir(path)
    trainer_state = json.loads(ck.trainer_state.read_text())
    if trainer_state["world_size"] != accelerator.num_processes:
        raise CheckpointError(
            f"{path} was written by {trainer_state['world_size']} processes, this run has "
            f"{accelerator.num_processes}; resume with the same number of processes")
    unwrapped = accelerator.unwrap_model(model)
    sharded = is_fsdp(unwrapped)
    if trainer_state.get("fsdp", False) != sharded:
        raise CheckpointError(f"{path} was written {'with' if trainer_state.get('fsdp') else 'without'} "
                              f"parallel.strategy=fsdp; resume it with the same strategy")
    weights = trained_weights(path)
    expected = set(trainable_state_dict(unwrapped))
    if set(weights) != expected:
        missing, extra = sorted(expected - set(weights))[:3], sorted(set(weights) - expected)[:3]
        raise CheckpointError(
            f"{path} does not fit this config (peft/freeze/model differ): trainable parameters "
            f"missing from it {missing}, unexpected in it {extra}")
    shapes = {name: tuple(p.shape) for name, p in unwrapped.named_parameters()}  # full shapes, sharded too
    for name, tensor in weights.items():
        if name in shapes and tuple(tensor.shape) != shapes[name]:
            raise CheckpointError(
                f"{path} does not fit this config (peft/freeze/model differ): {name} is "
                f"{tuple(tensor.shape)} in it, {shapes[name]} in this model (e.g. another peft.dim or model)")
    optimizer_state = torch.load(ck.optimizer, weights_only=True)
    if sharded:
        load_full_states(unwrapped, optimizer, weights, optimizer_state)
    else:
        params = dict(unwrapped.named_parameters())
        with torch.no_grad():
            for name, tensor in weights.items():
                params[name].copy_(tensor)
        optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(torch.load(ck.scheduler, weights_only=True))
    per_rank = torch.load(ck.rank_state(accelerator.process_index), weights_only=True)
    dataloader.load_state_dict(per_rank["dataloader"])
    set_rng_state(per_rank["rng"])
    return trainer_state
