"""Tiny Gemma 3 that learns to read a receipt in a few minutes on a CPU: the ``make demo`` model.

Same classes, tokenizer and chat template as the ``gemma3`` recipe (a ``Gemma3Config`` with a SigLIP tower),
but sized and initialised for reading rather than for test speed (~1.2M parameters instead of ~0.2M).
``gemma3``'s 64x64 input cannot show text at all; this one sees the demo's receipts at their own size:

* 160x160 images cut into 16x16 patches, not pooled: 100 image tokens of about two characters each
  (measured against 8x8 patches pooled 2x2 with a 64-wide tower: field F1 0.17 vs 0.14 at equal steps).
* A 4-layer decoder: it must track where it is in the answer and look that place up in the image.
* Pixels normalised around paper white (mean 0.9, std 0.3), so ink, not blank paper, is the signal: the
  tower learns glyphs about twice as fast.
* Vision position embeddings at a trained tower's scale (std 1, not 1/sqrt(width)), so an image token says
  where on the receipt it is (field F1 0.42 vs 0.35 at equal steps), and a projector whose output has the
  text embeddings' scale (Gemma 3 zero-initialises it, a hub checkpoint's is trained).
"""

from __future__ import annotations

from pathlib import Path

from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3ImageProcessor,
    Gemma3Processor,
    Gemma3TextConfig,
    GenerationConfig,
    PreTrainedModel,
    SiglipVisionConfig,
)

from vlm_sweep.models.tiny.common import EMBED_STD, init_model, pretrained_like_embeddings, save
from vlm_sweep.models.tiny.gemma3 import GEMMA3_CHAT_TEMPLATE, GEMMA_IMAGE_TOKEN, GEMMA_SPECIALS, tokenizer

IMAGE_SIZE, PATCH = 160, 16
MM_TOKENS = (IMAGE_SIZE // PATCH) ** 2  # 10x10, one token per patch
TEXT_HIDDEN, VISION_HIDDEN = 128, 128
POSITION_STD = 1.0
PAPER_MEAN, PAPER_STD = 0.9, 0.3


def build(output_dir: Path) -> None:
    """Gemma 3 (SigLIP tower + Gemma3 decoder), 160x160 images -> 100 soft tokens, ~1.2M parameters."""
    tok = tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in GEMMA_SPECIALS + [GEMMA_IMAGE_TOKEN]}
    layers = 4
    text_config = Gemma3TextConfig(
        vocab_size=len(tok), hidden_size=TEXT_HIDDEN, intermediate_size=2 * TEXT_HIDDEN, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32,
        sliding_window=512, layer_types=["full_attention"] * layers, max_position_embeddings=4096,
        pad_token_id=ids["<pad>"], eos_token_id=ids["<eos>"], bos_token_id=ids["<bos>"],
    )
    vision_config = SiglipVisionConfig(
        hidden_size=VISION_HIDDEN, intermediate_size=2 * VISION_HIDDEN, num_hidden_layers=2, num_attention_heads=4,
        image_size=IMAGE_SIZE, patch_size=PATCH, vision_use_head=False,
    )
    config = Gemma3Config(
        text_config=text_config, vision_config=vision_config, mm_tokens_per_image=MM_TOKENS,
        boi_token_index=ids["<start_of_image>"], eoi_token_index=ids["<end_of_image>"],
        image_token_index=ids[GEMMA_IMAGE_TOKEN],
    )

    def pretrained_scales(model: PreTrainedModel) -> None:
        pretrained_like_embeddings(model)  # text embeddings: RMS EMBED_STD * sqrt(TEXT_HIDDEN) after Gemma's scaling
        # The projector's input is RMS-normalised, so this std gives image tokens the text embeddings' RMS.
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(
            std=EMBED_STD * (TEXT_HIDDEN / VISION_HIDDEN) ** 0.5)
        model.model.vision_tower.embeddings.position_embedding.weight.normal_(std=POSITION_STD)

    model = init_model(Gemma3ForConditionalGeneration, config, pretrained_scales)
    image_processor = Gemma3ImageProcessor(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_mean=[PAPER_MEAN] * 3, image_std=[PAPER_STD] * 3,
        resample=2,
    )
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tok,
                                chat_template=GEMMA3_CHAT_TEMPLATE, image_seq_length=MM_TOKENS)
    generation = GenerationConfig(bos_token_id=ids["<bos>"], pad_token_id=ids["<pad>"],
                                  eos_token_id=[ids["<eos>"], ids["<end_of_turn>"]])
    save(output_dir, model, processor, generation)
