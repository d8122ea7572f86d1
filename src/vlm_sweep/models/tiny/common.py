"""What every tiny-model builder shares: the training corpus, BPE training, seeded init, saving, and the build cache.

This machine has no GPU and no Hugging Face hub, yet the training code must be exercised end to end. The builders in
this package build miniature checkpoints from the *real* config, model, tokenizer and processor classes, and save them
the way the hub repos are laid out, so they load through exactly the code path a hub id takes:
``AutoModelForImageTextToText.from_pretrained(dir)`` and ``AutoProcessor.from_pretrained(dir)``.

A recipe is a module of this package named like the recipe (``model.tiny_recipe: NAME`` -> ``NAME.py``) with a
``build(output_dir)`` function. ``build_tiny_model`` finds it by name, so adding a family adds one module and edits
nothing here; this module never imports a builder statically (no import cycle).
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import random
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from tokenizers import Tokenizer, trainers
from transformers import GenerationConfig, PreTrainedConfig, PreTrainedModel, ProcessorMixin

from vlm_sweep.rundir import install_build

MARKER = "tiny_build.json"  # written last: its presence means the directory is a complete build
# A hub checkpoint's (tied) embeddings are trained and far from the 0.02 init; with 0.02 a tiny
# model's logits are too flat for LoRA (embeddings frozen) to learn anything in a demo's steps.
EMBED_STD = 0.25
RECIPE_VERSION = 4  # bump when a recipe's output changes: older builds are then rebuilt
_NOT_RECIPES = {"common", "qwen_tokenizer"}  # modules of this package that are not builders

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


def training_corpus(n_lines: int = 4000, seed: int = 0) -> Iterator[str]:
    """Deterministic training text: prose, pseudo-words, numbers, CORD tags and chat-template fragments.

    Seeded with its own ``random.Random``, so a build's tokenizer never depends on the caller's RNG state.
    """
    rng = random.Random(seed)
    headers = ["user\n", "model\n", "assistant\n", "system\n", "You are a helpful assistant.", "Describe this image."]
    for i in range(n_lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 12))]
        words += ["".join(rng.choices(_SYLLABLES, k=rng.randint(2, 4))) for _ in range(rng.randint(0, 3))]
        rng.shuffle(words)
        sentence = " ".join(words).capitalize() + rng.choice([".", "?", "!", ":", ","])
        yield f"{headers[i % len(headers)]}{sentence} {_number(rng)}\n{_cord_answer(rng)}\n"


def train_bpe(tokenizer: Tokenizer, vocab_size: int, corpus: Iterable[str] | None = None,
              **trainer_kwargs) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Train ``tokenizer``'s BPE model on the corpus; return its (vocab, merges) to re-home in a real class."""
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, **trainer_kwargs)
    tokenizer.train_from_iterator(training_corpus() if corpus is None else corpus, trainer)
    model = json.loads(tokenizer.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return model["vocab"], merges


# ----------------------------------------------------------------------------------------------- model helpers
def init_model(model_cls: type[PreTrainedModel], config: PreTrainedConfig,
               init: Callable[[PreTrainedModel], None] | None = None) -> PreTrainedModel:
    """Seeded random init (identical weights every build) without touching the caller's global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = model_cls(config)
        if init is not None:
            with torch.no_grad():
                init(model)
    return model


def pretrained_like_embeddings(model: PreTrainedModel) -> None:
    """Embeddings (and an untied LM head) at a trained checkpoint's scale, so LoRA demos can learn (see EMBED_STD)."""
    model.get_input_embeddings().weight.normal_(std=EMBED_STD)
    output = model.get_output_embeddings()
    if output is not None and output.weight is not model.get_input_embeddings().weight:
        output.weight.normal_(std=EMBED_STD)


def save(output_dir: Path, model: PreTrainedModel, processor: ProcessorMixin, generation: GenerationConfig) -> None:
    """Save like a hub repo (weights, config, generation config, processor + tokenizer) so from_pretrained loads it."""
    model.generation_config = generation
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)


# ------------------------------------------------------------------------------------------------ build cache
def known_recipes() -> list[str]:
    """The recipe names: one per builder module in this package, found on disk so no table needs editing."""
    return sorted(m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)])
                  if not m.ispkg and not m.name.startswith("_") and m.name not in _NOT_RECIPES)


def _build_state(path: Path, recipe: str) -> str:
    """'current', 'stale' (built by an older RECIPE_VERSION), or 'absent' (no marker); another recipe is an error."""
    marker = path / MARKER
    if not marker.is_file():
        return "absent"
    built = json.loads(marker.read_text())
    if built.get("recipe") != recipe:
        raise ValueError(f"{path} already holds a tiny {built.get('recipe')!r} model, not {recipe!r}")
    return "current" if built.get("version") == RECIPE_VERSION else "stale"


def build_tiny_model(recipe: str, output_dir: str | os.PathLike) -> Path:
    """Build the tiny ``recipe`` checkpoint into ``output_dir`` once, and return its path.

    The builder is the module ``vlm_sweep.models.tiny.<recipe>`` (its ``build(output_dir)``), imported by name.
    A complete build (marker file written last) is reused as is; one made by an older RECIPE_VERSION is rebuilt.
    Building happens in a temporary sibling directory that is renamed into place, so concurrent builders (e.g. one
    per rank) never see a half-written directory: the loser of the rename race deletes its copy and uses the
    winner's (builds are deterministic, so both are byte-identical).
    """
    known = known_recipes()
    if recipe not in known:
        raise ValueError(f"unknown tiny recipe {recipe!r}; known: {known}")
    output_dir = Path(output_dir).absolute()
    if _build_state(output_dir, recipe) == "current":
        return output_dir
    build: Callable[[Path], None] = importlib.import_module(f"{__package__}.{recipe}").build
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = output_dir.parent / f".{output_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        build(tmp)
        (tmp / MARKER).write_text(json.dumps({"recipe": recipe, "version": RECIPE_VERSION}) + "\n")
        install_build(tmp, output_dir, lambda path: _build_state(path, recipe),
                      f"{output_dir} exists but is not a tiny {recipe!r} build; remove it or pick another path")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output_dir
