"""Tiny Qwen2.5-VL: window-attention ViT + Qwen2 decoder with M-RoPE, with Qwen's tokenizer and chat template.

The tokenizer is trained locally (BPE, deterministic corpus) with exactly the pipeline ``Qwen2Tokenizer`` rebuilds on
load (NFC + byte-level with Qwen's split regex), so a vocab trained here means the same thing after
``from_pretrained``.
"""

from __future__ import annotations

from pathlib import Path

from transformers import (
    GenerationConfig,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2Tokenizer,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
)

from vlm_sweep.models.tiny.common import init_model, pretrained_like_embeddings, save
from vlm_sweep.models.tiny.qwen_tokenizer import QWEN2_PLAIN_ADDED, QWEN_SPECIALS, qwen_tokenizer

# Qwen2.5-VL's template (Qwen/Qwen2.5-VL-*-Instruct), verbatim.
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: "
    "{% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% endif %}"
)

def tokenizer() -> Qwen2Tokenizer:
    """Qwen's byte-level BPE with Qwen2.5-VL's template and added tokens."""
    return qwen_tokenizer(QWEN2_5_VL_CHAT_TEMPLATE, QWEN2_PLAIN_ADDED, model_max_length=131072)


def build(output_dir: Path) -> None:
    """Qwen2.5-VL (window-attention ViT + Qwen2 decoder with M-RoPE); a 64x64 image -> 56x56 -> 4 tokens."""
    tok = tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    patch, merge = 14, 2
    text_config = {
        "vocab_size": len(tok), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096, "max_window_layers": 2,
        # head_dim 16 -> 8 rotary frequencies split over (t, h, w) like the real [16, 24, 24] of 64
        "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [2, 3, 3]},
        "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"],
    }
    vision_config = {
        "depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64,
        "patch_size": patch, "spatial_merge_size": merge, "temporal_patch_size": 2,
        "window_size": 56,  # 2x2 merged tokens per window (real: 112 -> 4x4)
        "fullatt_block_indexes": [1],  # block 0 windowed, block 1 full, like every 8th block of the real one
    }
    config = Qwen2_5_VLConfig(
        text_config=text_config, vision_config=vision_config, tie_word_embeddings=False,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    model = init_model(Qwen2_5_VLForConditionalGeneration, config, pretrained_like_embeddings)
    pixels = {"min_pixels": 56 * 56, "max_pixels": 112 * 112, "patch_size": patch, "merge_size": merge,
              "temporal_patch_size": 2}
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**pixels),
        tokenizer=tok,
        video_processor=Qwen2VLVideoProcessor(**pixels, cap_pixels_per_frame=True),
        chat_template=QWEN2_5_VL_CHAT_TEMPLATE,
    )
    generation = GenerationConfig(bos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"],
                                  eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]])
    save(output_dir, model, processor, generation)
