"""Tiny, randomly initialised stand-ins for hub vision-language models.

This machine has no GPU and no Hugging Face hub, yet the training code must be exercised end to end. The recipes
here build miniature checkpoints from the *real* config, model, tokenizer and processor classes, and save them the
way the hub repos are laid out, so they load through exactly the code path a hub id takes:
``AutoModelForImageTextToText.from_pretrained(dir)`` and ``AutoProcessor.from_pretrained(dir)``.

Tokenizers are trained locally (BPE, deterministic corpus) with the same normalizer / pre-tokenizer pipeline the real
tokenizer class rebuilds on load (``GemmaTokenizer``: SentencePiece-style "▁" + byte fallback; ``Qwen2Tokenizer``:
byte-level with Qwen's split regex), so a vocab trained here means the same thing after ``from_pretrained``.
Nemotron's (``PreTrainedTokenizerFast``, in tiny_nemotron.py) is loaded from tokenizer.json as saved.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3ImageProcessor,
    Gemma3Processor,
    Gemma3TextConfig,
    GemmaTokenizer,
    GenerationConfig,
    PreTrainedConfig,
    PreTrainedModel,
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2Tokenizer,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
    SiglipVisionConfig,
)
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX as QWEN_PRETOKENIZE_REGEX

MARKER = "tiny_build.json"  # written last: its presence means the directory is a complete build
# A hub checkpoint's (tied) embeddings are trained and far from the 0.02 init; with 0.02 a tiny
# model's logits are too flat for LoRA (embeddings frozen) to learn anything in a demo's steps.
EMBED_STD = 0.25
RECIPE_VERSION = 3  # bump when a recipe's output changes: older builds are then rebuilt

# --------------------------------------------------------------------------------------------- chat templates
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

# ---------------------------------------------------------------------------------------------------- corpus
_WORDS = (
    "the a an of to and in is it this that with for on at by from as be are was were has have had not no yes "
    "what which who where when how why there here image picture photo receipt document page text total price item "
    "items menu store shop date time cash change tax card credit discount service subtotal amount quantity count "
    "unit number table order bill paid payment thank you please describe read show shows list name value answer "
    "question user model assistant system helpful one two three four five red green blue black white small large "
    "left right top bottom first last new old good great coffee tea ice milk rice chicken beef noodle soup water "
    "juice bread cake cheese sugar hot cold fried grilled special set combo extra regular medium sweet"
).split()
# CORD-v2 style field names; the tags are ordinary text for the tokenizer, never special tokens.
_CORD_FIELDS = (
    "menu nm num unitprice cnt discountprice price itemsubtotal vatyn etc sub_nm sub_unitprice sub_cnt sub_price "
    "sub_etc void_menu sub_total subtotal_price discount_price service_price othersvc_price tax_price total "
    "total_price total_etc cashprice changeprice creditcardprice emoneyprice menutype_cnt menuqty_cnt"
).split()
_SYLLABLES = "ka ri to ne mo sa lu vi de po an el or ist ing ter con pre tion ble ment pro com dis".split()


def _number(rng: random.Random) -> str:
    """Receipt-like numbers: '12,500', '3.50', '7', '1999'."""
    n = rng.randint(0, 250_000)
    return rng.choice([f"{n:,}", f"{n / 100:.2f}", str(n % 20), str(n)])


def _cord_answer(rng: random.Random) -> str:
    """A CORD-style target sequence (``<s_menu><s_nm>..</s_nm>..<sep/>..</s_menu>``)."""
    items = []
    for _ in range(rng.randint(1, 3)):
        name = " ".join(rng.choice(_WORDS).upper() for _ in range(rng.randint(1, 3)))
        fields = [f"<s_nm>{name}</s_nm>"] + [
            f"<s_{f}>{_number(rng)}</s_{f}>" for f in rng.sample(_CORD_FIELDS[1:], rng.randint(1, 3))
        ]
        items.append("".join(fields))
    total = f"<s_total><s_total_price>{_number(rng)}</s_total_price></s_total>"
    return f"<s_menu>{'<sep/>'.join(items)}</s_menu>{total}"


def _corpus(n_lines: int = 4000, seed: int = 0) -> Iterator[str]:
    """Deterministic training text: prose, pseudo-words, numbers, CORD tags and chat-template fragments."""
    rng = random.Random(seed)
    headers = ["user\n", "model\n", "assistant\n", "system\n", "You are a helpful assistant.", "Describe this image."]
    for i in range(n_lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 12))]
        words += ["".join(rng.choices(_SYLLABLES, k=rng.randint(2, 4))) for _ in range(rng.randint(0, 3))]
        rng.shuffle(words)
        sentence = " ".join(words).capitalize() + rng.choice([".", "?", "!", ":", ","])
        yield f"{headers[i % len(headers)]}{sentence} {_number(rng)}\n{_cord_answer(rng)}\n"


def _train_bpe(tokenizer: Tokenizer, vocab_size: int, corpus: Iterable[str] | None = None,
               **trainer_kwargs) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Train ``tokenizer``'s BPE model on the corpus; return its (vocab, merges) to re-home in a real class."""
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, **trainer_kwargs)
    tokenizer.train_from_iterator(_corpus() if corpus is None else corpus, trainer)
    model = json.loads(tokenizer.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return model["vocab"], merges


# ------------------------------------------------------------------------------------------------ tokenizers
GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>",
                  "<start_of_image>", "<end_of_image>"]  # Gemma's order for the first four (pad 0 .. unk 3)
GEMMA_IMAGE_TOKEN = "<image_soft_token>"  # last in the vocab, as in the real one (262,144 there)


def _gemma_tokenizer() -> GemmaTokenizer:
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
    learned, merges = _train_bpe(trainer_tok, vocab_size=1800)
    tokens = GEMMA_SPECIALS + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [t for t, _ in sorted(learned.items(), key=lambda kv: kv[1]) if t not in tokens]
    tokens.append(GEMMA_IMAGE_TOKEN)
    tokenizer = GemmaTokenizer(
        vocab={t: i for i, t in enumerate(tokens)},
        merges=merges,
        add_bos_token=True,
        add_eos_token=False,
        chat_template=GEMMA3_CHAT_TEMPLATE,
        # Named extra specials give tokenizer.image_token / boi_token / eoi_token (+ _id), which Gemma3Processor reads.
        extra_special_tokens={"image_token": GEMMA_IMAGE_TOKEN, "boi_token": "<start_of_image>",
                              "eoi_token": "<end_of_image>"},
    )
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in ("<start_of_turn>", "<end_of_turn>")],
                         special_tokens=True)
    return tokenizer


QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                 "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                 "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
QWEN_PLAIN_ADDED = ["<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
                    "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]  # added but not special, as in Qwen2.5


def _qwen_tokenizer() -> Qwen2Tokenizer:
    """Byte-level BPE trained with exactly the pipeline ``Qwen2Tokenizer`` rebuilds on load (NFC + Qwen regex)."""
    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.normalizer = normalizers.NFC()
    trainer_tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    learned, merges = _train_bpe(trainer_tok, vocab_size=2000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    # Added tokens follow the learned vocab in Qwen's order (<|endoftext|> = first id after the BPE vocab).
    tokens = [t for t, _ in sorted(learned.items(), key=lambda kv: kv[1])] + QWEN_SPECIALS + QWEN_PLAIN_ADDED
    tokenizer = Qwen2Tokenizer(
        vocab={t: i for i, t in enumerate(tokens)},
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        errors="replace",
        model_max_length=131072,  # as in Qwen2.5-VL
        chat_template=QWEN2_5_VL_CHAT_TEMPLATE,
        extra_special_tokens=QWEN_SPECIALS[1:],
    )
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIALS], special_tokens=True)
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in QWEN_PLAIN_ADDED])
    return tokenizer


# --------------------------------------------------------------------------------------------------- recipes
def _init_model(model_cls: type[PreTrainedModel], config: PreTrainedConfig,
                init: Callable[[PreTrainedModel], None] | None = None) -> PreTrainedModel:
    """Seeded random init (identical weights every build) without touching the caller's global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = model_cls(config)
        if init is not None:
            with torch.no_grad():
                init(model)
    return model


def _pretrained_like_embeddings(model: PreTrainedModel) -> None:
    model.get_input_embeddings().weight.normal_(std=EMBED_STD)
    output = model.get_output_embeddings()
    if output is not None and output.weight is not model.get_input_embeddings().weight:
        output.weight.normal_(std=EMBED_STD)


def _save(output_dir: Path, model: PreTrainedModel, processor: ProcessorMixin, generation: GenerationConfig) -> None:
    model.generation_config = generation
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)


def build_gemma3(output_dir: Path) -> None:
    """Gemma 3 (SigLIP vision tower + Gemma3 text decoder), 64x64 images -> 16 soft tokens."""
    tokenizer = _gemma_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in GEMMA_SPECIALS + [GEMMA_IMAGE_TOKEN]}
    image_size, mm_tokens = 64, 16  # 8x8 SigLIP patches, average-pooled 2x2 -> 4x4 = 16 tokens
    text_config = Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
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
        _pretrained_like_embeddings(model)

    model = _init_model(Gemma3ForConditionalGeneration, config, trained_projector)
    image_processor = Gemma3ImageProcessor(
        size={"height": image_size, "width": image_size}, image_mean=[0.5] * 3, image_std=[0.5] * 3, resample=2,
    )
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer,
                                chat_template=GEMMA3_CHAT_TEMPLATE, image_seq_length=mm_tokens)
    generation = GenerationConfig(bos_token_id=ids["<bos>"], pad_token_id=ids["<pad>"],
                                  eos_token_id=[ids["<eos>"], ids["<end_of_turn>"]])
    _save(output_dir, model, processor, generation)


def build_qwen2_5_vl(output_dir: Path) -> None:
    """Qwen2.5-VL (window-attention ViT + Qwen2 decoder with M-RoPE); a 64x64 image -> 56x56 -> 4 tokens."""
    tokenizer = _qwen_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    patch, merge = 14, 2
    text_config = {
        "vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
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
    model = _init_model(Qwen2_5_VLForConditionalGeneration, config, _pretrained_like_embeddings)
    pixels = {"min_pixels": 56 * 56, "max_pixels": 112 * 112, "patch_size": patch, "merge_size": merge,
              "temporal_patch_size": 2}
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**pixels),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(**pixels, cap_pixels_per_frame=True),
        chat_template=QWEN2_5_VL_CHAT_TEMPLATE,
    )
    generation = GenerationConfig(bos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"],
                                  eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]])
    _save(output_dir, model, processor, generation)


def build_nemotron_vl(output_dir: Path) -> None:
    """Nemotron Nano VL (RADIO + projector + hybrid Mamba2/attention LM); the recipe is in tiny_nemotron.py."""
    from vlm_sweep.models.tiny_nemotron import build_nemotron_vl as build  # imports this module's helpers

    build(output_dir)


TINY_RECIPES: dict[str, Callable[[Path], None]] = {
    "gemma3": build_gemma3,
    "qwen2_5_vl": build_qwen2_5_vl,
    "nemotron_vl": build_nemotron_vl,
}


def _build_state(path: Path, recipe: str) -> str:
    """'current', 'stale' (built by an older RECIPE_VERSION), or 'absent' (no marker); another recipe is an error."""
    marker = path / MARKER
    if not marker.is_file():
        return "absent"
    built = json.loads(marker.read_text())
    if built.get("recipe") != recipe:
        raise ValueError(f"{path} already holds a tiny {built.get('recipe')!r} model, not {recipe!r}")
    return "current" if built.get("version") == RECIPE_VERSION else "stale"


def _install(tmp: Path, output_dir: Path, recipe: str) -> None:
    """Atomically move a finished build into place; lose gracefully to a concurrent builder, replace a stale build."""
    try:
        os.rename(tmp, output_dir)  # atomic; also replaces an *empty* directory
        return
    except OSError:
        state = _build_state(output_dir, recipe)
    if state == "current":  # another process won the race: use its (identical) build
        return
    if state == "absent":
        raise FileExistsError(f"{output_dir} exists but is not a tiny {recipe!r} build; remove it or pick another path")
    stale = tmp.with_name(tmp.name.replace(".tmp-", ".stale-"))
    try:
        os.rename(output_dir, stale)
    except FileNotFoundError:
        pass  # a concurrent builder already moved it
    try:
        os.rename(tmp, output_dir)
    except OSError:
        if _build_state(output_dir, recipe) != "current":
            raise
    finally:
        shutil.rmtree(stale, ignore_errors=True)


def build_tiny_model(recipe: str, output_dir: str | os.PathLike) -> Path:
    """Build the tiny ``recipe`` checkpoint into ``output_dir`` once, and return its path.

    A complete build (marker file written last) is reused as is; one made by an older RECIPE_VERSION is rebuilt.
    Building happens in a temporary sibling directory that is renamed into place, so concurrent builders (e.g. one
    per rank) never see a half-written directory: the loser of the rename race deletes its copy and uses the
    winner's (builds are deterministic, so both are byte-identical).
    """
    if recipe not in TINY_RECIPES:
        raise ValueError(f"unknown tiny recipe {recipe!r}; known: {sorted(TINY_RECIPES)}")
    output_dir = Path(output_dir).absolute()
    if _build_state(output_dir, recipe) == "current":
        return output_dir
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = output_dir.parent / f".{output_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        TINY_RECIPES[recipe](tmp)
        (tmp / MARKER).write_text(json.dumps({"recipe": recipe, "version": RECIPE_VERSION}) + "\n")
        _install(tmp, output_dir, recipe)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output_dir
