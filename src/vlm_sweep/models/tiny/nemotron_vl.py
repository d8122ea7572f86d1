"""Tiny Nemotron Nano VL / Nemotron 3 Nano Omni: transformers' native ``nemotron_h_omni`` classes, Nano V2's text side.

The model is ``NemotronH_Omni_Reasoning_V3`` (RADIO vision model -> pixel shuffle -> MLP projector -> hybrid
Mamba2/attention/mixture-of-experts Nemotron-H LM, plus a Parakeet audio encoder), the architecture of
Nemotron-3-Nano-Omni-30B-A3B; its dense MLP layer keeps NVIDIA-Nemotron-Nano-12B-v2-VL's block in the mix too. The
MoE layer stores its routed experts as fused 3-D parameters (``mixer.experts.up_proj`` / ``down_proj``), as the
real checkpoint does, so LoRA has to reach them by parameter, not by ``nn.Linear``. Its tokenizer and chat template
follow the hub model's, since they decide label masking and stopping: ``<SPECIAL_10>System`` / ``<SPECIAL_11>User`` /
``<SPECIAL_11>Assistant`` turns closed by ``\\n<SPECIAL_12>\\n``, ``<think>`` tags opening the final answer, ``<s>``
added in front, no pad token, and ``<image>`` / ``<video>`` placeholders that the processor expands into
``<img><image>...</img>`` runs. Mamba runs on the PyTorch path: mamba_ssm / causal_conv1d are not needed.
The tokenizer (``PreTrainedTokenizerFast``) is loaded from tokenizer.json as saved, so its pipeline is free here.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    GenerationConfig,
    NemotronH_Omni_Reasoning_V3,
    NemotronH_Omni_Reasoning_V3_Config,
    NemotronH_Omni_Reasoning_V3ImageProcessor,
    NemotronH_Omni_Reasoning_V3Processor,
    NemotronH_Omni_Reasoning_V3VideoProcessor,
    NemotronHConfig,
    ParakeetEncoderConfig,
    ParakeetFeatureExtractor,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    RadioConfig,
)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from vlm_sweep.models.tiny.common import (
    EMBED_STD,
    init_model,
    pretrained_like_embeddings,
    save,
    train_bpe,
    training_corpus,
)

# Nemotron Nano V2's chat template, reduced to what a VLM conversation uses (no tools). Multimodal content lists render
# as <image>/<video>/<so_embedding> (audio) placeholders, one per line, before the text.
NEMOTRON_VL_CHAT_TEMPLATE = """
{%- macro render(content) -%}
    {%- if content is string -%}{{ content }}
    {%- else -%}
        {%- for item in content -%}
            {%- if item['type'] == 'image' -%}{{ '<image>\n' }}
            {%- elif item['type'] == 'video' -%}{{ '<video>\n' }}
            {%- elif item['type'] == 'audio' -%}{{ '<so_embedding>\n' }}
            {%- elif item['type'] == 'text' -%}{{ item['text'] }}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
{%- endmacro -%}
{%- set ns = namespace(enable_thinking=true, last_turn_assistant_content='') -%}
{%- for message in messages -%}
    {%- set content = render(message['content']) -%}
    {%- if message['role'] == 'user' or message['role'] == 'system' -%}
        {%- if '/think' in content -%}{%- set ns.enable_thinking = true -%}
        {%- elif '/no_think' in content -%}{%- set ns.enable_thinking = false -%}
        {%- endif -%}
    {%- endif -%}
{%- endfor -%}
{%- if messages[0]['role'] == 'system' -%}
    {%- set system = render(messages[0]['content']).replace('/think', '').replace('/no_think', '') -%}
    {{- '<SPECIAL_10>System\n' + system.strip() -}}
    {%- set messages = messages[1:] -%}
{%- else -%}
    {{- '<SPECIAL_10>System\n' -}}
{%- endif -%}
{{- '\n' -}}
{%- if messages and messages[-1]['role'] == 'assistant' -%}
    {%- set ns.last_turn_assistant_content = render(messages[-1]['content']).strip() -%}
    {%- set messages = messages[:-1] -%}
{%- endif -%}
{%- for message in messages -%}
    {%- set content = render(message['content']) -%}
    {%- if message['role'] == 'user' -%}
        {{- '<SPECIAL_11>User\n' + content.replace('/think', '').replace('/no_think', '').strip() + '\n' -}}
    {%- elif message['role'] == 'assistant' -%}
        {%- if '</think>' in content -%}{%- set content = content.split('</think>')[1] -%}{%- endif -%}
        {{- '<SPECIAL_11>Assistant\n' + content.strip() + '\n<SPECIAL_12>\n' -}}
    {%- endif -%}
{%- endfor -%}
{%- set think = '<think>\n' if ns.enable_thinking else '<think></think>' -%}
{%- if add_generation_prompt -%}
    {{- '<SPECIAL_11>Assistant\n' + think + ns.last_turn_assistant_content -}}
{%- elif ns.last_turn_assistant_content -%}
    {{- '<SPECIAL_11>Assistant\n' + think + ns.last_turn_assistant_content + '\n<SPECIAL_12>\n' -}}
{%- endif -%}
"""

# Ids 0-19 are reserved specials, as in Nemotron-H's vocabulary (real: 0-999); 10/11/12 open the system turn, open
# user/assistant turns and end a turn. The multimodal tokens follow the learned vocabulary, as in the VL model.
NEMOTRON_SPECIALS = ["<unk>", "<s>", "</s>"] + [f"<SPECIAL_{i}>" for i in range(3, 20)]
NEMOTRON_THINK = ["<think>", "</think>"]
NEMOTRON_MEDIA = ["<image>", "<img>", "</img>", "<video>"]
# The audio placeholders the omni processor expands a clip into (<so_start> <so_embedding>... <so_end>).
NEMOTRON_AUDIO = ["<so_start>", "<so_end>", "<so_embedding>"]
# Hybrid pattern "M-*E": Mamba2, dense MLP (the 12B V2 VL's block), attention, mixture of experts (the Omni's block:
# its LM repeats Mamba2/MoE pairs with an attention layer every few blocks and has no dense MLP).
NEMOTRON_LAYERS = ["linear_attention", "mlp", "full_attention", "moe"]
# A few tiny experts: 4 routed (2 per token) plus the always-on shared expert, as in Nemotron 3 Nano (128 routed, 6
# per token, 1 shared).
NEMOTRON_MOE = dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                    moe_shared_expert_intermediate_size=64, n_group=1, topk_group=1)
# A one-layer Parakeet (FastConformer) encoder with the omni checkpoint's projector fields; 80 mel bins as
# ParakeetFeatureExtractor computes by default, 8x subsampling as the processor assumes.
NEMOTRON_AUDIO_ENCODER = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                              conv_kernel_size=3, subsampling_conv_channels=8, num_mel_bins=80, subsampling_factor=8,
                              projection_hidden_size=64, projection_bias=False)
# Mistral-NeMo ("tekken") style split (transformers flags the hub tokenizer as using Mistral's regex): letter runs,
# single digits, punctuation runs, newline runs.
NEMOTRON_PRETOKENIZE_REGEX = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|"
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _nemotron_corpus() -> Iterator[str]:
    """The shared corpus plus Nemotron's turn headers, so 'System' / 'User' / 'Assistant' are single tokens."""
    for i, line in enumerate(training_corpus()):
        yield f"{('System', 'User', 'Assistant')[i % 3]}\n{line}"


def tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE with a tekken-style split, adding ``<s>`` in front like the hub tokenizer.

    Training also isolates '\\n', so no merge ever glues a newline to text: the answer's last token and the
    template's closing newline stay separate tokens whatever the answer ends with.
    """
    split = pre_tokenizers.Split(Regex(NEMOTRON_PRETOKENIZE_REGEX), behavior="isolated")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("\n", "isolated"), split, byte_level])
    learned, merges = train_bpe(trainer_tok, vocab_size=2000, corpus=_nemotron_corpus(),
                                 initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokens = NEMOTRON_SPECIALS + [t for t, _ in sorted(learned.items(), key=lambda kv: kv[1])]
    tokens += NEMOTRON_THINK + NEMOTRON_MEDIA + NEMOTRON_AUDIO
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([split, byte_level])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in NEMOTRON_SPECIALS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in NEMOTRON_THINK])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in NEMOTRON_MEDIA + NEMOTRON_AUDIO])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="<SPECIAL_12>", unk_token="<unk>",
        model_max_length=131072, chat_template=NEMOTRON_VL_CHAT_TEMPLATE,
    )


def _pretrained_like(model: PreTrainedModel) -> None:
    """Embeddings and LM head at a trained scale, and a projector whose image tokens land at that scale too.

    The wrapper exposes no output embeddings, so the LM head is reached through the language model: left at 0.02 the
    logits would be flat (loss = ln(vocab)) and LoRA would barely move them. At the default init the two-layer
    projector shrinks RADIO features to ~1/50 of a text embedding: images would barely reach the LM and the vision
    model would get almost no gradient, unlike a trained checkpoint.
    """
    pretrained_like_embeddings(model)
    model.language_model.get_output_embeddings().weight.normal_(std=EMBED_STD)
    projector = model.multi_modal_projector
    projector.linear_1.weight.normal_(std=projector.linear_1.in_features ** -0.5)
    # relu2 of a unit normal has rms ~1.2; scale the second layer so outputs have std ~EMBED_STD.
    projector.linear_2.weight.normal_(std=EMBED_STD / (1.2 * projector.linear_2.in_features ** 0.5))


def build(output_dir: Path) -> None:
    """Nemotron Omni: RADIO (2 layers) + projector + Nemotron-H "M-*E" (Mamba2, MLP, attention, MoE) + Parakeet.

    A 64x64 image is 4x4 RADIO patches of 16 px -> 2x2 after pixel shuffle = 4 image tokens; images are capped at
    64 patches (16 tokens), video frames target 16 patches and pack 2 frames per tubelet.
    """
    tok = tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in NEMOTRON_SPECIALS + NEMOTRON_MEDIA + NEMOTRON_AUDIO}
    text_config = NemotronHConfig(
        vocab_size=len(tok), hidden_size=64, layers_block_type=NEMOTRON_LAYERS,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=128,
        mamba_num_heads=8, mamba_head_dim=16, n_groups=2, ssm_state_size=16, conv_kernel=4, chunk_size=64,
        max_position_embeddings=4096, tie_word_embeddings=False, **NEMOTRON_MOE,
        pad_token_id=ids["<unk>"], bos_token_id=ids["<s>"], eos_token_id=ids["<SPECIAL_12>"],
    )
    vision_config = RadioConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=4.0, patch_size=16, image_size=64,
        max_img_size=256, num_cls_tokens=2, num_registers=2, video_temporal_patch_size=2,
    )
    config = NemotronH_Omni_Reasoning_V3_Config(
        vision_config=vision_config, text_config=text_config, vision_hidden_size=32, projector_hidden_size=64,
        audio_config=ParakeetEncoderConfig(**NEMOTRON_AUDIO_ENCODER, attention_bias=False, scale_input=False),
        downsample_ratio=0.5, video_temporal_patch_size=2,
        image_token_id=ids["<image>"], video_token_id=ids["<video>"], audio_token_id=ids["<so_embedding>"],
    )
    model = init_model(NemotronH_Omni_Reasoning_V3, config, _pretrained_like)
    processor = NemotronH_Omni_Reasoning_V3Processor(
        image_processor=NemotronH_Omni_Reasoning_V3ImageProcessor(min_num_patches=16, max_num_patches=64),
        video_processor=NemotronH_Omni_Reasoning_V3VideoProcessor(
            norm_mean=list(OPENAI_CLIP_MEAN), norm_std=list(OPENAI_CLIP_STD), video_target_num_patches=16),
        tokenizer=tok,
        feature_extractor=ParakeetFeatureExtractor(),  # mel features for the audio tower
        chat_template=NEMOTRON_VL_CHAT_TEMPLATE,
    )
    generation = GenerationConfig(bos_token_id=ids["<s>"], pad_token_id=ids["<unk>"],
                                  eos_token_id=[ids["</s>"], ids["<SPECIAL_12>"]])
    save(output_dir, model, processor, generation)
