"""Training and validation DataLoaders that keep the data path off the training thread.

Records are decoded, resized, templated and tokenised in worker processes (``dataset.num_workers``;
``null`` picks one per spare core, up to 4), kept alive across epochs (``persistent_workers``),
``prefetch_factor`` batches ahead, and pinned on CUDA so host-to-device copies overlap compute.
The training loader is a ``StatefulDataLoader`` over a deterministic sampler: its position is
checkpointed and restored exactly, with or without workers.

Workers ignore SIGINT (Ctrl-C reaches the whole process group), SIGUSR2 (preemption notice) and
a SIGTERM that does not come from their own training process (``scancel`` signals every process
of a job): stopping is the main process's decision (it checkpoints at a step boundary, then shuts
the workers down). A worker ended by the job's signal would otherwise end the run with "DataLoader
worker is killed by signal", raised wherever the main process happens to be, before it can
checkpoint. A SIGTERM from the training process itself (torch's last-resort ``terminate``) still
ends a worker, quietly, as torch's own worker handler (which a blocked signal never reaches) does.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any, Dict, Optional, Tuple

MAX_AUTO_WORKERS = 4
# A worker hands a batch's tensors up to this size to the main process as numpy arrays, pickled
# through its pipe (~1 ms a batch); torch would share each one as a file descriptor, a socket round
# trip per tensor (~3 ms for a tiny VLM batch of 5 tensors). Larger ones (pixels at real resolution)
# keep torch's zero-copy shared memory, as do dtypes numpy lacks (bf16).
HANDOVER_AS_NUMPY_BYTES = 1 << 20


class NumpyHandover:
    """A worker's collate function whose small tensors cross to the main process as numpy arrays."""

    def __init__(self, collate: Any) -> None:
        self.collate = collate

    def __call__(self, samples: Any) -> Dict[str, Any]:
        import torch

        batch = self.collate(samples)
        return {k: v.numpy() if torch.is_tensor(v) and _small_plain(v) else v for k, v in batch.items()}


def _small_plain(tensor: Any) -> bool:
    import torch

    numpy_dtypes = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16,
                    torch.float32, torch.float64)
    return (tensor.device.type == "cpu" and tensor.dtype in numpy_dtypes and not tensor.requires_grad
            and tensor.numel() * tensor.element_size() <= HANDOVER_AS_NUMPY_BYTES)


def from_handover(batch: Dict[str, Any]) -> Dict[str, Any]:
    """A loader's batch with every numpy array back as a tensor (zero-copy); call on each batch read."""
    import numpy as np
    import torch

    return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in batch.items()}


def resolve_num_workers(setting: Optional[int], processes_on_node: int = 1) -> int:
    """``dataset.num_workers``; None -> one worker per core left after each process's compute thread."""
    if setting is not None:
        return int(setting)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    spare = cores // max(processes_on_node, 1) - 1
    return max(0, min(MAX_AUTO_WORKERS, spare))


def quiet_worker(worker_id: int) -> None:
    """Worker init: leave stop requests to the main process, and end with it.

    A worker whose training process is killed (SIGKILL, the OOM killer) must not outlive it: torch's
    own check runs only between batches, and a worker whose queue feeder is blocked writing to a pipe
    nobody reads (its siblings hold the read end) would wait forever. A daemon thread ends it instead.
    """
    parent = os.getppid()
    for sig in (signal.SIGINT, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)
    # SIGTERM is blocked in every thread (threads started later inherit the mask) and taken by one
    # that can see who sent it.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(target=_end_on_sigterm_from, args=(parent,), name="sigterm-from-parent", daemon=True).start()
    threading.Thread(target=_exit_when_orphaned, args=(parent,), name="exit-with-parent", daemon=True).start()


def _end_on_sigterm_from(parent: int) -> None:
    while True:
        info = signal.sigwaitinfo({signal.SIGTERM})
        if info.si_pid == parent or os.getppid() != parent:
            os._exit(0)  # as torch's own worker handler does for its parent's SIGTERM


def _exit_when_orphaned(parent: int, every_s: float = 1.0) -> None:
    while os.getppid() == parent:
        time.sleep(every_s)
    os._exit(0)  # nothing to flush: the batches it would hand over have no reader any more


def loader_options(num_workers: int, pin_memory: bool) -> Dict[str, Any]:
    """Keyword arguments shared by the training and validation loaders."""
    options: Dict[str, Any] = {"num_workers": num_workers, "pin_memory": pin_memory}
    if num_workers > 0:
        options.update(persistent_workers=True, prefetch_factor=4, worker_init_fn=quiet_worker)
    return options


def build_loaders(dataset_cfg: Any, step_cfg: Any, datasets: Dict[str, Any], collator: Any, *,
                  seed: int, rank: int, world_size: int, shard_validation: bool,
                  pin_memory: bool) -> Tuple[Any, Optional[Any]]:
    """(train loader, validation loader or None); read their batches through ``from_handover``.

    ``shard_validation``: each rank validates its own share (DDP); False: every rank runs the
    whole split (FSDP, where every rank must run the same forwards).
    """
    import torch
    from torch.utils.data import DataLoader
    from torchdata.stateful_dataloader import StatefulDataLoader

    from vlm_sweep.data.sampler import ShardedIndexSampler

    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    options = loader_options(resolve_num_workers(dataset_cfg.num_workers, local_processes), pin_memory)
    collate = NumpyHandover(collator) if options["num_workers"] > 0 else collator  # read with from_handover
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
                                      collate_fn=collate, generator=torch.Generator().manual_seed(seed + rank),
                                      **options)
    val_loader = None
    if "validation" in datasets:
        val = datasets["validation"]
        shard = list(range(rank, len(val), world_size)) if shard_validation else list(range(len(val)))
        val_loader = DataLoader(val, batch_size=step_cfg.micro_batch_size, sampler=shard, collate_fn=collate,
                                generator=torch.Generator().manual_seed(seed + rank), **options)
    return train_loader, val_loader
