"""Generate answers for dataset records and score them with the task's metric.

Shared by ``python -m vlm_sweep.evaluate`` and the training loop (``eval.every_steps``).
Under data parallelism each rank generates its shard; predictions are gathered so
every rank returns the same metrics.
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

from vlm_sweep.data.formats import assistant_texts
from vlm_sweep.generation import SamplingConfig, generate, prompt_part
from vlm_sweep.metrics.tasks import TASK_METRICS


def evaluate_samples(model: Any, processor: Any, samples: Sequence[Any], record_format: str,
                     sampling: SamplingConfig, batch_size: int = 4, rank: int = 0,
                     world_size: int = 1, media_kwargs: Any = None) -> Tuple[Dict[str, float], List[Dict[str, Any]]]:
    """(metrics, per-record rows) over ``samples`` (each with .record_id and .conversation)."""
    mine = list(samples)[rank::world_size]
    rows: List[Dict[str, Any]] = []
    for i in range(0, len(mine), batch_size):
        batch = mine[i:i + batch_size]
        answers = generate(model, processor, [prompt_part(s.conversation) for s in batch], sampling,
                           media_kwargs=media_kwargs)
        for sample, answer in zip(batch, answers):
            rows.append({"record_id": sample.record_id, "prediction": answer,
                         "reference": assistant_texts(sample.conversation)[-1]})
    if world_size > 1:
        from accelerate.utils import gather_object

        rows = gather_object(rows)
    rows.sort(key=lambda r: r["record_id"])
    metrics = TASK_METRICS[record_format]([r["prediction"] for r in rows], [r["reference"] for r in rows])
    return metrics, rows
