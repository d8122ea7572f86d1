"""Nemotron Nano V2 VL: what only this family has.

The tiny model is transformers' native ``nemotron_h_omni`` (RADIO + pixel-shuffle projector + hybrid Mamba2/attention
Nemotron-H LM) with Nemotron Nano V2's tokenizer conventions and chat template; see vlm_sweep.models.tiny.nemotron_vl.
Nemotron is a row (``tiny_nemotron_vl`` in conftest.FAMILIES) of every family contract; where each now lives:
loading through the Auto classes, tokenizer round trip and stable headers, image tokens per image, forward/backward
and images reaching the logits, fresh builds identical, collator markers: test_tiny_models.py; every parameter has
a component, freeze flags, LoRA targets, the guide's settings (a) and (b): test_freeze_lora.py; labels:
test_label_contract.py; batched generation, resume, fully trained weights in the checkpoint, merged export, the
generate/export CLIs with images and video: test_family_inference.py; SDPA equals eager: test_attention.py.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from conftest import CACHE, compose
from vlm_sweep.models.registry import component_of, family_for_model_type, get_family
from vlm_sweep.models.tiny import build_tiny_model
from vlm_sweep.training.freeze import apply_freeze
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


# --------------------------------------------------------------------------------------- the tiny model itself
def test_nemotron_special_ids_and_hybrid_lm(nemotron_dir, plain, framework):
    model, processor = plain
    tok = processor.tokenizer
    assert [tok.convert_ids_to_tokens(i) for i in (0, 1, 2, 10, 11, 12)] == [
        "<unk>", "<s>", "</s>", "<SPECIAL_10>", "<SPECIAL_11>", "<SPECIAL_12>"]
    assert (tok.bos_token, tok.eos_token) == ("<s>", "<SPECIAL_12>") and tok.encode("hi")[0] == tok.bos_token_id
    # No pad token, as on the hub: the registry pads with <unk>, the LM config's pad id (eos would lose labels).
    assert transformers.AutoTokenizer.from_pretrained(nemotron_dir).pad_token is None
    assert model.config.image_token_id == processor.image_token_id == tok.convert_tokens_to_ids("<image>")
    assert model.generation_config.eos_token_id == [2, 12]
    assert framework[1].tokenizer.pad_token == tok.convert_ids_to_tokens(model.config.text_config.pad_token_id)
    # Hybrid LM: Mamba2, MLP (Nano V2's block), attention, mixture of experts (Omni's block); Mamba on the PyTorch
    # path (no kernels installed here). The experts are fused 3-D tensors, one slice per routed expert.
    assert model.config.text_config.hybrid_override_pattern == "M-*E"
    mixers = {type(layer.mixer).__name__ for layer in model.language_model.model.layers}
    assert mixers == {"NemotronHMamba2Mixer", "NemotronHAttention", "NemotronHMLP", "NemotronHMoE"}
    experts = model.language_model.model.layers[3].mixer.experts
    assert experts.up_proj.dim() == 3 and experts.up_proj.shape[0] == model.config.text_config.n_routed_experts > 1
    assert type(model.audio_tower).__name__ == "ParakeetEncoder"
    assert model.config.audio_token_id == processor.audio_token_id == tok.convert_tokens_to_ids("<so_embedding>")
    assert type(model.vision_model).__name__ == "RadioModel"
    assert importlib.util.find_spec("mamba_ssm") is None and importlib.util.find_spec("causal_conv1d") is None


def test_tokenizer_keeps_newlines_apart(plain):
    """Its template puts a newline between the answer and <SPECIAL_12>: no vocabulary entry joins a newline to
    other text, so the answer's last token and that newline never fuse and label spans are exact."""
    tok = plain[1].tokenizer
    assert all("\n" not in piece or set(piece) == {"\n"} for piece in map(tok.decode, range(len(tok))))


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


def test_image_expands_to_an_img_run(plain):
    batch = plain[1].apply_chat_template([_conversation(0, ANSWERS[0])], tokenize=True, return_dict=True,
                                         return_tensors="pt")
    text = plain[1].tokenizer.decode(batch["input_ids"][0])
    assert "<img><image><image><image><image></img>\nDescribe" in text  # 2x2 tokens after the pixel shuffle


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


# ------------------------------------------------------------------------------------- registry, LoRA, freezing
def test_remote_code_family_names_its_components():
    """The hub checkpoint's remote-code module names, as in Megatron Bridge's HF mapping."""
    remote = get_family("nemotron_vl_remote")
    assert family_for_model_type("NemotronH_Nano_VL_V2") == "nemotron_vl_remote"
    for name, component in [("language_model.backbone.embeddings.weight", "embeddings"),
                            ("language_model.backbone.layers.0.mixer.in_proj.weight", "language_model"),
                            ("mlp1.1.weight", "vision_projection"), ("language_model.lm_head.weight", "lm_head"),
                            ("vision_model.radio_model.model.blocks.0.attn.qkv.weight", "vision_tower")]:
        assert component_of(remote, name) == component
    assert component_of(FAMILY, "multi_modal_projector.linear_1.weight") == "vision_projection"


def _targets(model, peft: str) -> list:
    return select_lora_targets(model, FAMILY, compose([f"peft={peft}"]).peft)


def test_lora_on_the_lm_includes_mamba_projections_by_default(framework):
    targets = _targets(framework[0], "lora")
    assert all(component_of(FAMILY, t) == "language_model" for t in targets)
    assert {t.rsplit(".", 1)[1] for t in targets} == set(MAMBA + ATTENTION + MLP)
    assert _targets(framework[0], "lora_attn_mlp") == [t for t in targets if not t.endswith(MAMBA)]


@pytest.mark.parametrize("peft,freeze,mamba", [("lora", "lora_lm_train_vision", True),
                                               ("lora_all", "base_frozen", True),
                                               ("lora_attn_mlp", "base_frozen", False)])
def test_guide_settings_adapt_mamba_mixers_unless_attn_mlp(peft, freeze, mamba):
    """The guide's settings put adapters on the Mamba mixers' in_proj/out_proj; Megatron Bridge's attention+MLP
    recipe (peft=lora_attn_mlp) keeps their base weights."""
    from vlm_sweep.models.load import load_model

    cfg = compose(["model=tiny_nemotron_vl", f"peft={peft}", f"freeze={freeze}"])
    model = apply_lora(load_model(str(build_tiny_model("nemotron_vl", CACHE / "models" / "tiny_nemotron_vl")),
                                  cfg.model), FAMILY, cfg.peft, cfg.freeze)
    apply_freeze(model, FAMILY, cfg.freeze)
    adapted = {n for n, p in model.named_parameters() if "lora_" in n and p.requires_grad}
    assert adapted
    on_mixers = {n for n in adapted if ".mixer.in_proj.lora_" in n or ".mixer.out_proj.lora_" in n}
    assert bool(on_mixers) == mamba
    if mamba:
        assert any(".mixer.in_proj.lora_A" in n for n in on_mixers) and any(".mixer.out_proj.lora_B" in n
                                                                            for n in on_mixers)
