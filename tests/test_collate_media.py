"""Collating several images, videos and media-less samples; pixel budgets; labels stay the answers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import compose
from vlm_sweep.data import fixture_parts
from vlm_sweep.data.collate import IGNORE_INDEX, VLMCollator
from vlm_sweep.data.datasets import ConversationDataset, Sample, load_split
from vlm_sweep.data.formats import assistant_texts
from vlm_sweep.data.sets import get_spec
from vlm_sweep.data.media import load_video_frames


def _processor(path: Path):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(path)


@pytest.fixture(scope="module")
def gemma(gemma3_dir):
    return _processor(gemma3_dir)


@pytest.fixture(scope="module")
def qwen(qwen_dir):
    return _processor(qwen_dir)


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return fixture_parts.write_video(tmp_path_factory.mktemp("video") / "clip.mp4", num_frames=16, fps=8)


def _image(i: int, size=(200, 150)) -> Image.Image:
    return Image.new("RGB", size, (40 * i % 256, 90, 200))


def _sample(record_id: str, answer: str, images: int = 0, video=None, question: str = "What is shown?") -> Sample:
    content = [{"type": "image", "image": _image(i)} for i in range(images)]
    if video is not None:
        content.append({"type": "video", "video": video})
    content.append({"type": "text", "text": question})
    return Sample(record_id, [{"role": "user", "content": content},
                              {"role": "assistant", "content": [{"type": "text", "text": answer}]}])


def _answers(batch, processor, row: int) -> list:
    """Decoded labelled runs of one row, end-of-turn token dropped."""
    runs, current = [], []
    for value in batch["labels"][row].tolist() + [IGNORE_INDEX]:
        if value == IGNORE_INDEX:
            if current:
                runs.append(processor.tokenizer.decode(current[:-1]))
            current = []
        else:
            current.append(value)
    return runs


def _count(batch, processor, token: str, row: int) -> int:
    token_id = processor.tokenizer.convert_tokens_to_ids(token)
    return int((batch["input_ids"][row][batch["attention_mask"][row].bool()] == token_id).sum())


def _forward(model_dir: Path, batch) -> torch.Tensor:
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    inputs = {k: v for k, v in batch.items() if torch.is_tensor(v) and k != "labels"}
    with torch.no_grad():
        return model(**inputs).logits


def test_gemma_mixed_batch_of_several_images_and_none(gemma, gemma3_dir):
    samples = [_sample("three", "three pictures", images=3), _sample("none", "no picture"),
               _sample("one", "one picture", images=1)]
    batch = VLMCollator(gemma, 4096)(samples)
    assert batch["pixel_values"].shape[0] == 4
    for row, (images, answer) in enumerate([(3, "three pictures"), (0, "no picture"), (1, "one picture")]):
        assert _count(batch, gemma, "<start_of_image>", row) == images
        assert _answers(batch, gemma, row) == [answer]
    assert _forward(gemma3_dir, batch).shape[:2] == batch["input_ids"].shape
    # A batch with no image at all is a text-only batch.
    text_only = VLMCollator(gemma, 4096)([_sample("a", "x"), _sample("b", "y")])
    assert "pixel_values" not in text_only and _answers(text_only, gemma, 1) == ["y"]


def test_qwen_images_video_and_nothing_in_one_batch(qwen, qwen_dir, clip):
    frames = load_video_frames(clip, num_frames=10)
    samples = [_sample("images", "two pictures", images=2), _sample("video", "a moving square", video=frames),
               _sample("none", "nothing to see"), _sample("both", "both kinds", images=1, video=frames)]
    batch = VLMCollator(qwen, 4096)(samples)
    for row, answer in enumerate(["two pictures", "a moving square", "nothing to see", "both kinds"]):
        assert _answers(batch, qwen, row) == [answer]
    assert [_count(batch, qwen, "<|vision_start|>", row) for row in range(4)] == [2, 1, 0, 2]
    assert batch["image_grid_thw"].shape[0] == 3 and batch["video_grid_thw"].shape[0] == 2
    # 10 frames in pairs (temporal patch 2) -> 5 temporal grid steps; each step lasts 2 / sampled fps,
    # and 10 of 16 frames at 8 fps is 5 frames per second: 0.4 s, not the 24 fps default's 0.083 s.
    assert batch["video_grid_thw"][:, 0].tolist() == [5, 5]
    assert batch["second_per_grid_ts"].tolist() == pytest.approx([0.4, 0.4])
    labelled = batch["labels"][batch["labels"] != IGNORE_INDEX]
    for token in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>"):
        assert not (labelled == qwen.tokenizer.convert_tokens_to_ids(token)).any()
    assert _forward(qwen_dir, batch).shape[:2] == batch["input_ids"].shape


def test_qwen_video_frames_as_a_numpy_array(qwen):
    import numpy as np

    video = np.zeros((4, 56, 56, 3), dtype=np.uint8)
    batch = VLMCollator(qwen, 4096)([_sample("array", "dark", video=video)])
    assert batch["video_grid_thw"].tolist() == [[2, 4, 4]] and _answers(batch, qwen, 0) == ["dark"]


def test_max_pixels_gives_fewer_image_and_video_tokens(qwen, tmp_path):
    frames = load_video_frames(fixture_parts.write_video(tmp_path / "big.mp4", size=128), num_frames=4)
    samples = [_sample("big", "answer", images=1, video=frames)]
    default = VLMCollator(qwen, 4096)(samples)
    budget = 56 * 56  # the tiny processor's min_pixels; its default max is 112 x 112
    small = VLMCollator(qwen, 4096, max_pixels=budget)(samples)
    for token in ("<|image_pad|>", "<|video_pad|>"):
        assert _count(small, qwen, token, 0) < _count(default, qwen, token, 0), token
    h, w = small["image_grid_thw"][0, 1:].tolist()
    assert h * w * 14 * 14 <= budget
    assert _answers(small, qwen, 0) == ["answer"]
    # min_pixels grows a small image.
    tiny = [_sample("small", "answer", images=1)]
    tiny[0].conversation[0]["content"][0]["image"] = _image(0, size=(30, 30))
    grown = VLMCollator(qwen, 4096, min_pixels=112 * 112)(tiny)
    assert _count(grown, qwen, "<|image_pad|>", 0) > _count(VLMCollator(qwen, 4096)(tiny), qwen, "<|image_pad|>", 0)


def test_pixel_budget_on_a_processor_that_does_not_take_it_is_a_config_error(gemma):
    with pytest.raises(ValueError, match=r"dataset\.max_pixels=1000 .*Gemma3ImageProcessor"):
        VLMCollator(gemma, 4096, max_pixels=1000)
    with pytest.raises(ValueError, match=r"dataset\.min_pixels"):
        VLMCollator(gemma, 4096, min_pixels=10)


def test_video_on_a_processor_without_video_support_is_an_error(gemma, clip):
    from vlm_sweep.data.datasets import BadRecordError

    with pytest.raises(BadRecordError, match=r"^v: .*cannot take videos"):
        VLMCollator(gemma, 4096)([_sample("v", "x", video=load_video_frames(clip, num_frames=2))])


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    import datasets

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("hf_cache"))
        root = get_spec("llava_video_178k").write_fixture(tmp_path_factory.mktemp("llava"))
        cfg = compose(["dataset=llava_video_178k", f"dataset.path={root}", "dataset.num_frames=4"]).dataset
        yield ConversationDataset(load_split(cfg, "open_ended"), cfg, "open_ended")


def test_llava_micro_batches_label_every_answer_of_multi_turn_records(llava, qwen):
    from torch.utils.data import DataLoader

    collator = VLMCollator(qwen, 4096)
    seen = 0
    for batch in DataLoader(llava, batch_size=3, collate_fn=collator, shuffle=False):
        for row, record_id in enumerate(batch["record_ids"]):
            sample = llava[int(record_id.rsplit("[", 1)[1][:-1])]
            assert _answers(batch, qwen, row) == assistant_texts(sample.conversation)
            seen += 1
    assert seen == len(llava) == 4
    assert any(len(assistant_texts(llava[i].conversation)) == 2 for i in range(len(llava)))


def test_raven_rows_keep_their_images_in_order_through_gemma(gemma, tmp_path):
    import datasets

    cfg = compose(["dataset=raven", f"dataset.path={get_spec('raven').write_fixture(tmp_path)}",
                   "dataset.carve_val_fraction=0.2"]).dataset
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
        dataset = ConversationDataset(load_split(cfg, "train"), cfg, "train")
        samples = [dataset[i] for i in range(4)]
    batch = VLMCollator(gemma, 4096)(samples)
    counts = [sum(p["type"] == "image" for p in s.conversation[0]["content"]) for s in samples]
    assert batch["pixel_values"].shape[0] == sum(counts)
    for row, sample in enumerate(samples):
        assert _count(batch, gemma, "<start_of_image>", row) == counts[row]
        assert _answers(batch, gemma, row) == assistant_texts(sample.conversation)
    # Pixel rows follow the samples' image order: the first image of sample 0 comes first.
    first = gemma.image_processor(samples[0].conversation[0]["content"][0]["image"], return_tensors="pt")
    assert torch.allclose(batch["pixel_values"][0], first["pixel_values"][0])
