"""naver-clova-ix/cord-v2: receipt images -> Donut token strings (``<s_total>...</s_total>...``).

Columns: ``image`` and ``ground_truth`` (a JSON string holding ``gt_parse``, ``meta``,
``valid_line``, ...). The target is Donut's ``json2token`` of the parse (``data/cord.py``), and
the metrics are Donut's normalised tree-edit-distance accuracy and field-level F1, so scores
compare with Donut's and NeMo Automodel's. The fixture is synthetic receipts rendered with PIL
in that exact hub schema (``data/synthetic_receipts.py``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Tuple

from vlm_sweep.data.formats import Conversation
from vlm_sweep.data.sets import DatasetSpec


def to_conversation(record: Dict[str, Any], dataset_cfg: Any) -> Conversation:
    """Image + ``dataset.prompt`` -> the Donut token string of the first parse."""
    from vlm_sweep.donut import cord_record_to_conversation

    return cord_record_to_conversation(record, prompt=dataset_cfg.prompt)


def scores(predictions: List[str], references: List[str]) -> Dict[str, float]:
    """Donut's CORD metrics: normalised tree-edit-distance accuracy and field-level F1."""
    from vlm_sweep.metrics.cord import cord_scores

    return cord_scores(predictions, references)


def write_fixture(root: str | os.PathLike, num_train: int = 12, num_validation: int = 4, num_test: int = 4,
                  seed: int = 0, image_size: Tuple[int, int] = (256, 384)) -> Path:
    """``data/{train,validation,test}-00000-of-00001.parquet`` with ``image`` / ``ground_truth``.

    Built once: rerunning with the same arguments reuses the directory (a config's
    ``dataset.synthetic`` generates its data this way on first load).
    """
    from vlm_sweep.data.synthetic_receipts import generate_synthetic_receipts

    return generate_synthetic_receipts(root, num_train=num_train, num_validation=num_validation,
                                       num_test=num_test, seed=seed, image_size=tuple(image_size))


SPEC = DatasetSpec(
    name="cord_v2",
    to_conversation=to_conversation,
    metric=scores,
    metric_names=("ted_accuracy", "field_f1"),
    write_fixture=write_fixture,
)
