"""lmms-lab/DocVQA, config DocVQA: questions on scanned industry documents (UCSF library pages).

Columns: ``questionId``, ``question``, ``question_types`` (list), ``image``, ``docId``,
``ucsf_document_id``, ``ucsf_document_page_no``, ``answers`` (every accepted answer), ``data_split``.
The hub copy has ``validation`` and ``test`` only, and test answers are hidden (null: the
competition server scores them), so training uses validation with a held-out part carved from it.
The model is trained on the first answer; ANLS (DocVQA's official metric) scores a prediction
against every accepted answer, which the assistant turn carries as ``references``.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Dict

from vlm_sweep.data.fixture_parts import WORDS, png, to_parquet, write_card
from vlm_sweep.data.formats import Conversation, text_part, text_value, turn
from vlm_sweep.data.sets import DatasetSpec
from vlm_sweep.metrics.vqa import anls

QUESTION_TYPES = ("layout", "table/list", "form", "handwritten", "free_text", "figure/diagram", "others")


def to_conversation(record: Dict[str, Any], dataset_cfg: Any) -> Conversation:
    """Page image + question -> the first answer; all accepted answers kept for ANLS."""
    image = record.get("image")
    if image is None:
        raise ValueError("image is missing")
    answers = [a.strip() for a in record.get("answers") or [] if isinstance(a, str) and a.strip()]
    if not answers:
        raise ValueError("answers are missing (DocVQA's test answers are hidden: train and score on validation)")
    answer = {**turn("assistant", text_part(answers[0])), "references": answers}
    return [turn("user", {"type": "image", "image": image}, text_part(text_value(record.get("question"), "question"))),
            answer]


def _row(rng: random.Random, i: int, split: str) -> Dict[str, Any]:
    """One question on a synthetic page; test rows hide their answers (null), as on the hub."""
    answers = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3)))]
    if rng.random() < 0.5:
        answers.append(answers[0].upper())  # DocVQA lists spelling variants as separate answers
    hidden = split == "test"
    return {"questionId": str(49150 + i), "question": f"What is written in the {rng.choice(WORDS)} field?",
            "question_types": None if hidden else [rng.choice(QUESTION_TYPES)],
            "image": {"bytes": png(rng, (96, 128)), "path": None}, "docId": 14465 + i // 3,
            "ucsf_document_id": "".join(rng.choice("bcdfghjklmnpqrstvwxz") for _ in range(4))
            + f"{rng.randrange(10**4):04d}",
            "ucsf_document_page_no": str(rng.randint(1, 20)),
            "answers": None if hidden else answers, "data_split": split if split != "validation" else "val"}


def write_fixture(root: str | Path, num_validation: int = 16, num_test: int = 4, seed: int = 0) -> Path:
    """The hub layout: ``DocVQA/{validation,test}-*.parquet`` + the card's ``DocVQA`` config."""
    from datasets import Features, Image, List as ListFeature, Value

    root, rng = Path(root), random.Random(seed)
    features = Features({"questionId": Value("string"), "question": Value("string"),
                         "question_types": ListFeature(Value("string")), "image": Image(),
                         "docId": Value("int64"), "ucsf_document_id": Value("string"),
                         "ucsf_document_page_no": Value("string"), "answers": ListFeature(Value("string")),
                         "data_split": Value("string")})
    for split, count in (("validation", num_validation), ("test", num_test)):
        rows = [_row(rng, i, split) for i in range(count)]
        to_parquet({name: [row[name] for row in rows] for name in features}, features,
                   root / "DocVQA" / f"{split}-00000-of-00001.parquet")
    write_card(root, "DocVQA", {"validation": "DocVQA/validation-*", "test": "DocVQA/test-*"})
    return root


SPEC = DatasetSpec(
    name="docvqa",
    to_conversation=to_conversation,
    metric=anls,
    metric_names=("anls",),
    write_fixture=write_fixture,
)
