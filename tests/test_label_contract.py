"""The label contract, for every family: labels are exactly each assistant answer plus its end-of-turn token.

Multi-turn, multi-image and system-prompt rows go through one collate call; per row, every contiguous labelled run
must decode to one assistant answer (in order) followed by the template's end-of-turn token, and nothing else
(no assistant header, no think tags the template injects, no user or system text, no media tokens, no padding).
"""

from __future__ import annotations


import pytest
import torch
from PIL import Image

from conftest import CACHE
from family_expectations import EXPECTED, FAMILY_OF, RECIPES
from vlm_sweep.data.collate import IGNORE_INDEX, VLMCollator
from vlm_sweep.data.datasets import Sample
from vlm_sweep.data.formats import assistant_texts
from vlm_sweep.models.registry import get_family

# tiny recipe (one per family in conftest.FAMILIES) -> (what the template puts between an answer and its
# end-of-turn token, that token), from the family's expectations row in family_expectations.EXPECTED
CLOSING = {recipe: (EXPECTED[recipe]["sep"], EXPECTED[recipe]["end"]) for recipe in RECIPES}


@pytest.fixture(scope="module", params=sorted(CLOSING))
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def processor(family):
    from transformers import AutoProcessor

    from vlm_sweep.models.tiny import build_tiny_model

    model_dir = build_tiny_model(family, CACHE / "models" / f"tiny_{family}")
    return AutoProcessor.from_pretrained(model_dir, **get_family(FAMILY_OF[family]).processor_kwargs)


def _image(i: int) -> Image.Image:
    return Image.new("RGB", (64, 64), (40 * i % 256, 90, 200 - 30 * i))


def _user(text: str, images: int = 0, first: int = 0) -> dict:
    parts = [{"type": "image", "image": _image(first + i)} for i in range(images)]
    return {"role": "user", "content": parts + [{"type": "text", "text": text}]}


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


ROWS = {
    "multi_turn": [_user("What is the total?", images=1), _assistant("<s_total>12</s_total>"),
                   _user("And the item?"), _assistant("<s_menu><s_nm>ICE TEA</s_nm></s_menu>"),
                   _user("Anything else?"), _assistant("blue")],
    "multi_image": [_user("Compare these.", images=2), _assistant("the left one is darker"),
                    _user("And this one?", images=1, first=2), _assistant("line one\nline two")],
    "system_prompt": [{"role": "system", "content": [{"type": "text", "text": "You answer briefly."}]},
                      _user("Describe it.", images=1), _assistant("a blue square"),
                      _user("Colour?"), _assistant("blue")],
    "single_turn": [_user("What is shown?", images=1), _assistant("a square")],
}


def _runs(labels: torch.Tensor) -> list:
    """Contiguous runs of labelled ids."""
    runs, current = [], []
    for value in labels.tolist() + [IGNORE_INDEX]:
        if value == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(value)
    return runs


def test_labels_are_every_answer_and_its_end_of_turn_token(family, processor):
    sep, end_token = CLOSING[family]
    tokenizer = processor.tokenizer
    end_id = tokenizer.convert_tokens_to_ids(end_token)
    samples = [Sample(name, conversation) for name, conversation in ROWS.items()]
    batch = VLMCollator(processor, max_length=4096)(samples)
    assert batch["record_ids"] == list(ROWS) and batch["num_skipped"] == 0
    labelled = batch["labels"] != IGNORE_INDEX
    assert (batch["labels"][labelled] == batch["input_ids"][labelled]).all()
    assert not labelled[batch["attention_mask"] == 0].any(), "padding is labelled"
    for row, (name, conversation) in enumerate(ROWS.items()):
        answers = assistant_texts(conversation)
        runs = _runs(batch["labels"][row])
        assert len(runs) == len(answers), f"{family} {name}: {len(runs)} labelled runs for {len(answers)} answers"
        for run, answer in zip(runs, answers):
            assert run[-1] == end_id, f"{family} {name}: a run ends in {tokenizer.decode(run[-1:])!r}"
            assert tokenizer.decode(run[:-1]) == answer + sep, f"{family} {name}"
