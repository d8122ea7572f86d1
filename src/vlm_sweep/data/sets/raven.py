"""HuggingFaceM4/the_cauldron, subset raven: Raven's progressive matrices.

Columns: ``images`` (a list of images) and ``texts`` (a list of ``{user, assistant, source}``;
``texts[0]`` is used). The source holds rows without images or text: they are dropped at
load time, counted, without decoding an image. Scored by the option letter picked.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Dict, List

from vlm_sweep.data.fixture_parts import png, to_parquet, write_card
from vlm_sweep.data.formats import Conversation, text_part, text_value, turn
from vlm_sweep.data.sets import DatasetSpec, RowFilter
from vlm_sweep.metrics.vqa import choice_scores

# Rows at the end of the fixture the loader must drop (no images; no texts; an empty answer).
INCOMPLETE_ROWS = 3


def to_conversation(record: Dict[str, Any], dataset_cfg: Any) -> Conversation:
    """Every image in order, then ``texts[0].user`` -> ``texts[0].assistant``."""
    images = record.get("images") or []
    if not images or any(image is None for image in images):
        raise ValueError("images are missing")
    texts = record.get("texts") or []
    first = texts[0] if texts and isinstance(texts[0], dict) else {}
    question = text_value(first.get("user"), "texts[0].user")
    answer = text_value(first.get("assistant"), "texts[0].assistant")
    parts = [{"type": "image", "image": image} for image in images]
    return [turn("user", *parts, text_part(question)), turn("assistant", text_part(answer))]


def complete_rows(batch: Any) -> List[bool]:
    """Rows with at least one image, every image present, and texts[0].user/.assistant non-empty."""
    import pyarrow.compute as pc

    images = batch.column("images").combine_chunks()
    counts = pc.fill_null(pc.list_value_length(images), 0).to_pylist()
    items = pc.list_flatten(images)
    present = pc.fill_null(pc.or_(pc.is_valid(pc.struct_field(items, "bytes")),
                                  pc.is_valid(pc.struct_field(items, "path"))), False)
    parents = pc.list_parent_indices(images)
    broken = set(pc.filter(parents, pc.invert(present)).to_pylist())
    keep = []
    for row, (count, texts) in enumerate(zip(counts, batch.column("texts").to_pylist())):
        first = (texts or [None])[0] or {}
        has_text = all(isinstance(first.get(k), str) and first[k].strip() for k in ("user", "assistant"))
        keep.append(count > 0 and row not in broken and has_text)
    return keep


def accuracy(predictions: List[str], references: List[str]) -> Dict[str, float]:
    """Answer accuracy: the option letter picked (free-text answers: normalised exact match)."""
    return {"accuracy": choice_scores(predictions, references)["accuracy"]}


def write_fixture(root: str | Path, num_rows: int = 24, seed: int = 0) -> Path:
    """The hub layout: ``raven/train-*.parquet`` + the card's configs.

    The last ``INCOMPLETE_ROWS`` rows are incomplete, as the loader must drop them.
    """
    from datasets import Features, Image, List as ListFeature, Value

    root, rng = Path(root), random.Random(seed)
    features = Features({"images": ListFeature(Image()), "texts": ListFeature({"user": Value("string"),
                                                                               "assistant": Value("string"),
                                                                               "source": Value("string")})})
    images, texts = [], []
    for _ in range(num_rows - INCOMPLETE_ROWS):
        images.append([{"bytes": png(rng), "path": None} for _ in range(rng.randint(1, 3))])
        letter = rng.choice("ABCDEFGH")
        texts.append([{"user": "Which figure should complete the logical sequence? Choices: A B C D E F G H",
                       "assistant": f"Answer: {letter}", "source": "raven"}])
    images += [[], [{"bytes": png(rng), "path": None}], [{"bytes": png(rng), "path": None}]]
    texts += [[{"user": "Which figure?", "assistant": "Answer: A", "source": "raven"}], [],
              [{"user": "Which figure?", "assistant": "", "source": "raven"}]]
    to_parquet({"images": images, "texts": texts}, features, root / "raven" / "train-00000-of-00001.parquet")
    write_card(root, "raven", {"train": "raven/train-*"})
    return root


SPEC = DatasetSpec(
    name="raven",
    to_conversation=to_conversation,
    metric=accuracy,
    metric_names=("accuracy",),
    write_fixture=write_fixture,
    row_filter=RowFilter(("images", "texts"), complete_rows, "without images or texts[0] user/assistant text"),
)
