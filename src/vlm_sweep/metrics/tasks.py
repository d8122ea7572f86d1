"""Task metrics per record format: predictions and references are the assistant texts.

The training loop logs these as ``eval/<name>`` (see ``vlm_sweep.evaluation``).
"""

from __future__ import annotations

from typing import Callable, Dict, List, Tuple

from vlm_sweep.metrics.vqa import choice_scores, free_text_scores


def cord_v2(predictions: List[str], references: List[str]) -> Dict[str, float]:
    """Donut's CORD metrics: normalised tree-edit-distance accuracy and field-level F1."""
    from vlm_sweep.metrics.cord import cord_scores

    return cord_scores(predictions, references)


def raven(predictions: List[str], references: List[str]) -> Dict[str, float]:
    """Answer accuracy: the option letter picked (free-text answers: normalised exact match)."""
    return {"accuracy": choice_scores(predictions, references)["accuracy"]}


TASK_METRICS: Dict[str, Callable[[List[str], List[str]], Dict[str, float]]] = {
    "cord_v2": cord_v2,
    # Free-text medical answers: SQuAD-normalised exact match and token F1.
    "medpix_vqa": free_text_scores,
    "raven": raven,
    # NExT-QA open-ended and multiple-choice answers in one split: accuracy over both.
    "llava_video_178k": choice_scores,
    # Your own data: free-text scores (exact match, token F1).
    "custom": free_text_scores,
}

# The names each format's metric can report (as ``eval/<name>``), known without running it:
# the config check refuses an objective or best metric that no metric produces.
TASK_METRIC_NAMES: Dict[str, Tuple[str, ...]] = {
    "cord_v2": ("ted_accuracy", "field_f1"),
    "medpix_vqa": ("exact_match", "token_f1"),
    "raven": ("accuracy",),
    "llava_video_178k": ("accuracy", "mc_accuracy", "open_exact_match", "open_token_f1"),
    "custom": ("exact_match", "token_f1"),
}
