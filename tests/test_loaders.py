"""Data-loading workers: what the training loop reads equals what the collator built; who may stop them."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import numpy as np
import torch
from torch.utils.data import DataLoader

from vlm_sweep.data.loaders import HANDOVER_AS_NUMPY_BYTES, NumpyHandover, from_handover, loader_options


def _collate(indices):
    """A VLM-like batch: ids/masks/labels, small and large pixels, a bf16 tensor, bookkeeping."""
    n = len(indices)
    ids = torch.arange(n * 7, dtype=torch.long).reshape(n, 7) + indices[0]
    big = HANDOVER_AS_NUMPY_BYTES // 4 + 1  # just over the limit in float32
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone(),
            "pixel_values": torch.full((n, 3, 4, 4), 0.5), "pixel_values_videos": torch.ones(big),
            "tiles": torch.full((2, 3), 1.5, dtype=torch.bfloat16), "num_skipped": 0,
            "record_ids": [f"r{i}" for i in indices]}


def test_worker_batches_arrive_as_the_collator_built_them():
    loader = DataLoader(list(range(8)), batch_size=2, collate_fn=NumpyHandover(_collate), num_workers=1)
    raw = list(loader)
    assert isinstance(raw[0]["input_ids"], np.ndarray)  # small tensors crossed as numpy arrays ...
    assert torch.is_tensor(raw[0]["pixel_values_videos"]) and torch.is_tensor(raw[0]["tiles"])  # ... not these
    for k, got in enumerate(from_handover(b) for b in raw):
        expected = _collate([2 * k, 2 * k + 1])
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            if torch.is_tensor(value):
                assert torch.is_tensor(got[key]) and got[key].dtype == value.dtype and torch.equal(got[key], value), key
            else:
                assert got[key] == value, key


def test_without_workers_the_batch_is_passed_through_untouched():
    batch = _collate([0, 1])
    assert all(a is b for a, b in zip(from_handover(batch).values(), batch.values()))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie has ended
        return stat.read().split(")")[-1].split()[0] != "Z"


def _wait_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not _alive(pid)


def test_a_worker_outlives_sigterm_from_others_but_not_from_its_training_process():
    """``scancel`` signals every process of a job: the run must stop at a step boundary, not lose its data.

    A worker ended by that SIGTERM made torch raise "DataLoader worker is killed" wherever the
    training process was, before it could checkpoint (a SLURM job then ended FAILED).
    """
    loader = DataLoader(list(range(10_000)), batch_size=2, **loader_options(num_workers=1, pin_memory=False))
    batches = iter(loader)
    next(batches)
    worker = batches._workers[0]
    subprocess.run(["kill", "-TERM", str(worker.pid)], check=True)  # from another process, as slurmstepd
    time.sleep(1.0)
    assert _alive(worker.pid)
    assert [next(batches)[0].item() for _ in range(3)] == [2, 4, 6]  # and it keeps loading
    os.kill(worker.pid, signal.SIGTERM)  # torch's last-resort terminate(), from the training process
    assert _wait_gone(worker.pid, 10), "the training process's SIGTERM still ends a worker"
    worker.join(5)
    assert worker.exitcode == 0
    batches._shutdown_workers()
