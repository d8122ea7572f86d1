"""Tiny Gemma 3: SigLIP vision tower + Gemma3 text decoder, with Gemma's tokenizer conventions and chat template.

The tokenizer is trained locally (BPE, deterministic corpus) with the same normalizer / pre-tokenizer pipeline that
``GemmaTokenizer`` rebuilds on load (SentencePiece-style "▁" + byte fallback), so a vocab trained here means the same
thing after ``from_pretrained``.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3ImageProcessor,
    Gemma3Processor,
    Gemma3TextConfig,
    GemmaTokenizer,
    GenerationConfig,
    PreTrainedModel,
    SiglipVisionConfig,
)

from vlm_sweep.models.tiny.common import init_model, pretrained_like_embeddings, save, train_bpe

# Gemma 3's template (google/gemma-3-*-it): system folded into the first user turn, images as <start_of_image>.
GEMMA3_CHAT_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""

GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>",
                  "<start_of_image>", "<end_of_image>"]  # Gemma's order for the first four (pad 0 .. unk 3)
GEMMA_IMAGE_TOKEN = "<image_soft_token>"  # last in the vocab, as in the real one (262,144 there)


def tokenizer() -> GemmaTokenizer:
    """SentencePiece-style BPE (spaces -> '▁', byte fallback) in ``GemmaTokenizer``'s own pipeline.

    Training isolates '\\n' and digits so no merge ever contains them: a newline can never fuse with the text that
    follows it, whichever pre-tokenizer runs at encode time (GemmaTokenizer's does not split on newlines).
    """
    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    trainer_tok.normalizer = normalizers.Replace(" ", "▁")
    trainer_tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split("\n", "isolated"),
        pre_tokenizers.Split("▁", "merged_with_next"),
        pre_tokenizers.Digits(individual_digits=True),  # Gemma splits digits one by one
    ])
    learned, merges = train_bpe(trainer_tok, vocab_size=1800)
    tokens = GEMMA_SPECIALS + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [t for t, _ in sorted(learned.items(), key=lambda kv: kv[1]) if t not in tokens]
    tokens.append(GEMMA_IMAGE_TOKEN)
    tok = GemmaTokenizer(
        vocab={t: i for i, t in enumerate(tokens)},
        merges=merges,
        add_bos_token=True,
        add_eos_token=False,
        chat_template=GEMMA3_CHAT_TEMPLATE,
        # Named extra specials give tokenizer.image_token / boi_token / eoi_token (+ _id), which Gemma3Processor reads.
        extra_special_tokens={"image_token": GEMMA_IMAGE_TOKEN, "boi_token": "<start_of_image>",
                              "eoi_token": "<end_of_image>"},
    )
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in ("<start_of_turn>", "<end_of_turn>")],
                   special_tokens=True)
    return tok


def build(output_dir: Path) -> None:
    """Gemma 3 (SigLIP vision tower + Gemma3 text decoder), 64x64 images -> 16 soft tokens."""
    tok = tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in GEMMA_SPECIALS + [GEMMA_IMAGE_TOKEN]}
    image_size, mm_tokens = 64, 16  # 8x8 SigLIP patches, average-pooled 2x2 -> 4x4 = 16 tokens
    text_config = Gemma3TextConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16,
        sliding_window=32, layer_types=["sliding_attention", "full_attention"], max_position_embeddings=4096,
        pad_token_id=ids["<pad>"], eos_token_id=ids["<eos>"], bos_token_id=ids["<bos>"],
    )
    vision_config = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=image_size, patch_size=8, vision_use_head=False,
    )
    config = Gemma3Config(
        text_config=text_config, vision_config=vision_config, mm_tokens_per_image=mm_tokens,
        boi_token_index=ids["<start_of_image>"], eoi_token_index=ids["<end_of_image>"],
        image_token_index=ids[GEMMA_IMAGE_TOKEN],
    )

    def trained_projector(model: PreTrainedModel) -> None:
        # Gemma3 zero-initialises the vision->text projection (fine before pretraining); a hub checkpoint's is
        # trained. Left at zero, images would not affect the output and the vision tower would get no gradient.
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(std=config.initializer_range)
        pretrained_like_embeddings(model)

    model = init_model(Gemma3ForConditionalGeneration, config, trained_projector)
    image_processor = Gemma3ImageProcessor(
        size={"height": image_size, "width": image_size}, image_mean=[0.5] * 3, image_std=[0.5] * 3, resample=2,
    )
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tok,
                                chat_template=GEMMA3_CHAT_TEMPLATE, image_seq_length=mm_tokens)
    generation = GenerationConfig(bos_token_id=ids["<bos>"], pad_token_id=ids["<pad>"],
                                  eos_token_id=[ids["<eos>"], ids["<end_of_turn>"]])
    save(output_dir, model, processor, generation)
