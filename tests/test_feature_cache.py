"""Records encoded one by one (cached across epochs) batch exactly as the processor batches them."""

from __future__ import annotations

import logging

import pytest
import torch
from PIL import Image

from conftest import FAMILIES as FAMILY_CONFIGS, tiny_processor
from vlm_sweep.data.collate import VLMCollator
from vlm_sweep.data.datasets import Sample
from vlm_sweep.models.registry import get_family

FAMILIES = [name.removeprefix("tiny_") for name in FAMILY_CONFIGS]  # tiny recipe names: every family


def _sample(record_id: str, answer: str, images: int = 0, video=None) -> Sample:
    content = [{"type": "image", "image": Image.new("RGB", (80 + 30 * i, 60), (40 * i, 90, 200))}
               for i in range(images)]
    if video is not None:
        content.append({"type": "video", "video": video})
    content.append({"type": "text", "text": "What is shown?"})
    return Sample(record_id, [{"role": "user", "content": content},
                              {"role": "assistant", "content": [{"type": "text", "text": answer}]}])


def _mixed(family: str, frames) -> list:
    samples = [_sample("two-images", "two pictures of a receipt", images=2), _sample("text-only", "no"),
               _sample("one-image", "a single longer answer about the picture", images=1)]
    if get_family(family).supports_video:
        samples.append(_sample("video", "a clip", video=frames))
    return samples


def _assert_same(got: dict, expected: dict) -> None:
    assert set(expected) <= set(got)
    for key, value in expected.items():
        if torch.is_tensor(value):
            assert torch.equal(got[key], value), key
        else:
            assert got[key] == value, key


@pytest.mark.parametrize("family", FAMILIES)
def test_merged_records_equal_the_processors_own_batch(family, frames):
    processor = tiny_processor(family)
    collator = VLMCollator(processor, 4096)
    samples = _mixed(family, frames)
    try:
        expected = collator._encode(samples)  # the processor batching these records itself
    except Exception:  # noqa: BLE001 - a processor that takes one video per call: compare without the video
        samples = [s for s in samples if s.record_id != "video"]
        expected = collator._encode(samples)
    batch = collator(samples)
    _assert_same(batch, expected)
    assert batch["record_ids"] == [s.record_id for s in samples] and batch["num_skipped"] == 0
    again = collator(list(reversed(samples)))  # from the cache, in another order
    _assert_same(again, collator._encode(list(reversed(samples))))


def test_cached_records_are_not_encoded_again_and_the_budget_holds():
    processor = tiny_processor("gemma3")
    samples = [_sample(f"r{i}", "answer " * (i + 1), images=1) for i in range(4)]
    calls = []
    for budget_mb, expected_calls in ((64.0, 4), (0.0, 8)):
        collator = VLMCollator(processor, 4096, feature_cache_mb=budget_mb)
        encode = collator._encode
        collator._encode = lambda batch, encode=encode: calls.append(len(batch)) or encode(batch)
        first, second = collator(samples[:2] + samples[2:]), collator(samples)
        assert len(calls) == expected_calls, (budget_mb, calls)
        assert all(n == 1 for n in calls)
        _assert_same(second, first)
        calls.clear()
        assert len(collator.cache) == (4 if budget_mb else 0)


def test_records_a_processor_takes_one_per_call_still_batch_together(frames):
    nemotron = tiny_processor("nemotron_vl")  # its processor takes one video per call
    samples = [_sample(f"clips[{i}]", f"clip {i}", video=frames) for i in range(2)]
    collator = VLMCollator(nemotron, 4096)
    alone = [collator._encode([s]) for s in samples]
    batch = collator(samples)
    assert batch["record_ids"] == ["clips[0]", "clips[1]"]
    for key, value in alone[0].items():
        if torch.is_tensor(value) and value.shape[0] != 1:  # media: both records' rows, in order
            assert torch.equal(batch[key], torch.cat([alone[0][key], alone[1][key]]))


def test_a_bad_record_costs_only_itself(caplog):
    processor = tiny_processor("gemma3")
    good = [_sample("good[0]", "fine"), _sample("good[1]", "also fine", images=1)]
    bad = Sample("bad[7]", [{"role": "user", "content": [{"type": "image", "image": "not an image"},
                                                         {"type": "text", "text": "?"}]},
                            {"role": "assistant", "content": [{"type": "text", "text": "x"}]}])
    with caplog.at_level(logging.WARNING, logger="vlm_sweep.data.collate"):
        batch = VLMCollator(processor, 4096, "skip")([good[0], bad, good[1]])
    assert batch["record_ids"] == ["good[0]", "good[1]"] and batch["num_skipped"] == 1
    assert "skipping bad record: bad[7]: the processor cannot encode it" in caplog.text
