"""Labels equal exactly the assistant's answer tokens (plus its end-of-turn token)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from vlm_sweep.data.collate import IGNORE_INDEX, AssistantMarkers, VLMCollator
from vlm_sweep.data.datasets import Sample


def _processor(path):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(path)


def _conversation(answer: str, question: str = "Describe this image.", images: int = 1):
    content = [{"type": "image", "image": Image.new("RGB", (48 + 8 * i, 40), (i * 40, 90, 200))}
               for i in range(images)]
    return [
        {"role": "user", "content": content + [{"type": "text", "text": question}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]


ANSWERS = ["<s_total><s_total_price>75,000</s_total_price></s_total>",
           "<s_menu><s_nm>Nasi Campur Bali</s_nm><s_cnt>1x</s_cnt><s_price>75,000</s_price></s_menu>"]


@pytest.fixture(params=["gemma3", "qwen"])
def processor(request, gemma3_dir, qwen_dir):
    return _processor(gemma3_dir if request.param == "gemma3" else qwen_dir)


def _labelled_segments(labels_row: torch.Tensor) -> list:
    """Contiguous runs of labelled token ids."""
    runs, current = [], []
    for value in labels_row.tolist():
        if value == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(value)
    if current:
        runs.append(current)
    return runs


def test_labels_are_exactly_the_answer_and_end_of_turn(processor):
    collator = VLMCollator(processor, max_length=4096)
    samples = [Sample(f"r{i}", _conversation(a)) for i, a in enumerate(ANSWERS)]
    batch = collator(samples)
    tok = processor.tokenizer
    end_token = tok.convert_ids_to_tokens(collator.markers.end_id)
    assert end_token in ("<end_of_turn>", "<|im_end|>")
    for row, answer in enumerate(ANSWERS):
        runs = _labelled_segments(batch["labels"][row])
        assert len(runs) == 1
        assert runs[0][-1] == collator.markers.end_id
        assert tok.decode(runs[0][:-1]) == answer
    # Padding and image tokens never carry labels.
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    image_ids = {tok.convert_tokens_to_ids(t) for t in ("<image_soft_token>", "<|image_pad|>")} - {None}
    for image_id in image_ids:
        assert not (batch["labels"] == image_id).any()
    assert batch["num_skipped"] == 0 and batch["record_ids"] == ["r0", "r1"]


def test_multi_turn_labels_every_assistant_turn(processor):
    collator = VLMCollator(processor, max_length=4096)
    conversation = _conversation("first answer") + [
        {"role": "user", "content": [{"type": "text", "text": "And the total?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "second answer"}]},
    ]
    batch = collator([Sample("multi", conversation)])
    runs = _labelled_segments(batch["labels"][0])
    decoded = [processor.tokenizer.decode(r[:-1]) for r in runs]
    assert decoded == ["first answer", "second answer"]


def test_markers_come_from_the_chat_template(gemma3_dir, qwen_dir):
    gemma = AssistantMarkers.from_processor(_processor(gemma3_dir))
    qwen = AssistantMarkers.from_processor(_processor(qwen_dir))
    g_tok, q_tok = _processor(gemma3_dir).tokenizer, _processor(qwen_dir).tokenizer
    assert g_tok.decode(list(gemma.header_ids)) == "<start_of_turn>model\n"
    assert q_tok.decode(list(qwen.header_ids)) == "<|im_start|>assistant\n"


def test_multiple_images_per_sample_keep_labels_exact(gemma3_dir):
    processor = _processor(gemma3_dir)
    collator = VLMCollator(processor, max_length=4096)
    batch = collator([Sample("two", _conversation("two pictures", images=2)),
                      Sample("one", _conversation("one picture", images=1))])
    assert batch["pixel_values"].shape[0] == 3
    for row, answer in enumerate(["two pictures", "one picture"]):
        runs = _labelled_segments(batch["labels"][row])
        assert processor.tokenizer.decode(runs[0][:-1]) == answer
