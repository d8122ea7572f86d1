"""Training and validation DataLoaders that keep the data path off the training thread.

Records are decoded, resized, templated and tokenised in worker processes (``dataset.num_workers``;
``null`` picks one per spare core, up to 4), kept alive across epochs (``persistent_workers``),
``prefetch_factor`` batches ahead, and pinned on CUDA so host-to-device copies overlap compute.
The training loader is a ``StatefulDataLoader`` over a deterministic sampler: its position is
checkpointed and restored exactly, with or without workers.

Workers ignore SIGINT (Ctrl-C reaches the whole process group) and SIGUSR2 (preemption notice):
stopping is the main process's decision (it checkpoints at a step boundary, then shuts the
workers down); a worker killed by Ctrl-C would otherwise end the run with "DataLoader worker
exited unexpectedly". SIGTERM keeps its default: it is how the workers are shut down.
"""

from __future__ import annotations

import os
import signal
from typing import Any, Dict, Optional, Tuple

MAX_AUTO_WORKERS = 4


def resolve_num_workers(setting: Optional[int], processes_on_node: int = 1) -> int:
    """``dataset.num_workers``; None -> one worker per core left after each process's compute thread."""
    if setting is not None:
        return int(setting)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    spare = cores // max(processes_on_node, 1) - 1
    return max(0, min(MAX_AUTO_WORKERS, spare))


def quiet_worker(worker_id: int) -> None:
    """Worker init: leave stop requests to the main process (SIGTERM still ends a worker)."""
    for sig in (signal.SIGINT, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)


def loader_options(num_workers: int, pin_memory: bool) -> Dict[str, Any]:
    """Keyword arguments shared by the training and validation loaders."""
    options: Dict[str, Any] = {"num_workers": num_workers, "pin_memory": pin_memory}
    if num_workers > 0:
        options.update(persistent_workers=True, prefetch_factor=4, worker_init_fn=quiet_worker)
    return options


def build_loaders(dataset_cfg: Any, step_cfg: Any, datasets: Dict[str, Any], collator: Any, *,
                  seed: int, rank: int, world_size: int, shard_validation: bool,
                  pin_memory: bool) -> Tuple[Any, Optional[Any]]:
    """(train loader, validation loader or None).

    ``shard_validation``: each rank validates its own share (DDP); False: every rank runs the
    whole split (FSDP, where every rank must run the same forwards).
    """
    import torch
    from torch.utils.data import DataLoader
    from torchdata.stateful_dataloader import StatefulDataLoader

    from vlm_sweep.data.sampler import ShardedIndexSampler

    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    options = loader_options(resolve_num_workers(dataset_cfg.num_workers, local_processes), pin_memory)
    train = datasets["train"]
    for dataset in datasets.values():  # each worker process then skips reading records it has encoded
        dataset.encoded = getattr(collator, "cache", None)
    lengths = train.length_hints() if dataset_cfg.group_by_length else None
    # Length groups are whole optimizer steps (global batches), so the samples of a step do not
    # depend on how many processes share it: DDP over N ranks trains on what one process would.
    sampler = ShardedIndexSampler(len(train), rank=rank, world_size=world_size, seed=seed, lengths=lengths,
                                  batch_size=step_cfg.global_batch_size // world_size)
    # Private generators: creating a loader iterator (a worker base seed) must not draw from the
    # global RNG. A resumed run creates its iterators at other steps than an uninterrupted one
    # (persistent validation workers: once per process), and LoRA dropout draws from that RNG.
    train_loader = StatefulDataLoader(train, batch_size=step_cfg.micro_batch_size, sampler=sampler,
                                      collate_fn=collator, generator=torch.Generator().manual_seed(seed + rank),
                                      **options)
    val_loader = None
    if "validation" in datasets:
        val = datasets["validation"]
        shard = list(range(rank, len(val), world_size)) if shard_validation else list(range(len(val)))
        val_loader = DataLoader(val, batch_size=step_cfg.micro_batch_size, sampler=shard, collate_fn=collator,
                                generator=torch.Generator().manual_seed(seed + rank), **options)
    return train_loader, val_loader
