"""model.family=nemotron_vl_remote: the collated batch is what the hub model's forward takes.

Checked against the contract recorded in the registry entry (hub modeling.py / processing.py as published,
and NVIDIA's own collates for the model), through a stand-in processor and model with that contract
(tests/nemotron_remote_standin.py). The real weights and remote code are not run here.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from nemotron_remote_standin import (MAX_TILES, TILE, TOKENS_PER_TILE, NemotronNanoVLV2Processor, StandInConfig,
                                     StandInNanoVLV2, TiledImageProcessor, tile_grid)
from vlm_sweep.data.collate import VLMCollator
from vlm_sweep.data.datasets import Sample
from vlm_sweep.data.derived_inputs import derive_inputs
from vlm_sweep.data.packing import model_inputs
from vlm_sweep.models.registry import MODEL_FAMILIES
from vlm_sweep.training.loss import NON_MODEL_KEYS

FAMILY = MODEL_FAMILIES["nemotron_vl_remote"]


@pytest.fixture(scope="module")
def processor():
    from vlm_sweep.models.tiny.nemotron_vl import NEMOTRON_VL_CHAT_TEMPLATE, tokenizer

    tok = tokenizer()
    tok.pad_token = "<unk>"  # processor_kwargs of the family
    return NemotronNanoVLV2Processor(TiledImageProcessor(), tok, chat_template=NEMOTRON_VL_CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def model(processor):
    torch.manual_seed(0)
    config = StandInConfig(img_context_token_id=processor.image_token_id, vocab_size=len(processor.tokenizer))
    return StandInNanoVLV2(config)


_Collator = VLMCollator  # the run's own collator: it derives the family's inputs per record (derived_inputs.py)


def _image(size, shade=0):
    return Image.new("RGB", size, (shade, 120, 200))


def _sample(record_id, images=(), question="What is written?", answer="total 12.50"):
    content = [{"type": "image", "image": image} for image in images] + [{"type": "text", "text": question}]
    return Sample(record_id, [{"role": "user", "content": content},
                              {"role": "assistant", "content": [{"type": "text", "text": answer}]}])


def _tiles(image):
    cols, rows = tile_grid(*image.size)
    return cols * rows + (1 if cols * rows > 1 else 0)  # the thumbnail comes with any grid bigger than 1x1


def test_tiling_follows_the_published_rule():
    """Grid closest to the aspect ratio within max_num_tiles, thumbnail only past one tile."""
    assert tile_grid(4 * TILE, TILE) == (4, 1)
    assert tile_grid(TILE, TILE) == (1, 1)
    assert tile_grid(2 * TILE, 3 * TILE) == (2, 3)
    assert tile_grid(100 * TILE, TILE) == (MAX_TILES, 1)  # capped by max_num_tiles
    out = TiledImageProcessor()([_image((4 * TILE, TILE)), _image((TILE, TILE))])
    assert out["num_patches"].tolist() == [5, 1]
    assert tuple(out["pixel_values"].shape) == (6, 3, TILE, TILE)


def test_the_family_declares_what_its_forward_needs():
    assert FAMILY.processor_class == NemotronNanoVLV2Processor.__name__
    assert "image_flags" in FAMILY.derived_inputs and "num_patches" in FAMILY.dropped_inputs


def test_processor_output_alone_is_not_what_the_forward_takes(processor, model):
    """The gap: the processor returns num_patches (no such argument) and no image_flags (dereferenced)."""
    raw = dict(processor.apply_chat_template([_sample("r", [_image((TILE, TILE))]).conversation], tokenize=True,
                                             return_dict=True, return_tensors="pt"))
    assert "image_flags" not in raw and "num_patches" in raw
    with pytest.raises(TypeError, match="num_patches"):
        model(**raw)
    raw.pop("num_patches")
    with pytest.raises(AttributeError, match="squeeze"):
        model(**{**raw, "pixel_values": raw["pixel_values"].to(torch.bfloat16)})


def test_collated_batch_carries_tiles_flags_and_expanded_context_tokens(processor):
    wide, square, tall = _image((4 * TILE, TILE), 10), _image((TILE, TILE), 20), _image((2 * TILE, 3 * TILE), 30)
    samples = [_sample("one", [wide]), _sample("text"), _sample("two", [square, tall])]
    batch = _Collator(processor, max_length=4096)(samples)
    tiles = [_tiles(wide), 0, _tiles(square) + _tiles(tall)]
    assert tiles == [5, 0, 1 + 7]
    assert "num_patches" not in batch and "pixel_values_videos" not in batch
    pixels, flags = batch["pixel_values"], batch["image_flags"]
    # Record order; the text-only record contributes one dummy tile that its flag 0 drops.
    assert tuple(pixels.shape) == (5 + 1 + 8, 3, TILE, TILE) and pixels.dtype == torch.bfloat16
    assert flags.dtype == torch.long and tuple(flags.shape) == (14, 1)
    assert flags.squeeze(-1).tolist() == [1] * 5 + [0] + [1] * 8
    assert not pixels[5].float().any()
    ids = batch["input_ids"]
    per_row = (ids == processor.image_token_id).sum(dim=1).tolist()
    assert per_row == [t * TOKENS_PER_TILE for t in tiles]
    img_open, img_close = processor.tokenizer.convert_tokens_to_ids(["<img>", "</img>"])
    assert (ids == img_open).sum(dim=1).tolist() == [1, 0, 2] == (ids == img_close).sum(dim=1).tolist()
    # Each image's context run sits between its <img> and </img>, tiles * tokens-per-tile long.
    row = ids[2].tolist()
    starts = [i for i, t in enumerate(row) if t == img_open]
    ends = [i for i, t in enumerate(row) if t == img_close]
    assert [e - s - 1 for s, e in zip(starts, ends)] == [1 * TOKENS_PER_TILE, 7 * TOKENS_PER_TILE]
    # Context tokens are never labelled.
    assert not (batch["labels"] == processor.image_token_id).any()


def test_stand_in_forward_trains_on_the_collated_batch(processor, model):
    samples = [_sample("one", [_image((4 * TILE, TILE))]), _sample("text"), _sample("two", [_image((TILE, TILE))])]
    batch = _Collator(processor, max_length=4096)(samples)
    model.zero_grad()
    out = model(**model_inputs(batch, NON_MODEL_KEYS), labels=batch["labels"], use_cache=False)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    # The projector's rows reached the LM: every real tile's features were placed.
    assert model.mlp1[-1].weight.grad is not None and model.mlp1[-1].weight.grad.abs().sum() > 0


def test_training_loss_runs_on_a_forward_without_logits_to_keep(processor, model):
    """The hub forward takes no ``logits_to_keep``: the trainer's loss falls back to all logits, same value."""
    import inspect

    from vlm_sweep.training.loss import count_label_tokens, summed_token_loss

    assert "logits_to_keep" not in inspect.signature(type(model).forward).parameters
    batch = _Collator(processor, max_length=4096)([_sample("one", [_image((2 * TILE, TILE))]), _sample("text")])
    summed = summed_token_loss(model, batch)
    reference = model(**model_inputs(batch, NON_MODEL_KEYS), labels=batch["labels"], use_cache=False).loss
    assert summed.item() == pytest.approx(reference.item() * count_label_tokens(batch), rel=1e-5)


def test_text_only_batch_still_feeds_the_vision_model(processor, model):
    batch = _Collator(processor, max_length=4096)([_sample("a"), _sample("b", question="Hello?")])
    assert batch["image_flags"].squeeze(-1).tolist() == [0, 0]
    out = model(**model_inputs(batch, NON_MODEL_KEYS), labels=batch["labels"], use_cache=False)
    assert torch.isfinite(out.loss)


def test_fp32_tiles_fail_where_the_hub_forward_would(processor, model):
    batch = _Collator(processor, max_length=4096)([_sample("one", [_image((TILE, TILE))])])
    inputs = model_inputs(batch, NON_MODEL_KEYS)
    with pytest.raises(RuntimeError):
        model(**{**inputs, "pixel_values": inputs["pixel_values"].float()}, use_cache=False)


def test_forward_refuses_a_batch_without_image_flags(processor, model):
    batch = _Collator(processor, max_length=4096)([_sample("one", [_image((TILE, TILE))])])
    inputs = model_inputs(batch, NON_MODEL_KEYS)
    inputs.pop("image_flags")
    with pytest.raises(AttributeError):
        model(**inputs, use_cache=False)


def test_video_frames_arrive_as_image_tiles(processor, model):
    frames = [_image((TILE, TILE), 40 * i) for i in range(3)]
    conversation = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]},
                    {"role": "assistant", "content": [{"type": "text", "text": "a ball rolls"}]}]
    prompt = processor.apply_chat_template(conversation, tokenize=False)
    raw = dict(processor(text=prompt, videos=[frames], return_tensors="pt"))
    video_id = processor.tokenizer.convert_tokens_to_ids("<video>")
    assert (raw["input_ids"] == video_id).sum() == 3 * TOKENS_PER_TILE
    features = derive_inputs(raw, processor)
    assert "pixel_values_videos" not in features and not (features["input_ids"] == video_id).any()
    assert tuple(features["pixel_values"].shape) == (3, 3, TILE, TILE)
    assert features["image_flags"].squeeze(-1).tolist() == [1, 1, 1]
    assert (features["input_ids"] == processor.image_token_id).sum() == 3 * TOKENS_PER_TILE
    labels = features["input_ids"].clone()
    out = model(**features, labels=labels, use_cache=False)
    assert torch.isfinite(out.loss)


def test_a_record_with_images_and_a_video_is_refused(processor):
    prompt = "<image>\n<video>\nWhat?"
    raw = dict(processor(text=prompt, images=[_image((TILE, TILE))], videos=[[_image((TILE, TILE))]],
                         return_tensors="pt"))
    with pytest.raises(ValueError, match="both images and a video"):
        derive_inputs(raw, processor)


def test_expansion_that_disagrees_with_the_tiles_is_refused(processor):
    raw = dict(processor(text="<image>\nWhat?", images=[_image((TILE, TILE))], return_tensors="pt"))
    ids = raw["input_ids"].clone()
    ids[ids == processor.image_token_id] = processor.tokenizer.convert_tokens_to_ids("<unk>")
    with pytest.raises(ValueError, match="0 image context tokens for 1 tiles"):
        derive_inputs({**raw, "input_ids": ids}, processor)


def test_a_bad_record_is_named_by_the_collator(processor):
    """A record the rules refuse is a bad record like any the processor cannot encode."""
    from vlm_sweep.data.datasets import BadRecordError

    class _Broken(_Collator):
        def _encode(self, samples):
            features = VLMCollator._encode(self, samples)
            features["input_ids"] = features["input_ids"][:, :-2]  # context tokens no longer match the tiles
            features["input_ids"][features["input_ids"] == processor.image_token_id] = 0
            return features

    with pytest.raises(BadRecordError, match="bad-one"):
        _Broken(processor, max_length=4096)([_sample("bad-one", [_image((TILE, TILE))])])


@pytest.mark.parametrize("name", sorted(n for n, f in MODEL_FAMILIES.items()
                                        if not (f.derived_inputs or f.dropped_inputs)))
def test_families_without_derived_inputs_are_untouched(name):
    features = {"input_ids": torch.ones(1, 3, dtype=torch.long), "pixel_values": torch.zeros(2, 3, 4, 4)}
    assert derive_inputs(features, object(), family=MODEL_FAMILIES[name]) is features
