"""Tiny Qwen3-VL: ViT with learned + 2-D rotary positions and DeepStack mergers, Qwen3 decoder with interleaved M-RoPE.

Qwen3-VL's tokenizer is Qwen2.5's (``Qwen2Tokenizer``, same byte-level BPE pipeline and special tokens, plus
``<think>``/``<tool_response>`` as plain added tokens), trained locally by ``qwen_tokenizer``. What differs from
Qwen2.5-VL: 16-pixel patches (a 32-pixel merge factor), no window attention, DeepStack (features of early ViT blocks added to the first decoder layers' image positions), interleaved M-RoPE, and
a chat template that adds no default system turn.
"""

from __future__ import annotations

from pathlib import Path

from transformers import (
    GenerationConfig,
    Qwen2Tokenizer,
    Qwen2VLImageProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
)

from vlm_sweep.models.tiny.common import init_model, pretrained_like_embeddings, save
from vlm_sweep.models.tiny.qwen_tokenizer import QWEN2_PLAIN_ADDED, QWEN_SPECIALS, qwen_tokenizer

# Qwen3-VL's template (Qwen/Qwen3-VL-*-Instruct) without its tool-calling branches (tools, tool_calls, tool turns):
# system turn only when given, images/videos as <|vision_start|><|image_pad|>/<|video_pad|><|vision_end|>.
QWEN3_VL_CHAT_TEMPLATE = (
    "{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].content is string %}{{- messages[0].content }}{%- else %}"
    "{%- for content in messages[0].content %}{%- if 'text' in content %}{{- content.text }}{%- endif %}{%- endfor %}"
    "{%- endif %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- set image_count = namespace(value=0) %}{%- set video_count = namespace(value=0) %}"
    "{%- for message in messages %}{%- if message.role == 'user' %}{{- '<|im_start|>' + message.role + '\\n' }}"
    "{%- if message.content is string %}{{- message.content }}{%- else %}{%- for content in message.content %}"
    "{%- if content.type == 'image' or 'image' in content or 'image_url' in content %}"
    "{%- set image_count.value = image_count.value + 1 %}{%- if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif -%}<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif content.type == 'video' or 'video' in content %}{%- set video_count.value = video_count.value + 1 %}"
    "{%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}<|vision_start|><|video_pad|><|vision_end|>"
    "{%- elif 'text' in content %}{{- content.text }}{%- endif %}{%- endfor %}{%- endif %}{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}{{- '<|im_start|>' + message.role + '\\n' }}"
    "{%- if message.content is string %}{{- message.content }}{%- else %}{%- for content_item in message.content %}"
    "{%- if 'text' in content_item %}{{- content_item.text }}{%- endif %}{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Qwen3's plain added tokens: Qwen2.5's, then the tool-response and thinking tags.
QWEN3_PLAIN_ADDED = [*QWEN2_PLAIN_ADDED, "<tool_response>", "</tool_response>", "<think>", "</think>"]


def tokenizer() -> Qwen2Tokenizer:
    """Qwen's byte-level BPE with Qwen3-VL's template and added tokens."""
    return qwen_tokenizer(QWEN3_VL_CHAT_TEMPLATE, QWEN3_PLAIN_ADDED, model_max_length=262144)


def build(output_dir: Path) -> None:
    """Qwen3-VL (DeepStack ViT + Qwen3 decoder with interleaved M-RoPE); a 64x64 image -> 4x4 patches -> 4 tokens."""
    tok = tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    patch, merge = 16, 2
    text_config = {
        "vocab_size": len(tok), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 4096,
        # head_dim 16 -> 8 rotary frequencies interleaved over (t, h, w) like the real [24, 20, 20] of 64
        "rope_parameters": {"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_section": [4, 2, 2],
                            "mrope_interleaved": True},
        "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"],
    }
    vision_config = {
        "depth": 3, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64,
        "patch_size": patch, "spatial_merge_size": merge, "temporal_patch_size": 2,
        "num_position_embeddings": 64,  # an 8x8 learned grid, bilinearly resampled per image (real: 48x48)
        "deepstack_visual_indexes": [0, 1],  # early blocks feed decoder layers 0 and 1 (real: blocks 8, 16, 24)
    }
    config = Qwen3VLConfig(
        text_config=text_config, vision_config=vision_config, tie_word_embeddings=False,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    model = init_model(Qwen3VLForConditionalGeneration, config, pretrained_like_embeddings)
    factor = patch * merge
    # 2x2 to 4x4 merged tokens per image (64x64 to 128x128 pixels), as the Qwen2.5-VL recipe's 56x56 to 112x112
    pixels = {"size": {"shortest_edge": 4 * factor * factor, "longest_edge": 16 * factor * factor},
              "patch_size": patch, "merge_size": merge, "temporal_patch_size": 2,
              "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
    processor = Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(**pixels),
        tokenizer=tok,
        video_processor=Qwen3VLVideoProcessor(**pixels, cap_pixels_per_frame=True),
        chat_template=QWEN3_VL_CHAT_TEMPLATE,
    )
    generation = GenerationConfig(bos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"],
                                  eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]])
    save(output_dir, model, processor, generation)
