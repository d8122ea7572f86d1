"""scripts/gpu_benchmark.py at tiny size on the CPU: the code path the GPU numbers come from."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_benchmark.py"
COLUMNS = ["model", "mode", "tokens/s", "TFLOP/s", "MFU", "peak mem GB", "step s", "tokens/step", "image tok"]


def _bench(args: List[str], prelude: str = "") -> subprocess.CompletedProcess:
    """The script in a fresh interpreter (``prelude`` runs first, in the script's module)."""
    code = (f"import runpy, sys; sys.argv = ['gpu_benchmark.py', *{args!r}]; "
            f"ns = runpy.run_path({str(SCRIPT)!r}, run_name='gpu_benchmark'); "
            f"exec({prelude!r}, ns); sys.exit(ns['main']())")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def bench() -> dict:
    """The script's namespace, without running it."""
    import runpy

    return runpy.run_path(str(SCRIPT), run_name="gpu_benchmark")


def _tiny_dir(bench: dict, name: str) -> Path:
    from vlm_sweep.models.load import resolve_source

    return Path(resolve_source(bench["compose"]([f"model={bench['MODELS'][name].tiny_group}"]).model))


@pytest.mark.parametrize("name", ["gemma3", "qwen2_5_vl"])
def test_published_architecture_with_the_tiny_tokenizers_ids(bench: dict, name: str):
    """The benchmarked model is the published one (its parameter count), speaking the tiny tokenizer's ids."""
    import torch
    import transformers

    spec, tiny_dir = bench["MODELS"][name], _tiny_dir(bench, name)
    config = bench["published_config"](spec, json.loads((tiny_dir / "config.json").read_text()))
    with torch.device("meta"):
        model = transformers.AutoModelForImageTextToText.from_config(config)
    assert model.num_parameters() == pytest.approx(spec.params, rel=0.001)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_dir)
    image_token = config.image_token_id
    assert tokenizer.convert_ids_to_tokens(image_token) in ("<image_soft_token>", "<|image_pad|>")
    assert len(tokenizer) <= config.text_config.vocab_size, "every token id is inside the real vocabulary"
    assert config.text_config.pad_token_id == tokenizer.pad_token_id


@pytest.mark.parametrize("name, image_tokens", [("gemma3", 256), ("qwen2_5_vl", 41 * 31)])
def test_real_image_settings_on_the_tiny_processor(bench: dict, name: str, image_tokens: int, tmp_path: Path):
    """Gemma 3: 896x896 -> 256 tokens per image; Qwen2.5-VL: native resolution (864x1152 -> 41x31 merged patches)."""
    import transformers
    from PIL import Image

    spec, tiny_dir = bench["MODELS"][name], _tiny_dir(bench, name)
    bench["write_processor"](tiny_dir, tmp_path, spec.processor)
    processor = transformers.AutoProcessor.from_pretrained(tmp_path)
    assert type(processor).__name__ == {"gemma3": "Gemma3Processor", "qwen2_5_vl": "Qwen2_5_VLProcessor"}[name]
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Read it."}]}]
    text = processor.apply_chat_template(conversation)
    batch = processor(text=[text], images=[Image.new("RGB", (864, 1152), "white")], return_tensors="pt")
    image_token = transformers.AutoConfig.from_pretrained(tiny_dir).image_token_id  # what the model looks for
    assert int((batch["input_ids"] == image_token).sum()) == image_tokens


def _table(stdout: str) -> List[List[str]]:
    lines = [line for line in stdout.splitlines() if line.startswith("|") and "---" not in line]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


@pytest.mark.slow
def test_tiny_benchmark_prints_and_writes_every_run(tmp_path: Path):
    out = tmp_path / "bench" / "gpu_benchmark.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--steps", "2", "--peak-tflops", "0.5",
                           "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    table = _table(done.stdout)
    assert table[0] == COLUMNS
    assert [row[:2] for row in table[1:]] == [["gemma3", "lora"], ["gemma3", "full"],
                                             ["qwen2_5_vl", "lora"], ["qwen2_5_vl", "full"]]
    assert all("n/a" not in row and "ERROR" not in " ".join(row) for row in table[1:]), done.stdout

    report = json.loads(out.read_text())
    assert report["tiny"] is True and report["steps"] == 2 and report["global_batch_size"] == 8
    rows = report["rows"]
    assert [(r["model"], r["mode"]) for r in rows] == [tuple(row[:2]) for row in table[1:]]
    assert {r["hub_id"] for r in rows} == {"google/gemma-3-4b-it", "Qwen/Qwen2.5-VL-3B-Instruct"}
    for r, printed in zip(rows, table[1:]):
        assert r["error"] is None and r["steps"] == 1, "step 1 is warm-up: step 2 is measured"
        assert r["tokens_per_s"] > 0 and r["tflops"] > 0 and r["peak_memory_gb"] > 0
        assert r["mfu"] == pytest.approx(r["tflops"] / 0.5), "MFU against the given peak"
        assert r["tokens_per_s"] * r["step_time_s"] == pytest.approx(r["tokens_per_step"])
        assert 0 < r["image_token_share"] < 1, "image tokens counted in every step"
        assert printed[2] == f"{r['tokens_per_s']:,.0f}" and printed[4] == f"{100 * r['mfu']:.1f}%"
    lora, full = rows[0], rows[1]
    assert full["tflops"] * full["step_time_s"] > lora["tflops"] * lora["step_time_s"], \
        "full SFT computes weight gradients LoRA does not: more FLOPs for the same batch"


@pytest.mark.slow
def test_a_failing_model_gets_an_error_row_and_the_rest_still_run(tmp_path: Path):
    out = tmp_path / "bench.json"
    # Two broken copies of Gemma 3: one whose build fails, one whose training fails mid-run (no record
    # fits dataset.max_length: the first batch raises inside vlm_sweep.train.run, as an OOM would),
    # ahead of the real one, which must still be measured.
    prelude = ("import dataclasses\n"
               "g = MODELS['gemma3']\n"
               "MODELS.clear()\n"
               "MODELS['broken_build'] = dataclasses.replace(g, config_class='NoSuchConfig')\n"
               "MODELS['broken_run'] = dataclasses.replace(g, mode_overrides={'lora': ('dataset.max_length=16',)})\n"
               "MODELS['gemma3'] = g\n")
    done = _bench(["--tiny", "--steps", "1", "--modes", "lora", "--models", "broken_build,broken_run,gemma3",
                   "--out", str(out)], prelude)
    assert done.returncode == 1, done.stdout + done.stderr
    table = {row[0]: row for row in _table(done.stdout)[1:]}
    assert table["broken_build"][2].startswith("ERROR build failed: AttributeError"), table
    assert table["broken_run"][2].startswith("ERROR BadRecordError:"), table["broken_run"]
    assert table["gemma3"][2].replace(",", "").isdigit(), "measured after the failures"
    rows = {r["model"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["broken_run"]["tokens_per_s"] is None and "dataset.max_length" in rows["broken_run"]["error"]
    assert rows["gemma3"]["error"] is None and rows["gemma3"]["tokens_per_s"] > 0


def test_no_gpu_is_a_one_line_error():
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the benchmark would run")
    done = subprocess.run([sys.executable, str(SCRIPT), "--steps", "1"], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert done.returncode == 2
    assert done.stderr.strip() == "error: no GPU here; run with --tiny for the CPU version of the same benchmark"
