"""Data-parallel strategies: DDP through Accelerate, FSDP2 through torch's ``fully_shard``.

Accelerate on CPU silently keeps DDP when asked for FSDP, and FSDP1 refuses CPU/gloo; torch's
FSDP2 works on both, so ``parallel=fsdp`` shards with it directly: each transformer block the
model declares in ``_no_split_modules`` becomes its own FSDP unit, then the root. Parameters
become DTensors sharded across ranks; state dicts are gathered to full tensors for saving.
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, Optional

import torch


# Registry components every text batch runs through (media towers and projectors may sit a batch out).
_USED_BY_EVERY_BATCH = ("embeddings", "language_model", "lm_head")


def find_unused_parameters(model: Any, family: Any, setting: Optional[bool]) -> bool:
    """``parallel.find_unused_parameters`` for DDP; null: on only when a trainable parameter lies outside the
    text path (embeddings, language model, head). Only those can go without a gradient in a step (a rank whose batch has no image leaves
    the vision tower and projector unused, an audio tower is unused without audio); the search costs a
    graph traversal per step, and PyTorch prints a note on every rank when it finds nothing."""
    from vlm_sweep.models.registry import component_of

    if setting is not None:
        return bool(setting)
    return any(param.requires_grad and component_of(family, name) not in _USED_BY_EVERY_BATCH
               for name, param in model.named_parameters())


def is_fsdp(model: Any) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def block_classes(model: Any) -> set:
    """Class names of the model's transformer blocks (HF's _no_split_modules)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    if not names:
        raise ValueError(f"config error: parallel.strategy=fsdp needs the model to declare its blocks "
                         f"(_no_split_modules); {type(base).__name__} declares none")
    return names


def shard_with_fsdp2(model: Any, precision: str) -> Any:
    """fully_shard every block, then the root; bf16/fp16 compute with fp32 reduction if asked."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype \
        else MixedPrecisionPolicy()
    names = block_classes(model)
    for module in list(model.modules()):
        if type(module).__name__ in names:
            fully_shard(module, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


@contextlib.contextmanager
def no_gradient_sync(model: Any, accelerator: Any) -> Iterator[None]:
    """Skip the gradient all-reduce/reduce-scatter for a micro-batch that is not the last."""
    if is_fsdp(model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        with accelerator.no_sync(model):
            yield


@contextlib.contextmanager
def unsharded(model: Any) -> Iterator[None]:
    """Gather the root's parameters for calls that bypass its forward (``generate`` runs the
    vision encoder directly); blocks still gather themselves in their own forward."""
    if not is_fsdp(model):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (a collective: every rank must call); plain tensors pass through."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def full_trainable_state(model: Any) -> Dict[str, torch.Tensor]:
    """Trainable parameters as full CPU tensors (call on every rank under FSDP)."""
    return {n: full_tensor(p.detach()).cpu() for n, p in model.named_parameters() if p.requires_grad}


def full_model_state(model: Any) -> Dict[str, torch.Tensor]:
    """The whole state dict as full CPU tensors on rank 0 (every rank must call)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # Tied weights (lm_head = embed_tokens) appear once, as save_pretrained writes them unsharded.
    keep = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    return {k: v for k, v in state.items() if k in keep}


def full_optimizer_state(model: Any, optimizer: Any) -> Dict[str, Any]:
    """Optimizer state keyed by parameter name, full tensors on rank 0 (every rank must call)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_states(model: Any, optimizer: Any, weights: Dict[str, torch.Tensor],
                     optimizer_state: Dict[str, Any]) -> None:
    """Scatter full trainable weights and optimizer state back into a sharded model."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, weights, options=options)
    set_optimizer_state_dict(model, optimizer, optim_state_dict=optimizer_state, options=options)


def sharding_summary(model: Any) -> Dict[str, int]:
    """How much of the model this rank holds: proof that parameters are really sharded."""
    from torch.distributed.tensor import DTensor

    summary = {"params": 0, "dtensor_params": 0, "local_numel": 0, "full_numel": 0}
    for param in model.parameters():
        summary["params"] += 1
        summary["full_numel"] += param.numel()
        if isinstance(param, DTensor):
            summary["dtensor_params"] += 1
            summary["local_numel"] += param.to_local().numel()
        else:
            summary["local_numel"] += param.numel()
    return summary
