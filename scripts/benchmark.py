"""Hot-path benchmarks: start-up, collate, training step. Speed targets live here, not in tests.

    make bench                     # or: .venv/bin/python scripts/benchmark.py [model=tiny_qwen2_5_vl ...]

Prints one row per measurement with its target; exits 1 if a target is missed. Targets are set
for the tiny models on a 2-core CPU; on a GPU with hub models only the start-up target applies.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, List

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def timed(fn: Callable[[], object], repeat: int) -> float:
    """Median seconds of ``repeat`` calls after one warm-up."""
    fn()
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def main(overrides: List[str]) -> int:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rows = []

    def cfg_job() -> None:
        subprocess.run([sys.executable, str(ROOT / "launch.py"), "--cfg", "job", *overrides],
                       check=True, capture_output=True)

    rows.append(("launch.py --cfg job (s)", timed(cfg_job, 3), 2.0))

    import torch

    from conftest import compose
    from vlm_sweep.data.collate import VLMCollator
    from vlm_sweep.data.datasets import build_datasets
    from vlm_sweep.models.load import load_model_and_processor
    from vlm_sweep.training.trainer import summed_token_loss

    cfg = compose(overrides)
    model, processor = load_model_and_processor(cfg.model)
    train = build_datasets(cfg.dataset)["train"]
    samples = [train[i] for i in range(8)]
    collator = VLMCollator(processor, cfg.dataset.max_length)
    batch_size = cfg.step_scheduler.micro_batch_size
    rows.append((f"collate, batch {batch_size} (ms)",
                 1000 * timed(lambda: collator(samples[:batch_size]), 20), 50.0))

    batch = collator(samples[:batch_size])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> None:
        loss = summed_token_loss(model, batch) / max(1, int((batch["labels"] != -100).sum()))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    model.train()
    rows.append((f"forward+backward+step, batch {batch_size} (ms)", 1000 * timed(step, 20), 250.0))
    import resource

    rows.append(("peak RSS (GiB)", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 4.0))

    missed = 0
    print(f"{'measurement':<44}{'value':>10}{'target':>10}")
    for name, value, target in rows:
        ok = value <= target
        missed += not ok
        print(f"{name:<44}{value:>10.3f}{target:>10.3f}  {'ok' if ok else 'MISSED'}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
