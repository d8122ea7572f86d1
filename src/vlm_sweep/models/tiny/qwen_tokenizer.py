"""The tokenizer every tiny Qwen-VL build shares: Qwen's byte-level BPE, trained locally.

Qwen2.5-VL and Qwen3-VL ship the same ``Qwen2Tokenizer`` pipeline (NFC + byte-level with Qwen's split regex)
and special tokens; they differ in the chat template, the plain added tokens and ``model_max_length``. Training
with exactly the pipeline ``Qwen2Tokenizer`` rebuilds on load means a vocab trained here means the same thing
after ``from_pretrained``. Not a recipe (``common._NOT_RECIPES``): the builders import it.
"""

from __future__ import annotations

from typing import Sequence

from tokenizers import AddedToken, Regex, Tokenizer, models, normalizers, pre_tokenizers
from transformers import Qwen2Tokenizer
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX as QWEN_PRETOKENIZE_REGEX

from vlm_sweep.models.tiny.common import train_bpe

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                 "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                 "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
# Added but not special, in the hub tokenizers' order (Qwen3 appends the tool-response and thinking tags).
QWEN2_PLAIN_ADDED = ["<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
                     "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]


def qwen_tokenizer(chat_template: str, plain_added: Sequence[str], model_max_length: int) -> Qwen2Tokenizer:
    """Byte-level BPE (2,000 learned tokens), then Qwen's special and plain added tokens in the hub's order."""
    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.normalizer = normalizers.NFC()
    trainer_tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    learned, merges = train_bpe(trainer_tok, vocab_size=2000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    # Added tokens follow the learned vocab in Qwen's order (<|endoftext|> = first id after the BPE vocab).
    tokens = [t for t, _ in sorted(learned.items(), key=lambda kv: kv[1])] + QWEN_SPECIALS + list(plain_added)
    tok = Qwen2Tokenizer(
        vocab={t: i for i, t in enumerate(tokens)},
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        errors="replace",
        model_max_length=model_max_length,
        chat_template=chat_template,
        extra_special_tokens=QWEN_SPECIALS[1:],
    )
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIALS], special_tokens=True)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in plain_added])
    return tok
