"""Tiny stand-in models: built from the real classes, loaded through the hub's from_pretrained path, fast on CPU.

Every family in conftest.FAMILIES is a row of the parametrised tests here; facts of one family only (its special
ids, its chat template's exact text, its video encoding) have their own tests (Nemotron's: tests/test_nemotron.py).
Generation (left-padded batches answer like single prompts) is held for every family in test_family_inference.py.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from omegaconf import OmegaConf
from PIL import Image

from conftest import ROOT
from family_expectations import EXPECTED, FAMILY_OF, RECIPES
from vlm_sweep.models.registry import component_of, family_for_model_type, get_family
from vlm_sweep.models.tiny import MARKER, RECIPE_VERSION, build_tiny_model, known_recipes
from vlm_sweep.models.tiny.common import _NOT_RECIPES

ANSWERS = ["<s_total>12</s_total>", "<s_menu><s_nm>ICE TEA</s_nm><s_cnt>2</s_cnt><sep/></s_menu>"]


@pytest.fixture(scope="module", autouse=True)
def single_thread() -> Iterator[None]:
    """One intra-op thread: ops on these tiny tensors don't gain from two, and with two OpenMP threads a busy
    2-core machine (another job running) makes each op wait on a descheduled thread: ~0.4 s instead of ~15 ms."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {recipe: build_tiny_model(recipe, root / recipe) for recipe in RECIPES}


@pytest.fixture(scope="session")
def loaded(tiny_dirs: dict[str, Path]) -> dict[str, tuple]:
    """(model, processor) per recipe, loaded exactly as a hub id would be (plus the registry's processor kwargs:
    Nemotron's hub tokenizer has no pad token)."""
    return {
        recipe: (transformers.AutoModelForImageTextToText.from_pretrained(path),
                 transformers.AutoProcessor.from_pretrained(path, **get_family(FAMILY_OF[recipe]).processor_kwargs))
        for recipe, path in tiny_dirs.items()
    }


def _image(seed: int, size: tuple[int, int] = (64, 64)) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _conversation(seed: int, answer: str) -> list[dict]:
    return [
        {"role": "user", "content": [{"type": "image", "image": _image(seed)},
                                     {"type": "text", "text": "Describe this image."}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]


def _batch(processor, answers: list[str] = ANSWERS):
    convs = [_conversation(i, a) for i, a in enumerate(answers)]
    # padding goes in processor_kwargs: passed as a bare kwarg it still works but logs a warning in 5.x
    return processor.apply_chat_template(convs, tokenize=True, return_dict=True, return_tensors="pt",
                                         processor_kwargs={"padding": True})


def _labels(batch) -> torch.Tensor:
    labels = batch["input_ids"].clone()
    labels[batch["attention_mask"] == 0] = -100
    return labels


def _find(seq: list[int], sub: list[int]) -> int:
    """Index just past the last occurrence of ``sub`` in ``seq`` (-1 if absent)."""
    for i in range(len(seq) - len(sub), -1, -1):
        if seq[i:i + len(sub)] == sub:
            return i + len(sub)
    return -1


def test_unknown_recipe_lists_known(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="gemma3.*qwen2_5_vl"):
        build_tiny_model("llama", tmp_path / "x")
    assert set(RECIPES) <= set(known_recipes())


def test_every_family_with_a_tiny_model_is_a_test_row() -> None:
    """Every tiny family config is a contract-test row (conftest.FAMILIES) with an expectations row here."""
    tiny = {OmegaConf.load(p).family for p in (ROOT / "conf" / "model").glob("*.yaml")
            if OmegaConf.load(p).get("tiny_recipe")}
    assert tiny == set(FAMILY_OF.values())
    assert set(EXPECTED) == set(RECIPES)


@pytest.mark.parametrize("recipe", RECIPES)
def test_loads_through_auto_classes(recipe: str, tiny_dirs: dict[str, Path], loaded: dict) -> None:
    model, processor = loaded[recipe]
    exp = EXPECTED[recipe]
    assert type(model).__name__ == exp["model_cls"]
    # AutoProcessor silently falls back to a bare tokenizer when the processor can't be built: check the type.
    assert type(processor).__name__ == exp["processor_cls"] == get_family(FAMILY_OF[recipe]).processor_class
    assert family_for_model_type(model.config.model_type) == FAMILY_OF[recipe]  # exported dirs find their family
    assert type(processor.tokenizer).__name__ == exp["tokenizer_cls"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_dirs[recipe])
    assert type(tokenizer).__name__ == exp["tokenizer_cls"] and tokenizer.chat_template
    assert model.config.text_config.vocab_size == len(processor.tokenizer)
    assert (tiny_dirs[recipe] / MARKER).is_file()


def test_gemma3_special_ids(loaded: dict) -> None:
    model, processor = loaded["gemma3"]
    tok = processor.tokenizer
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert model.config.image_token_id == tok.image_token_id == tok.convert_tokens_to_ids("<image_soft_token>")
    assert model.config.boi_token_id == tok.boi_token_id and model.config.eoi_token_id == tok.eoi_token_id
    assert processor.image_seq_length == model.config.mm_tokens_per_image == 16
    assert model.generation_config.eos_token_id == [tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_turn>")]


def test_qwen2_5_vl_special_ids(loaded: dict) -> None:
    model, processor = loaded["qwen2_5_vl"]
    tok = processor.tokenizer
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>" and tok.bos_token is None
    assert model.config.image_token_id == processor.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert model.config.video_token_id == processor.video_token_id == tok.convert_tokens_to_ids("<|video_pad|>")
    assert model.config.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    assert model.config.text_config.pad_token_id == tok.pad_token_id


def test_chat_templates_render_like_the_real_ones(loaded: dict) -> None:
    gemma = loaded["gemma3"][1].apply_chat_template(_conversation(0, "12"), tokenize=False)
    assert gemma == ("<bos><start_of_turn>user\n<start_of_image>Describe this image.<end_of_turn>\n"
                     "<start_of_turn>model\n12<end_of_turn>\n")
    system_first = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]}] + _conversation(0, "x")[:1]
    prompt = loaded["gemma3"][1].apply_chat_template(system_first, tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<bos><start_of_turn>user\nBe brief.\n\n<start_of_image>")
    assert prompt.endswith("<end_of_turn>\n<start_of_turn>model\n")
    qwen = loaded["qwen2_5_vl"][1].apply_chat_template(_conversation(0, "12"), tokenize=False)
    assert qwen == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    "<|vision_start|><|image_pad|><|vision_end|>Describe this image.<|im_end|>\n"
                    "<|im_start|>assistant\n12<|im_end|>\n")


@pytest.mark.parametrize("recipe", RECIPES)
def test_processor_batch_has_images_and_image_tokens(recipe: str, loaded: dict) -> None:
    model, processor = loaded[recipe]
    batch = _batch(processor)
    n_image_tokens = (batch["input_ids"] == model.config.image_token_id).sum(dim=1)
    assert n_image_tokens.tolist() == [EXPECTED[recipe]["image_tokens"]] * 2
    if recipe == "gemma3":
        assert batch["pixel_values"].shape == (2, 3, 64, 64)
        assert (batch["token_type_ids"] == 1).sum().item() == 2 * 16  # drives bidirectional attention on images
        assert ((batch["input_ids"] == model.config.boi_token_id).sum(dim=1) == 1).all()
    elif recipe == "nemotron_vl":
        assert batch["image_grid_hw"].tolist() == [[4, 4]] * 2  # 64 px / 16 px patches
        assert batch["pixel_values"].shape == (2 * 16, 3 * 16 * 16)
    else:
        assert batch["image_grid_thw"].tolist() == [[1, 4, 4]] * 2  # Qwen-style: (t, h, w) patches per image
        ip = processor.image_processor  # 14 px patches in Qwen2.5-VL, 16 px in Qwen3-VL
        assert batch["pixel_values"].shape == (2 * 16, 3 * ip.temporal_patch_size * ip.patch_size ** 2)
        assert "mm_token_type_ids" in batch


@pytest.mark.parametrize("recipe", RECIPES)
def test_forward_backward_is_finite_and_fast(recipe: str, loaded: dict) -> None:
    model, processor = loaded[recipe]
    batch, model = _batch(processor), model.train()
    timings = []
    for _ in range(3):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        loss = model(**batch, labels=_labels(batch)).loss
        loss.backward()
        timings.append(time.perf_counter() - start)
    model.eval()
    assert torch.isfinite(loss) and loss.item() > 0
    family = get_family(FAMILY_OF[recipe])
    image_path = {n: p.grad for n, p in model.named_parameters()  # the vision tower and projector, by the registry
                  if component_of(family, n) in ("vision_tower", "vision_projection")
                  and not n.startswith(EXPECTED[recipe]["video_only"])}
    assert {component_of(family, n) for n in image_path} == {"vision_tower", "vision_projection"}
    assert [n for n, g in image_path.items() if g is None or not g.abs().sum() > 0] == [], "no gradient"
    assert min(timings) < EXPECTED[recipe]["step_s"], f"forward+backward took {min(timings):.3f}s"


@pytest.mark.parametrize("recipe", RECIPES)
def test_image_changes_the_logits(recipe: str, loaded: dict) -> None:
    """Like a pretrained checkpoint, the vision path must reach the text (Gemma3 zero-inits its projector)."""
    model, processor = loaded[recipe]
    batch = _batch(processor)
    with torch.no_grad():
        logits = model(**batch).logits
        other = dict(batch, pixel_values=torch.flip(batch["pixel_values"], dims=[0]))  # swap the two images
        assert not torch.allclose(logits[:, -3:], model(**other).logits[:, -3:])


@pytest.mark.parametrize("recipe", RECIPES)
def test_header_tokens_are_stable(recipe: str, loaded: dict) -> None:
    """The assistant header tokenizes the same alone and followed by an answer, so labels can be masked by search."""
    tok = loaded[recipe][1].tokenizer
    header, end = EXPECTED[recipe]["header"], EXPECTED[recipe]["end"]
    head = tok.encode(header, add_special_tokens=False)
    for answer in ["Hello world", *ANSWERS, "12,500", "x", "Total: 3.50"]:
        full = tok.encode(f"{header}{answer}{end}\n", add_special_tokens=False)
        assert full[:len(head)] == head, (answer, tok.convert_ids_to_tokens(full))
    user = tok.encode(EXPECTED[recipe]["user"], add_special_tokens=False)
    assert tok.encode(EXPECTED[recipe]["user"] + "Describe", add_special_tokens=False)[:len(user)] == user
    # No vocabulary entry glues a newline to text after it.
    for token_id in range(len(tok)):
        piece = tok.decode([token_id])
        assert "\n" not in piece or piece.endswith("\n"), repr(piece)


@pytest.mark.parametrize("recipe", RECIPES)
def test_answer_span_recoverable_from_batch(recipe: str, loaded: dict) -> None:
    """What a collate function does: find the last header in input_ids, the answer tokens follow it."""
    tok = loaded[recipe][1].tokenizer
    batch = _batch(loaded[recipe][1])
    head = tok.encode(EXPECTED[recipe]["header"], add_special_tokens=False)
    end_id = tok.convert_tokens_to_ids(EXPECTED[recipe]["end"])
    for row, answer in zip(batch["input_ids"].tolist(), ANSWERS):
        start = _find(row, head)
        assert start > 0
        assert tok.decode(row[start:row.index(end_id, start)]) == answer + EXPECTED[recipe]["sep"]


@pytest.mark.parametrize("recipe", RECIPES)
def test_tokenizer_round_trips_text(recipe: str, loaded: dict) -> None:
    tok = loaded[recipe][1].tokenizer
    text = "<s_menu><s_nm>ICE TEA 2</s_nm><s_price>12,000</s_price><sep/></s_menu>\n Ünïcode 한국어 €"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    assert tok.unk_token_id not in tok.encode(text, add_special_tokens=False) or tok.unk_token_id is None
    assert 2000 <= len(tok) <= 4096


def test_qwen2_5_vl_video_inputs(loaded: dict) -> None:
    model, processor = loaded["qwen2_5_vl"]
    rng = np.random.RandomState(0)
    frames = [Image.fromarray(rng.randint(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(4)]
    array = rng.randint(0, 256, (4, 64, 64, 3), dtype=np.uint8)  # (frames, height, width, channels)
    for video in (frames, array):
        conv = [{"role": "user", "content": [{"type": "video", "video": video},
                                             {"type": "text", "text": "Describe this video."}]},
                {"role": "assistant", "content": [{"type": "text", "text": "<s_total>1</s_total>"}]}]
        batch = processor.apply_chat_template([conv], tokenize=True, return_dict=True, return_tensors="pt")
        assert batch["video_grid_thw"].tolist() == [[2, 4, 4]]  # 4 frames / temporal patch 2
        assert (batch["input_ids"] == model.config.video_token_id).sum().item() == 2 * 4 * 4 // 4
        assert batch["pixel_values_videos"].shape == (32, 3 * 2 * 14 * 14)
        assert "second_per_grid_ts" in batch
        loss = model(**batch, labels=batch["input_ids"]).loss
        assert torch.isfinite(loss)


@pytest.mark.parametrize("recipe", RECIPES)
def test_second_build_is_a_no_op(recipe: str, tiny_dirs: dict[str, Path]) -> None:
    path = tiny_dirs[recipe]
    weights = (path / "model.safetensors").stat().st_mtime_ns
    start = time.perf_counter()
    assert build_tiny_model(recipe, path) == path
    assert time.perf_counter() - start < 0.5
    assert (path / "model.safetensors").stat().st_mtime_ns == weights


def test_wrong_recipe_in_existing_dir_is_an_error(tiny_dirs: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="gemma3"):
        build_tiny_model("qwen2_5_vl", tiny_dirs["gemma3"])


def test_stale_build_is_replaced_and_foreign_dir_refused(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    stale = tmp_path / "cache" / "gemma"
    shutil.copytree(tiny_dirs["gemma3"], stale)
    (stale / MARKER).write_text(json.dumps({"recipe": "gemma3", "version": 0}))  # built by an older recipe
    (stale / "leftover.txt").write_text("old")
    assert build_tiny_model("gemma3", stale) == stale
    assert json.loads((stale / MARKER).read_text())["version"] == RECIPE_VERSION
    assert not (stale / "leftover.txt").exists()
    assert [p.name for p in stale.parent.iterdir()] == ["gemma"]

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not a model")
    with pytest.raises(FileExistsError):
        build_tiny_model("gemma3", foreign)
    assert (foreign / "notes.txt").read_text() == "not a model"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []

    empty = tmp_path / "empty"
    empty.mkdir()
    assert (build_tiny_model("qwen2_5_vl", empty) / MARKER).is_file()


@pytest.mark.parametrize("recipe", RECIPES)
def test_fresh_builds_are_identical(recipe: str, tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    again = build_tiny_model(recipe, tmp_path / recipe)
    for name in ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "config.json",
                 "processor_config.json", "generation_config.json", "model.safetensors"]:
        assert (again / name).read_bytes() == (tiny_dirs[recipe] / name).read_bytes(), name


def test_concurrent_builds_share_one_directory(tmp_path: Path) -> None:
    target, results, errors = tmp_path / "race" / "qwen", [], []

    def build() -> None:
        try:
            results.append(build_tiny_model("qwen2_5_vl", target))
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and results == [target, target]
    assert (target / MARKER).is_file()
    assert [p.name for p in target.parent.iterdir()] == ["qwen"], "temporary build directory left behind"
    assert type(transformers.AutoProcessor.from_pretrained(target)).__name__ == "Qwen2_5_VLProcessor"


def _imported_modules(path: Path, package: str) -> set[str]:
    """Every module an ``import`` in ``path`` can load (for ``from a import b``: ``a`` and ``a.b``), made absolute."""
    import ast

    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the package (all modules here sit at its top level)
                parent = package.rsplit(".", node.level - 1)[0]
                base = f"{parent}.{base}" if base else parent
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def test_tiny_builders_are_found_by_name_and_import_no_other_family() -> None:
    """Adding a family is one new module: the recipe names come from the package, and no module (common, __init__,
    another family) imports a family module, so there is no import cycle and no table to edit."""
    import vlm_sweep.models.tiny as package

    root, families = Path(package.__file__).parent, known_recipes()
    assert {"gemma3", "qwen2_5_vl", "nemotron_vl"} <= set(families)
    modules = sorted(root.glob("*.py"))
    # Shared parts that are no family (common, the Qwen tokenizer) are listed as not recipes.
    assert {p.stem for p in modules} == set(families) | {"__init__"} | set(_NOT_RECIPES)
    for path in modules:
        imported = _imported_modules(path, package.__name__)
        variant_of = {f for f in families if path.stem.startswith(f"{f}_")}  # gemma3_demo may use gemma3's parts
        others = {f"{package.__name__}.{f}" for f in families if f != path.stem and f not in variant_of}
        hits = {name for name in imported if any(name == o or name.startswith(o + ".") for o in others)}
        assert not hits, f"{path.name} imports another family's builder: {sorted(hits)}"
    for family in families:
        assert callable(__import__(f"{package.__name__}.{family}", fromlist=["build"]).build), family


def test_every_model_yaml_tiny_recipe_has_a_builder() -> None:
    """conf/model/*.yaml name their tiny builder by module name; a typo would only surface at launch time."""
    from omegaconf import OmegaConf

    conf = Path(__file__).resolve().parents[1] / "conf" / "model"
    recipes = {OmegaConf.load(p).get("tiny_recipe") for p in conf.glob("*.yaml")} - {None}
    assert recipes and recipes <= set(known_recipes())


@pytest.mark.parametrize("recipe", RECIPES)
def test_collator_markers_come_from_the_chat_template(recipe: str, loaded: dict) -> None:
    """The label mask's assistant header and end-of-turn token are read off each family's own template."""
    from vlm_sweep.data.collate import AssistantMarkers

    processor = loaded[recipe][1]
    markers = AssistantMarkers.from_processor(processor)
    assert processor.tokenizer.decode(list(markers.header_ids)) == EXPECTED[recipe]["header"]
    assert markers.end_id == processor.tokenizer.convert_tokens_to_ids(EXPECTED[recipe]["end"])
