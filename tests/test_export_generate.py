"""What training produces leaves the framework: export, plain-transformers loading, generation, evaluation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, compose
from vlm_sweep.data.collate import VLMCollator
from vlm_sweep.data.datasets import Sample
from vlm_sweep.inference.export import export_checkpoint
from vlm_sweep.inference.load import load_for_inference
from vlm_sweep.train import run

TRAIN = ["tracking=none", "eval=none", "step_scheduler.max_steps=12", "step_scheduler.ckpt_every_steps=12",
         "dataset.max_val_samples=4"]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("lora_run")
    run(compose(TRAIN + ["checkpoint.save_consolidated=true"]), run_dir)
    return run_dir


@pytest.fixture(scope="module")
def receipt(tmp_path_factory, receipts_dir) -> Path:
    from datasets import load_dataset

    path = tmp_path_factory.mktemp("img") / "receipt.png"
    load_dataset(str(receipts_dir), split="test")[0]["image"].save(path)
    return path


def _batch(processor, image_path: Path):
    from PIL import Image

    conversation = [{"role": "user", "content": [{"type": "image", "image": Image.open(image_path).convert("RGB")},
                                                 {"type": "text", "text": "Describe this image."}]},
                    {"role": "assistant", "content": [{"type": "text", "text": "<s_total>1</s_total>"}]}]
    batch = VLMCollator(processor, 4096)([Sample("x", conversation)])
    return {k: v for k, v in batch.items() if torch.is_tensor(v) and k != "labels"}


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def test_merged_export_loads_with_plain_transformers_and_matches(lora_run, receipt, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    out = export_checkpoint(str(lora_run), str(tmp_path / "merged"), merge_lora=True)
    assert (out / "config.json").exists() and list(out.glob("*.safetensors"))
    assert (out / "chat_template.jinja").exists() or "chat_template" in (out / "tokenizer_config.json").read_text()
    plain = AutoModelForImageTextToText.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    assert type(processor).__name__ == "Gemma3Processor"
    framework = load_for_inference(str(lora_run))  # PeftModel with the adapter, not merged
    assert hasattr(framework.model, "peft_config")
    batch = _batch(processor, receipt)
    torch.testing.assert_close(_logits(plain, batch), _logits(framework.model, batch), rtol=1e-4, atol=1e-4)


def test_adapter_export_names_its_base_and_loads_with_peft(lora_run, receipt, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    out = export_checkpoint(str(lora_run), str(tmp_path / "adapter"))
    base_ref = (out / "BASE_MODEL").read_text().strip()
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == base_ref
    model = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(base_ref), out).eval()
    framework = load_for_inference(str(lora_run))
    batch = _batch(framework.processor, receipt)
    torch.testing.assert_close(_logits(model, batch), _logits(framework.model, batch))


def test_save_consolidated_writes_a_plain_model(lora_run, receipt):
    from transformers import AutoModelForImageTextToText

    consolidated = lora_run / "checkpoints" / "step_12" / "consolidated"
    plain = AutoModelForImageTextToText.from_pretrained(consolidated).eval()
    framework = load_for_inference(str(lora_run))
    batch = _batch(framework.processor, receipt)
    torch.testing.assert_close(_logits(plain, batch), _logits(framework.model, batch), rtol=1e-4, atol=1e-4)


def _generate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vlm_sweep.generate", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_generate_cli_text_json_file_and_batch(lora_run, receipt, tmp_path):
    common = ["--checkpoint-path", str(lora_run), "--image", str(receipt), "--max-new-tokens", "40"]
    first = _generate(*common, "--output-file", str(tmp_path / "out.txt"))
    assert first.returncode == 0, first.stderr[-2000:]
    text = (tmp_path / "out.txt").read_text().strip()
    assert text and text == first.stdout.strip()
    assert _generate(*common).stdout.strip() == text  # greedy: deterministic

    as_json = _generate(*common, "--output-format", "json")
    assert as_json.returncode == 0 and isinstance(json.loads(as_json.stdout), dict)

    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps({"image": str(receipt), "prompt": "Describe this image."})
                              for _ in range(3)) + "\n")
    batch = _generate("--checkpoint-path", str(lora_run), "--input-jsonl", str(rows), "--max-new-tokens", "40",
                      "--output-file", str(tmp_path / "out.jsonl"))
    assert batch.returncode == 0, batch.stderr[-2000:]
    lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and all(line["output"] == text for line in lines)

    # The merged export answers exactly like the in-framework checkpoint.
    merged = export_checkpoint(str(lora_run), str(tmp_path / "merged"), merge_lora=True)
    exported = _generate("--checkpoint-path", str(merged), "--image", str(receipt), "--max-new-tokens", "40")
    assert exported.returncode == 0 and exported.stdout.strip() == text


def test_generate_cli_names_a_missing_image(lora_run, tmp_path):
    proc = _generate("--checkpoint-path", str(lora_run), "--image", str(tmp_path / "nope.png"))
    assert proc.returncode == 2 and "nope.png" in proc.stderr and "Traceback" not in proc.stderr


def test_evaluate_cli_writes_predictions_and_summary(lora_run, tmp_path):
    out = tmp_path / "eval"
    proc = subprocess.run([sys.executable, "-m", "vlm_sweep.evaluate", "--checkpoint-path", str(lora_run),
                           "--max-samples", "3", "--max-new-tokens", "48", "--compare-base",
                           "--output-dir", str(out), "dataset.split=test"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["split"] == "test" and summary["num_samples"] == 3
    for model in ("base", "fine-tuned"):
        assert set(summary["metrics"][model]) == {"ted_accuracy", "field_f1"}
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and {r["model"] for r in rows} == {"base", "fine-tuned"}
    assert all(r["reference"].startswith("<s_") for r in rows)
    assert "ted_accuracy" in proc.stdout and "fine-tuned" in proc.stdout


def test_full_finetune_checkpoint_generates(tmp_path, receipt):
    run(compose(TRAIN + ["peft=none", "freeze=vision_frozen"]), tmp_path)
    loaded = load_for_inference(str(tmp_path))
    assert not hasattr(loaded.model, "peft_config")
    proc = _generate("--checkpoint-path", str(tmp_path), "--image", str(receipt), "--max-new-tokens", "20")
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize("peft", ["none", "lora"])
def test_torch_save_checkpoints_load_and_generate(tmp_path, receipt, peft):
    run(compose(TRAIN + [f"peft={peft}", "checkpoint.model_save_format=torch_save"]), tmp_path)
    model_dir = tmp_path / "checkpoints" / "step_12" / "model"
    expected = "pytorch_model.bin" if peft == "none" else "adapter_model.bin"
    assert (model_dir / expected).exists() and not list(model_dir.glob("*.safetensors"))
    loaded = load_for_inference(str(tmp_path))
    from vlm_sweep.training.checkpoint import trained_weights

    trained = trained_weights(tmp_path / "checkpoints" / "step_12")
    params = dict(loaded.model.named_parameters())
    for name, tensor in trained.items():  # the trained weights, not the base model's
        torch.testing.assert_close(params[name], tensor)
    batch = _batch(loaded.processor, receipt)
    assert torch.isfinite(_logits(loaded.model, batch)).all()


def test_an_evaluation_outlives_the_checkpoint_it_scored(tmp_path):
    """evaluate's default output sits beside a run's checkpoints, not in them: when the run goes on and
    checkpoint.keep_last prunes the scored step, the predictions and summary stay."""
    from vlm_sweep.cli.evaluate import main as evaluate

    run_dir = tmp_path / "run"
    base = ["tracking=none", "eval=none", "dataset.max_val_samples=2", "step_scheduler.ckpt_every_steps=1",
            "step_scheduler.val_every_steps=1000", "checkpoint.keep_last=1"]
    cfg = compose(base + ["step_scheduler.max_steps=1"])
    run(cfg, run_dir)
    assert evaluate(["--checkpoint", str(run_dir), "--max-samples", "2", "--max-new-tokens", "4",
                     "dataset.split=test"]) == 0
    out = run_dir / "evaluations" / f"step_1_eval_{cfg.dataset.name}_test"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_samples"] == 2 and (out / "predictions.jsonl").is_file()

    assert run(compose(base + ["step_scheduler.max_steps=2"]), run_dir).step == 2  # resumes, saves step_2
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == ["step_2"]
    assert json.loads((out / "summary.json").read_text()) == summary
