"""A record the processor cannot take is a one-line BadRecordError naming it (or skipped, logged and counted under
skip); skipped over-long records are logged."""

from __future__ import annotations

import logging

import pytest
from PIL import Image

from conftest import tiny_processor
from vlm_sweep.data.collate import VLMCollator
from vlm_sweep.data.datasets import BadRecordError, Sample


def _sample(record_id: str, answer: str, media=None, question: str = "What is shown?") -> Sample:
    content = ([media] if media else []) + [{"type": "text", "text": question}]
    return Sample(record_id, [{"role": "user", "content": content},
                              {"role": "assistant", "content": [{"type": "text", "text": answer}]}])


def _image() -> dict:
    return {"type": "image", "image": Image.new("RGB", (64, 64), (10, 90, 200))}


def test_a_record_the_processor_cannot_take_is_named_or_skipped(frames, caplog):
    gemma = tiny_processor("gemma3")  # no video support
    samples = [_sample("data/train[0]", "a picture", _image()),
               _sample("data/train[7] (train.jsonl:8)", "a clip", {"type": "video", "video": frames})]
    with pytest.raises(BadRecordError) as err:
        VLMCollator(gemma, 4096)(samples)
    message = str(err.value)
    assert "\n" not in message and message.startswith("data/train[7] (train.jsonl:8): ")
    assert "cannot take videos" in message
    with caplog.at_level(logging.WARNING, logger="vlm_sweep.data.collate"):
        batch = VLMCollator(gemma, 4096, "skip")(samples + [None])
    assert batch["record_ids"] == ["data/train[0]"] and batch["num_skipped"] == 2
    assert batch["input_ids"].shape[0] == 1 and "labels" in batch
    assert "skipping bad record: data/train[7] (train.jsonl:8)" in caplog.text


def test_skipped_over_long_records_are_each_logged(caplog):
    gemma = tiny_processor("gemma3")
    samples = [_sample("short", "a"), _sample("long[1]", "b " * 200), _sample("long[2]", "c " * 300)]
    limit = int(VLMCollator(gemma, 4096)(samples[:1])["attention_mask"].sum()) + 5
    with caplog.at_level(logging.WARNING, logger="vlm_sweep.data.collate"):
        batch = VLMCollator(gemma, limit, "skip")(samples)
    assert batch["record_ids"] == ["short"] and batch["num_skipped"] == 2
    for record_id in ("long[1]", "long[2]"):
        assert f"skipping bad record: {record_id}: " in caplog.text
        assert any(record_id in r.getMessage() and "dataset.max_length" in r.getMessage() for r in caplog.records)
