"""Task metrics per record format: predictions and references are the assistant texts."""

from __future__ import annotations

from typing import Callable, Dict, List


def cord_v2(predictions: List[str], references: List[str]) -> Dict[str, float]:
    """Donut's CORD metrics: normalised tree-edit-distance accuracy and field-level F1."""
    from vlm_sweep.metrics.cord import cord_scores

    return cord_scores(predictions, references)


TASK_METRICS: Dict[str, Callable[[List[str], List[str]], Dict[str, float]]] = {
    "cord_v2": cord_v2,
}
