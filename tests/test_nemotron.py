"""Nemotron Nano V2 VL: the tiny stand-in, its registry entry, the guide's LoRA/freeze settings, the full path.

The tiny model is transformers' native ``nemotron_h_omni`` (RADIO + pixel-shuffle projector + hybrid Mamba2/attention
Nemotron-H LM) with Nemotron Nano V2's tokenizer conventions and chat template; see vlm_sweep.models.tiny.nemotron_vl.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from conftest import CACHE, ROOT, compose
from vlm_sweep.data.collate import IGNORE_INDEX, VLMCollator
from vlm_sweep.data.datasets import Sample
from vlm_sweep.models.registry import component_of, family_for_model_type, get_family
from vlm_sweep.models.tiny import build_tiny_model
from vlm_sweep.training.freeze import FLAG_TO_COMPONENT, apply_freeze, trainable_by_component
from vlm_sweep.training.lora import apply_lora, select_lora_targets

FAMILY = get_family("nemotron_vl")
ANSWERS = ["<s_total>12</s_total>", "<s_menu><s_nm>ICE TEA</s_nm><s_cnt>2</s_cnt><sep/></s_menu>"]
MAMBA, ATTENTION, MLP = ("in_proj", "out_proj"), ("q_proj", "k_proj", "v_proj", "o_proj"), ("up_proj", "down_proj")


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """One intra-op thread, as in test_tiny_models: tiny ops only lose to thread hand-offs on a busy 2-core box."""
    threads, _ = torch.get_num_threads(), torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def nemotron_dir() -> Path:
    return build_tiny_model("nemotron_vl", CACHE / "models" / "tiny_nemotron_vl")


@pytest.fixture(scope="module")
def plain(nemotron_dir):
    """(model, processor) through plain Auto classes, as a hub id loads (plus the registry's pad token)."""
    return (transformers.AutoModelForImageTextToText.from_pretrained(nemotron_dir).eval(),
            transformers.AutoProcessor.from_pretrained(nemotron_dir, **FAMILY.processor_kwargs))


@pytest.fixture(scope="module")
def framework():
    """(model, processor) through the framework's loader (registry processor kwargs applied)."""
    from vlm_sweep.models.load import load_model_and_processor

    return load_model_and_processor(compose(["model=tiny_nemotron_vl"]).model)


def _image(seed: int, size=(64, 64)) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _conversation(seed: int, answer: str | None, media=None) -> list:
    media = media or {"type": "image", "image": _image(seed)}
    turns = [{"role": "user", "content": [media, {"type": "text", "text": "Describe this image."}]}]
    if answer is not None:
        turns.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return turns


def _batch(processor, answers=ANSWERS):
    return processor.apply_chat_template([_conversation(i, a) for i, a in enumerate(answers)], tokenize=True,
                                         return_dict=True, return_tensors="pt", processor_kwargs={"padding": True})


# --------------------------------------------------------------------------------------- the tiny model itself
def test_loads_through_auto_classes_with_nemotron_specials(nemotron_dir, plain, framework):
    model, processor = plain
    tok = processor.tokenizer
    assert type(model).__name__ == "NemotronH_Omni_Reasoning_V3" and model.config.model_type == "nemotron_h_omni"
    assert type(processor).__name__ == FAMILY.processor_class == "NemotronH_Omni_Reasoning_V3Processor"
    assert family_for_model_type(model.config.model_type) == "nemotron_vl"
    assert model.config.text_config.vocab_size == len(tok)
    assert [tok.convert_ids_to_tokens(i) for i in (0, 1, 2, 10, 11, 12)] == [
        "<unk>", "<s>", "</s>", "<SPECIAL_10>", "<SPECIAL_11>", "<SPECIAL_12>"]
    assert (tok.bos_token, tok.eos_token) == ("<s>", "<SPECIAL_12>") and tok.encode("hi")[0] == tok.bos_token_id
    # No pad token, as on the hub: the registry pads with <unk>, the LM config's pad id (eos would lose labels).
    assert transformers.AutoTokenizer.from_pretrained(nemotron_dir).pad_token is None
    assert model.config.image_token_id == processor.image_token_id == tok.convert_tokens_to_ids("<image>")
    assert model.generation_config.eos_token_id == [2, 12]
    assert framework[1].tokenizer.pad_token == tok.convert_ids_to_tokens(model.config.text_config.pad_token_id)
    # Hybrid LM: Mamba2, MLP, attention, MLP; Mamba on the PyTorch path (no kernels installed here).
    assert model.config.text_config.hybrid_override_pattern == "M-*-"
    mixers = {type(layer.mixer).__name__ for layer in model.language_model.model.layers}
    assert mixers == {"NemotronHMamba2Mixer", "NemotronHAttention", "NemotronHMLP"}
    assert type(model.vision_model).__name__ == "RadioModel"
    assert importlib.util.find_spec("mamba_ssm") is None and importlib.util.find_spec("causal_conv1d") is None


def test_tokenizer_round_trips_and_keeps_newlines_apart(plain):
    """The answer's last token and the template's closing newline never fuse, so label spans are exact."""
    tok = plain[1].tokenizer
    text = "<s_menu><s_nm>ICE TEA 2</s_nm><s_price>12,000</s_price><sep/></s_menu>\n Ünïcode 한국어 €"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text and 2000 <= len(tok) <= 4096
    assert all("\n" not in piece or set(piece) == {"\n"} for piece in map(tok.decode, range(len(tok))))
    head = tok.encode("<SPECIAL_11>Assistant\n<think>\n", add_special_tokens=False)
    for answer in ["Hello", *ANSWERS, "12,500", " x", "Total: 3.50"]:
        assert tok.encode(f"<SPECIAL_11>Assistant\n<think>\n{answer}", add_special_tokens=False)[:len(head)] == head


def test_fresh_builds_are_identical(nemotron_dir, tmp_path):
    again = build_tiny_model("nemotron_vl", tmp_path / "again")
    for name in ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "config.json",
                 "processor_config.json", "generation_config.json", "model.safetensors"]:
        assert (again / name).read_bytes() == (nemotron_dir / name).read_bytes(), name


def test_chat_template_has_nemotron_nano_v2_form(plain):
    processor = plain[1]
    render = lambda conv, **kw: processor.apply_chat_template(conv, tokenize=False, **kw)  # noqa: E731
    assert render(_conversation(0, "12")) == (
        "<SPECIAL_10>System\n\n<SPECIAL_11>User\n<image>\nDescribe this image.\n"
        "<SPECIAL_11>Assistant\n<think>\n12\n<SPECIAL_12>\n")
    assert render(_conversation(0, None), add_generation_prompt=True).endswith("<SPECIAL_11>Assistant\n<think>\n")
    system = {"role": "system", "content": [{"type": "text", "text": "Be brief. /no_think"}]}
    no_think = [system] + _conversation(0, None)
    assert render(no_think, add_generation_prompt=True) == (
        "<SPECIAL_10>System\nBe brief.\n<SPECIAL_11>User\n<image>\nDescribe this image.\n"
        "<SPECIAL_11>Assistant\n<think></think>")


def test_image_batch_expands_to_img_runs(plain):
    model, processor = plain
    batch = _batch(processor)
    assert batch["image_grid_hw"].tolist() == [[4, 4], [4, 4]]  # 64 px / 16 px patches
    assert batch["pixel_values"].shape == (2 * 16, 3 * 16 * 16)
    assert (batch["input_ids"] == model.config.image_token_id).sum(dim=1).tolist() == [4, 4]  # 2x2 after shuffle
    text = processor.tokenizer.decode(batch["input_ids"][0])
    assert "<img><image><image><image><image></img>\nDescribe" in text


def test_forward_backward_is_finite_fast_and_images_reach_the_logits(plain):
    model, processor = plain
    batch = _batch(processor)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
    model.train()
    timings = []
    for _ in range(3):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        (loss := model(**batch, labels=labels).loss).backward()
        timings.append(time.perf_counter() - start)
    model.eval()
    assert torch.isfinite(loss) and loss.item() > 0
    image_path = {n: p.grad for n, p in model.named_parameters()
                  if n.startswith(("vision_model.", "multi_modal_projector.")) and "video_patch" not in n}
    assert all(g is not None for g in image_path.values()) and all(g.abs().sum() > 0 for g in image_path.values())
    assert min(timings) < 0.5, f"forward+backward took {min(timings):.3f}s"
    per_image = batch["pixel_values"].split(batch["image_grid_hw"].prod(-1).tolist())
    swapped = dict(batch, pixel_values=torch.cat(per_image[::-1]))  # as in a trained model, images matter
    with torch.no_grad():
        assert not torch.allclose(model(**batch).logits[:, -3:], model(**swapped).logits[:, -3:])


def test_video_inputs_through_the_processor(plain):
    model, processor = plain
    rng = np.random.RandomState(0)
    frames = [Image.fromarray(rng.randint(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(4)]
    for video in (frames, np.stack([np.asarray(f) for f in frames])):
        conv = _conversation(0, "<s_total>1</s_total>", {"type": "video", "video": video})
        batch = processor.apply_chat_template([conv], tokenize=True, return_dict=True, return_tensors="pt")
        assert batch["pixel_values_videos"].shape == (1, 2, 2 * 3, 64, 64)  # 4 frames -> 2 tubelets of 2
        assert (batch["input_ids"] == model.config.image_token_id).sum().item() == 2 * 4  # video reuses <image>
        assert "Frame 1 and frame 2: <img>" in processor.tokenizer.decode(batch["input_ids"][0])
        with torch.no_grad():
            assert torch.isfinite(model(**batch, labels=batch["input_ids"]).loss)
    with pytest.raises(ValueError, match="single prompt"):  # the processor takes videos one prompt at a time
        processor.apply_chat_template([conv, conv], tokenize=True, return_dict=True, return_tensors="pt",
                                      processor_kwargs={"padding": True})


def test_left_padded_batch_generates_like_single_prompts(framework):
    from vlm_sweep.inference.generate import SamplingConfig, generate

    model, processor = framework
    model.eval()
    prompts = [_conversation(i, None) for i in range(2)]
    prompts[1][0]["content"][1]["text"] = "Describe this image in more words."
    sampling = SamplingConfig(max_new_tokens=6)
    assert generate(model, processor, prompts, sampling) == [generate(model, processor, [p], sampling)[0]
                                                             for p in prompts]


# ------------------------------------------------------------------------------------- registry, LoRA, freezing
def _names(model, pred) -> set:
    return {n for n, p in model.named_parameters() if pred(n, p)}


def test_every_parameter_has_a_component(framework):
    model = framework[0]
    assert _names(model, lambda n, p: component_of(FAMILY, n) is None) == set()
    assert {component_of(FAMILY, n) for n, _ in model.named_parameters()} == {
        "embeddings", "lm_head", "vision_projection", "vision_tower", "language_model"}
    assert component_of(FAMILY, "multi_modal_projector.linear_1.weight") == "vision_projection"
    remote = get_family("nemotron_vl_remote")  # hub remote-code names, as in Megatron Bridge's HF mapping
    assert family_for_model_type("NemotronH_Nano_VL_V2") == "nemotron_vl_remote"
    for name, component in [("language_model.backbone.embeddings.weight", "embeddings"),
                            ("language_model.backbone.layers.0.mixer.in_proj.weight", "language_model"),
                            ("mlp1.1.weight", "vision_projection"), ("language_model.lm_head.weight", "lm_head"),
                            ("vision_model.radio_model.model.blocks.0.attn.qkv.weight", "vision_tower")]:
        assert component_of(remote, name) == component


@pytest.mark.parametrize("flag", [f for f in FLAG_TO_COMPONENT if f != "freeze_audio_tower"])
def test_each_freeze_flag_freezes_exactly_its_component(framework, flag):
    model = framework[0]
    for p in model.parameters():
        p.requires_grad_(True)
    apply_freeze(model, FAMILY, compose([f"freeze.{flag}=true", "freeze=none"]).freeze)
    covered = {FLAG_TO_COMPONENT[flag]}
    covered |= {"embeddings", "lm_head"} if flag == "freeze_language_model" else set()
    for name, param in model.named_parameters():
        assert param.requires_grad == (component_of(FAMILY, name) not in covered), (flag, name)


def _targets(model, peft: str) -> list:
    return select_lora_targets(model, FAMILY, compose([f"peft={peft}"]).peft)


def test_lora_on_the_lm_includes_mamba_projections_by_default(framework):
    targets = _targets(framework[0], "lora")
    assert all(component_of(FAMILY, t) == "language_model" for t in targets)
    assert {t.rsplit(".", 1)[1] for t in targets} == set(MAMBA + ATTENTION + MLP)
    assert _targets(framework[0], "lora_attn_mlp") == [t for t in targets if not t.endswith(MAMBA)]


def test_lora_all_adapts_every_linear_but_lm_head(framework):
    model = framework[0]
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "language_model.lm_head"]
    targets = _targets(model, "lora_all")
    assert targets == linears
    assert {component_of(FAMILY, t) for t in targets} == {"vision_tower", "vision_projection", "language_model"}


def _guide_setting(peft: str, freeze: str):
    from vlm_sweep.models.load import load_model

    cfg = compose(["model=tiny_nemotron_vl", f"peft={peft}", f"freeze={freeze}"])
    model = apply_lora(load_model(str(build_tiny_model("nemotron_vl", CACHE / "models" / "tiny_nemotron_vl")),
                                  cfg.model), FAMILY, cfg.peft)
    apply_freeze(model, FAMILY, cfg.freeze)
    return model


def test_guide_setting_a_lora_on_lm_vision_and_projection_fully_trained():
    model = _guide_setting("lora", "lora_lm_train_vision")
    trainable = _names(model, lambda n, p: p.requires_grad)
    adapters = {n for n in trainable if "lora_" in n}
    base = trainable - adapters
    everything = _names(model, lambda n, p: "lora_" not in n)
    vision = {n for n in everything if component_of(FAMILY, n) in ("vision_tower", "vision_projection")}
    assert base == vision and vision
    assert {component_of(FAMILY, n) for n in adapters} == {"language_model"}
    assert any(".mixer.in_proj.lora_A" in n for n in adapters) and any(".mixer.out_proj.lora_B" in n for n in adapters)
    assert set(trainable_by_component(model, FAMILY)) == {"adapters", "vision_tower", "vision_projection"}


def test_guide_setting_b_lora_everywhere_base_frozen():
    model = _guide_setting("lora_all", "base_frozen")
    trainable = _names(model, lambda n, p: p.requires_grad)
    assert trainable and all("lora_" in n for n in trainable)
    assert {component_of(FAMILY, n) for n in trainable} == {"vision_tower", "vision_projection", "language_model"}
    assert any(".mixer.in_proj.lora_A" in n for n in trainable)
    attn_mlp = _guide_setting("lora_attn_mlp", "base_frozen")
    adapted = _names(attn_mlp, lambda n, p: "lora_" in n)
    assert adapted and not any(".mixer.in_proj." in n or ".mixer.out_proj." in n for n in adapted)


# ------------------------------------------------------------------------------------------------ labels (collate)
def _labelled(labels_row: torch.Tensor) -> list:
    """The labelled ids of a row, checked to form one contiguous run."""
    at = (labels_row != IGNORE_INDEX).nonzero().flatten().tolist()
    assert at and at == list(range(at[0], at[-1] + 1))
    return labels_row[at].tolist()


def _collate(processor, answers):
    collator = VLMCollator(processor, max_length=4096)
    return collator, collator([Sample(f"r{i}", _conversation(i, a)) for i, a in enumerate(answers)])


def test_labels_cover_the_answer_and_nothing_of_the_prompt(framework):
    processor = framework[1]
    collator, batch = _collate(processor, ANSWERS)
    tok = processor.tokenizer
    assert tok.decode(list(collator.markers.header_ids)) == "<SPECIAL_11>Assistant\n<think>\n"
    for row, answer in zip(batch["labels"], ANSWERS):
        assert tok.decode(_labelled(row), skip_special_tokens=True).strip() == answer
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    assert not (batch["labels"] == tok.convert_tokens_to_ids("<image>")).any()


def test_labels_run_through_the_end_of_turn_token(framework):
    processor = framework[1]
    answers = ["<s_total>12</s_total>", "line one\nline two"]
    collator, batch = _collate(processor, answers)
    end = processor.tokenizer.convert_tokens_to_ids("<SPECIAL_12>")
    assert collator.markers.end_id == end
    for row, answer in zip(batch["labels"], answers):
        ids = _labelled(row)
        assert ids[-1] == end and processor.tokenizer.decode(ids[:-1]) == answer + "\n"


# ------------------------------------------------------------------------------- train, resume, generate, export
TRAIN = ["model=tiny_nemotron_vl", "tracking=none", "eval=none", "peft=lora", "freeze=lora_lm_train_vision",
         "step_scheduler.ckpt_every_steps=2", "dataset.max_val_samples=2", "checkpoint.keep_last=5"]


@pytest.fixture(scope="module")
def nemotron_run(tmp_path_factory, receipts_dir) -> Path:
    """Guide setting (a) for 4 steps, then the same run dir continued to 6: resumed from LATEST."""
    from vlm_sweep.train import run

    run_dir = tmp_path_factory.mktemp("nemotron_run")
    first = run(compose(TRAIN + ["step_scheduler.max_steps=4"]), run_dir)
    assert first.status == "FINISHED" and first.step == 4
    metrics = lambda: [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]  # noqa
    before = metrics()
    second = run(compose(TRAIN + ["step_scheduler.max_steps=6"]), run_dir)
    assert second.status == "FINISHED" and second.step == 6
    after = metrics()
    assert [r["step"] for r in before] == [1, 2, 3, 4] and [r["step"] for r in after] == list(range(1, 7))
    assert after[:4] == before  # the resumed run continued; it did not start over
    assert (run_dir / "checkpoints" / "LATEST").read_text().strip() == "step_6"
    return run_dir


@pytest.fixture(scope="module")
def media(tmp_path_factory, receipts_dir) -> tuple:
    """(a test-split receipt png, a 12-frame 64x64 mp4 written with PyAV)."""
    import av
    from datasets import load_dataset

    root = tmp_path_factory.mktemp("media")
    load_dataset(str(receipts_dir), split="test")[0]["image"].save(root / "receipt.png")
    with av.open(str(root / "clip.mp4"), "w") as container:
        stream = container.add_stream("mpeg4", rate=6)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for i in range(12):
            frame = np.full((64, 64, 3), (20 * i, 90, 200 - 10 * i), dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return root / "receipt.png", root / "clip.mp4"


def _cli(module: str, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


@pytest.mark.slow
def test_generate_cli_with_image_and_video(nemotron_run, media, tmp_path):
    common = ["--checkpoint-path", str(nemotron_run), "--max-new-tokens", "12"]
    image = _cli("vlm_sweep.generate", *common, "--image", str(media[0])).stdout
    assert image.strip() and image == _cli("vlm_sweep.generate", *common, "--image", str(media[0])).stdout
    assert _cli("vlm_sweep.generate", *common, "--video", str(media[1]), "--num-frames", "4").stdout.strip()
    merged = tmp_path / "merged"  # the merged export answers exactly like the checkpoint
    _cli("vlm_sweep.export", "--checkpoint", str(nemotron_run), "--output", str(merged), "--merge-lora")
    assert _cli("vlm_sweep.generate", "--checkpoint-path", str(merged), *common[2:], "--image", str(media[0])).stdout \
        == image


@pytest.mark.slow
def test_merged_export_matches_the_framework_model(nemotron_run, media, tmp_path):
    from vlm_sweep.inference.load import load_for_inference

    out = tmp_path / "merged"
    _cli("vlm_sweep.export", "--checkpoint", str(nemotron_run), "--output", str(out), "--merge-lora")
    plain = transformers.AutoModelForImageTextToText.from_pretrained(out).eval()
    processor = transformers.AutoProcessor.from_pretrained(out)
    assert type(plain).__name__ == "NemotronH_Omni_Reasoning_V3" and processor.tokenizer.pad_token == "<unk>"
    framework = load_for_inference(str(nemotron_run))
    assert hasattr(framework.model, "peft_config")  # adapter applied, not merged
    conv = [{"role": "user", "content": [{"type": "image", "image": Image.open(media[0]).convert("RGB")},
                                         {"type": "text", "text": "Describe this image."}]},
            {"role": "assistant", "content": [{"type": "text", "text": "<s_total>1</s_total>"}]}]
    batch = processor.apply_chat_template([conv], tokenize=True, return_dict=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits, framework.model(**batch).logits, rtol=1e-4, atol=1e-4)


def test_checkpoint_model_keeps_fully_trained_vision_weights(nemotron_run):
    from vlm_sweep.inference.load import load_for_inference

    step = nemotron_run / "checkpoints" / "step_6"
    trained = torch.load(step / "training_state" / "trainable.pt", weights_only=True)
    vision = {n: t for n, t in trained.items() if "vision_model." in n and "lora_" not in n}
    assert vision
    loaded = dict(load_for_inference(str(nemotron_run), merge_lora=True).model.named_parameters())
    for name, tensor in vision.items():
        plain_name = name.split("base_model.model.", 1)[-1].replace("modules_to_save.default.", "")
        torch.testing.assert_close(loaded[plain_name], tensor)
