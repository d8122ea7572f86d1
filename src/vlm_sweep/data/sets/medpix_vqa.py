"""mmoukouba/MedPix-VQA: medical images with free-text question/answer pairs.

Columns: ``image_id`` (an Image, despite its name), ``mode``, ``case_id``, ``question``,
``answer``. Scored like SQuAD (normalised exact match and token F1): answers are free text.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Dict

from vlm_sweep.data.fixture_parts import phrase, png, to_parquet
from vlm_sweep.data.formats import Conversation, text_part, text_value, turn
from vlm_sweep.data.sets import DatasetSpec
from vlm_sweep.metrics.vqa import free_text_scores


def to_conversation(record: Dict[str, Any], dataset_cfg: Any) -> Conversation:
    """Image + question -> answer."""
    image = record.get("image_id")
    if image is None:
        raise ValueError("image_id (the image) is missing")
    return [
        turn("user", {"type": "image", "image": image}, text_part(text_value(record.get("question"), "question"))),
        turn("assistant", text_part(text_value(record.get("answer"), "answer"))),
    ]


def write_fixture(root: str | Path, num_train: int = 12, num_validation: int = 4, seed: int = 0) -> Path:
    """The hub layout: ``data/{train,validation}-*.parquet``, ``image_id`` an Image feature."""
    from datasets import Features, Image, Value

    root, rng = Path(root), random.Random(seed)
    features = Features({"image_id": Image(), "mode": Value("string"), "case_id": Value("string"),
                         "question": Value("string"), "answer": Value("string")})
    for split, count in (("train", num_train), ("validation", num_validation)):
        rows: Dict[str, list] = {name: [] for name in features}
        for i in range(count):
            rows["image_id"].append({"bytes": png(rng), "path": None})
            rows["mode"].append(rng.choice(["CT", "MRI", "X-ray"]))
            rows["case_id"].append(f"MPX{1000 + i}")
            rows["question"].append(f"What does the {rng.choice(['CT', 'MRI'])} show in the {phrase(rng, 1)}?")
            rows["answer"].append(phrase(rng, rng.randint(1, 3)))
        to_parquet(rows, features, root / "data" / f"{split}-00000-of-00001.parquet")
    return root


SPEC = DatasetSpec(
    name="medpix_vqa",
    to_conversation=to_conversation,
    metric=free_text_scores,
    metric_names=("exact_match", "token_f1"),
    write_fixture=write_fixture,
)
