"""Inference contracts, for every family (conftest.FAMILIES): batched generation answers like one prompt at a time,
and a short guide-setting run (LoRA on the LM, vision tower and projector trained fully) resumes where it
stopped, keeps its fully trained weights, and exports a merged model that plain transformers loads and that
answers exactly like the checkpoint, through the CLIs.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import FAMILIES, ROOT, compose
from vlm_sweep.models.registry import get_family


def _image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (64, 64, 3), dtype=np.uint8))


def _prompt(seed: int, text: str) -> list:
    return [{"role": "user", "content": [{"type": "image", "image": _image(seed)}, {"type": "text", "text": text}]}]


def _next_token_logits(model, processor, prompts) -> torch.Tensor:
    """The first generated token's logits, inputs built exactly as ``inference.generate`` builds them."""
    from vlm_sweep.data.processor_kwargs import MediaKwargs

    inputs = processor.apply_chat_template(
        prompts, tokenize=True, return_dict=True, return_tensors="pt", add_generation_prompt=True,
        processor_kwargs={"padding": True, "padding_side": "left", **MediaKwargs(processor)(prompts)})
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=1, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=processor.tokenizer.pad_token_id)
    return out.logits[0].float()


@pytest.mark.parametrize("model_name", FAMILIES)
def test_left_padded_batch_generates_like_single_prompts(model_name):
    """A padding mistake (right padding, a wrong position or mask) changes a padded row's logits. Compared
    as logits, not greedy tokens: an untrained tiny model's near-tied logits would flip on float noise."""
    from vlm_sweep.inference.generate import SamplingConfig, generate
    from vlm_sweep.models.load import load_model_and_processor

    model, processor = load_model_and_processor(compose([f"model={model_name}"]).model)
    model.eval()
    prompts = [_prompt(0, "Describe this image."), _prompt(1, "Describe this image in more words.")]
    batch = _next_token_logits(model, processor, prompts)
    for row, prompt in enumerate(prompts):
        alone = _next_token_logits(model, processor, [prompt])[0]
        assert torch.allclose(batch[row], alone, rtol=1e-4, atol=1e-4), (row, (batch[row] - alone).abs().max())
    answers = generate(model, processor, prompts, SamplingConfig(max_new_tokens=4))  # the wrapper's own path
    assert len(answers) == len(prompts) and all(isinstance(a, str) for a in answers)


# ------------------------------------------------------------------------- a guide-setting run of every family
GUIDE = ["tracking=none", "eval=none", "dataset.val_split=null", "peft=lora", "freeze=lora_lm_train_vision",
         "step_scheduler.ckpt_every_steps=2", "checkpoint.keep_last=5"]


@pytest.fixture(scope="module", params=FAMILIES)
def guide_run(request, tmp_path_factory, receipts_dir) -> tuple:
    """(model config name, run dir): guide setting (a) for 4 steps, then the same run dir continued to 6."""
    from vlm_sweep.train import run

    run_dir = tmp_path_factory.mktemp(f"guide_{request.param}")
    overrides = [f"model={request.param}", *GUIDE]
    first = run(compose(overrides + ["step_scheduler.max_steps=4"]), run_dir)
    assert first.status == "FINISHED" and first.step == 4
    metrics = lambda: [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]  # noqa
    before = metrics()
    second = run(compose(overrides + ["step_scheduler.max_steps=6"]), run_dir)
    assert second.status == "FINISHED" and second.step == 6
    after = metrics()
    assert [r["step"] for r in before] == [1, 2, 3, 4] and [r["step"] for r in after] == list(range(1, 7))
    assert after[:4] == before  # the resumed run continued from LATEST; it did not start over
    assert (run_dir / "checkpoints" / "LATEST").read_text().strip() == "step_6"
    return request.param, run_dir


@pytest.mark.slow
def test_checkpoint_model_keeps_fully_trained_vision_weights(guide_run):
    from vlm_sweep.inference.load import load_for_inference
    from vlm_sweep.models.registry import component_of

    model_name, run_dir = guide_run
    family = get_family(compose([f"model={model_name}"]).model.family)
    step = run_dir / "checkpoints" / "step_6"
    trained = torch.load(step / "training_state" / "trainable.pt", weights_only=True)
    vision = {n: t for n, t in trained.items()
              if "lora_" not in n and component_of(family, n) in ("vision_tower", "vision_projection")}
    assert vision
    loaded = dict(load_for_inference(str(run_dir), merge_lora=True).model.named_parameters())
    for name, tensor in vision.items():
        plain_name = name.split("base_model.model.", 1)[-1].replace("modules_to_save.default.", "")
        torch.testing.assert_close(loaded[plain_name], tensor)


@pytest.mark.slow
def test_merged_export_matches_the_framework_model(guide_run, receipts_dir, tmp_path):
    import transformers
    from datasets import load_dataset

    from vlm_sweep.inference.export import export_checkpoint
    from vlm_sweep.inference.load import load_for_inference

    model_name, run_dir = guide_run
    family = get_family(compose([f"model={model_name}"]).model.family)
    out = export_checkpoint(str(run_dir), str(tmp_path / "merged"), merge_lora=True)
    plain = transformers.AutoModelForImageTextToText.from_pretrained(out).eval()
    processor = transformers.AutoProcessor.from_pretrained(out)  # no registry kwargs: the export carries them
    framework = load_for_inference(str(run_dir))
    assert type(processor).__name__ == family.processor_class
    assert processor.tokenizer.pad_token is not None
    assert processor.tokenizer.pad_token == framework.processor.tokenizer.pad_token
    assert hasattr(framework.model, "peft_config")  # adapter applied, not merged
    image = load_dataset(str(receipts_dir), split="test")[0]["image"].convert("RGB")
    conv = [{"role": "user", "content": [{"type": "image", "image": image},
                                         {"type": "text", "text": "Describe this image."}]},
            {"role": "assistant", "content": [{"type": "text", "text": "<s_total>1</s_total>"}]}]
    batch = processor.apply_chat_template([conv], tokenize=True, return_dict=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits, framework.model(**batch).logits, rtol=1e-4, atol=1e-4)


def _generate(*args: str) -> list:
    proc = subprocess.run([sys.executable, "-m", "vlm_sweep.generate", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [json.loads(line)["output"] for line in proc.stdout.splitlines()]


@pytest.mark.slow
def test_generate_cli_merged_export_answers_like_the_checkpoint(guide_run, receipts_dir, tmp_path):
    """Image (and, for a video-capable family, video) rows through the generate CLI, on the checkpoint and on
    its merged export (written by the export CLI): the same answers, and greedy answers repeat."""
    from datasets import load_dataset

    from vlm_sweep.data.fixture_parts import write_video

    model_name, run_dir = guide_run
    load_dataset(str(receipts_dir), split="test")[0]["image"].save(tmp_path / "receipt.png")
    rows = [{"image": "receipt.png", "prompt": "Describe this image."}] * 2
    if get_family(compose([f"model={model_name}"]).model.family).supports_video:
        rows.append({"video": str(write_video(tmp_path / "clip.mp4")), "prompt": "What happens?"})
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    common = ["--input-jsonl", str(tmp_path / "rows.jsonl"), "--batch-size", "1", "--max-new-tokens", "12",
              "--num-frames", "4"]
    answers = _generate("--checkpoint-path", str(run_dir), *common)
    # A 6-step model may answer only whitespace (stripped to ""): the contract is one answer per row, the
    # same for the same row, and the export answering exactly like the checkpoint (below).
    assert len(answers) == len(rows) and all(isinstance(a, str) for a in answers) and answers[0] == answers[1]
    merged = tmp_path / "merged"
    export = subprocess.run([sys.executable, "-m", "vlm_sweep.export", "--checkpoint", str(run_dir),
                             "--output", str(merged), "--merge-lora"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert export.returncode == 0, export.stderr[-2000:]
    assert _generate("--checkpoint-path", str(merged), *common) == answers
